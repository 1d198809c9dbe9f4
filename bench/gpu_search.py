"""GPU check: the embedded default's search with `gpu_per_trial: auto` must run 4 trials at once on
one GPU, and the probe behind auto must predict what a trial really uses.

    python bench/gpu_search.py [--space search_spaces/kd.yaml] [--gpu-per-trial auto] [--num-samples 4]
    python bench/gpu_search.py --smoke        # CPU, a tiny world built in a temporary folder: the plumbing only
                                              # (one trial unless --num-samples says; tests/bench runs it)

Runs the search (no ASHA, so every trial runs its epochs; no control arms, no export), counts how
many trials were RUNNING at the same time (a Tune callback), and compares each trial's real peak
GPU memory (its gpu_peak_gib metric, torch.cuda.max_memory_allocated in the trial) with the
figure of the probe that chose the share (resources.measure_trial_gpu_memory). Needs Ray; on a GPU
machine without it, see shared/device/make-wheels.sh. --result-lines adds one '@result {json}'
line (bench/gpu_check.sh reads it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.tune import Callback  # noqa: E402

from tune_kd.config.experiment import load_config
from tune_kd.search import demo
from tune_kd.search.runner import run_search

TINY_ARCH = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}


class Overlap(Callback):
    """Tracks the number of trials running at once and each trial's largest gpu_peak_gib report."""

    def __init__(self):
        self.running, self.peak = set(), 0
        self.gpu_peak_gib: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self.peak = max(self.peak, len(self.running))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get("gpu_peak_gib", math.nan)
        self.gpu_peak_gib[trial.trial_id] = max(value, self.gpu_peak_gib.get(trial.trial_id, -math.inf))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)

    on_trial_error = on_trial_complete


def tiny_space(folder: Path) -> dict:
    """A seconds-long CPU experiment: the demo's tokenizer and task, a built (untrained) tiny teacher."""
    demo.build_tokenizer(folder / "tokenizer")
    demo.write_jsonl(folder / "train.jsonl", demo.make_conversations(256, seed=1))
    demo.write_jsonl(folder / "val.jsonl", demo.make_conversations(32, seed=2))
    return {"name": "gpu-check-smoke", "tokenizer": str(folder / "tokenizer"),
            "teacher": {"arch": dict(TINY_ARCH, hidden_size=48)}, "student": {"arch": TINY_ARCH},
            "data": {"path": str(folder / "train.jsonl"), "val_path": str(folder / "val.jsonl"), "max_seq_len": 64,
                     "cache_dir": str(folder / "cache")},
            "train": {"batch_size": 32, "dtype": "float32", "device": "cpu", "log_interval": 10},
            "parameters": {"alpha": {"distribution": "uniform", "min": 0.0, "max": 1.0}},
            "search": {"algorithm": "optuna", "seed": 0}, "resources": {"gpu_per_trial": "auto"},
            "logging": {"tensorboard": False}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default="search_spaces/kd.yaml")
    parser.add_argument("--gpu-per-trial", default="auto", help="auto (the probe decides) or a share such as 0.25")
    parser.add_argument("--num-samples", type=int, help="default: 4 (--smoke: 1)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--goal", type=int, default=4, help="trials that must run at once (default: %(default)s)")
    parser.add_argument("--storage", default="results/bench")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny world: checks the plumbing, not the GPU")
    parser.add_argument("--result-lines", action="store_true", help="also print the result as '@result {json}'")
    args = parser.parse_args()
    if args.num_samples is None:
        args.num_samples = 1 if args.smoke else 4
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU here: this benchmark needs one (or --smoke for the plumbing on CPU)")
        return 1
    share = args.gpu_per_trial if args.gpu_per_trial == "auto" else float(args.gpu_per_trial)
    overrides = {"resources.gpu_per_trial": share, "resources.cpu_per_trial": 1,
                 "search.num_samples": args.num_samples, "search.max_concurrent": "auto", "scheduler.type": "none",
                 "train.epochs": args.epochs, "controls.plain_sft": False, "controls.minimind_defaults": False,
                 "controls.seeds": 0, "name": f"gpu-search-{int(time.time())}"}
    with tempfile.TemporaryDirectory(prefix="tune_kd-gpu-search-") as scratch:
        if args.smoke:
            cfg = load_config(raw=tiny_space(Path(scratch)), overrides=overrides)
        else:
            cfg = load_config(args.space, {**overrides, "train.device": "cuda"})
        probe = Overlap()
        started = time.perf_counter()
        summary = run_search(cfg, "gpu_search --smoke" if args.smoke else args.space,
                             storage=scratch if args.smoke else args.storage, callbacks=[probe],
                             export_best=False, dashboard_host=None)   # the GPU image lacks the dashboard's packages
        wall = time.perf_counter() - started
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu"
    resources = summary["resources"]
    print(f"device: {device}; gpu_per_trial {args.gpu_per_trial} -> {resources['gpu']} per trial, probe "
          f"{resources.get('gpu_probe_gib', math.nan):.3f} GiB; max_concurrent {summary['parallel']}, trials running "
          f"at the same time (peak): {probe.peak} (goal: {args.goal})")
    for trial_id, peak_gib in sorted(probe.gpu_peak_gib.items()):
        print(f"trial {trial_id}: real peak {peak_gib:.3f} GiB")
    print(f"{args.num_samples} trials x {args.epochs} epochs: wall {wall:.1f} s (search {summary['seconds']:.1f} s)")
    if args.result_lines:
        nan_to_none = lambda v: None if v is None or math.isnan(v) else v  # noqa: E731
        print("@result " + json.dumps({
            "part": "search", "device": device, "share": resources["gpu"], "parallel": summary["parallel"],
            "peak_running": probe.peak, "goal": args.goal, "probe_gib": resources.get("gpu_probe_gib"),
            "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if device != "cpu" else None,
            "trial_peak_gib": {t: nan_to_none(v) for t, v in sorted(probe.gpu_peak_gib.items())},
            "seconds": wall}), flush=True)
    return 0 if args.smoke or probe.peak >= args.goal else 1


if __name__ == "__main__":
    raise SystemExit(main())
