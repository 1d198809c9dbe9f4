"""GPU check: a short search with gpu_per_trial 0.25 must run 4 trials at once on one GPU.

    python bench/gpu_search.py [--space search_spaces/kd.yaml] [--gpu-per-trial 0.25] [--num-samples 8]

Runs the embedded default's search on the GPU (no ASHA, so every trial runs its epochs), counts
how many trials were RUNNING at the same time (a Tune callback), and prints that with the wall
time. Needs a CUDA GPU; on a machine without Ray, see shared/device/make-wheels.sh.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.tune import Callback  # noqa: E402

from tune_kd.config import load_config  # noqa: E402
from tune_kd.search import run_search  # noqa: E402


class Overlap(Callback):
    """Tracks the number of trials running at once (start..complete/error intervals)."""

    def __init__(self):
        self.running, self.peak, self.started = set(), 0, {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self.peak = max(self.peak, len(self.running))
        self.started[trial.trial_id] = time.perf_counter()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)

    on_trial_error = on_trial_complete


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default="search_spaces/kd.yaml")
    parser.add_argument("--gpu-per-trial", type=float, default=0.25)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--storage", default="results/bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: this benchmark needs one")
        return 1
    cfg = load_config(args.space, {"resources.gpu_per_trial": args.gpu_per_trial, "resources.cpu_per_trial": 1,
                                   "search.num_samples": args.num_samples, "scheduler.type": "none",
                                   "train.epochs": args.epochs, "train.device": "cuda",
                                   "name": f"gpu-search-{int(time.time())}"})
    probe = Overlap()
    started = time.perf_counter()
    summary = run_search(cfg, args.space, storage=args.storage, callbacks=[probe], export_best=False,
                         dashboard_host=None)   # the GPU image lacks the dashboard's packages
    wall = time.perf_counter() - started
    print(f"device: {torch.cuda.get_device_name(0)}")
    print(f"gpu_per_trial {args.gpu_per_trial}: max_concurrent set to {summary['parallel']}, "
          f"trials running at the same time (peak): {probe.peak} (goal: {int(1 / args.gpu_per_trial)})")
    print(f"{args.num_samples} trials x {args.epochs} epochs: wall {wall:.1f} s (search {summary['seconds']:.1f} s)")
    return 0 if probe.peak >= int(1 / args.gpu_per_trial) else 1


if __name__ == "__main__":
    raise SystemExit(main())
