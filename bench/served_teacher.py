"""One served teacher against a teacher in every trial: memory, step time, batching, on-policy cost.

    python bench/served_teacher.py [--teacher-hidden 1024] [--teacher-layers 16] [--steps 6]
                                   [--trials 4] [--on-policy-examples 960]

Part 1, four concurrent trials of the demo search's shape (its student, data and batch of 64, one
epoch of --steps batches, teacher live: no teacher cache) with a teacher larger than the demo's (a
Llama of --teacher-hidden x --teacher-layers, random weights, saved once under
results/served-bench/), in three runs of --trials Ray tasks each: without a teacher (alpha 1: what a
trial costs by itself), each trial with its own teacher (today's layout), and every trial served by
one TeacherServer actor (teacher_server.py; its rows the full distribution of the demo's 103 ids).
Each trial samples its own PSS (/proc/self/smaps_rollup, every 0.2 s) and reports its peak; the
served run also samples the server's. A teacher's memory is what it adds over the teacher-less
trials: local = sum(trial peaks) - sum(teacher-less peaks); served = the same plus the server's peak.
Step time is the loop's off_policy_s_per_batch (from a batch's start to its backward's end, the
teacher's answer included), averaged over the trials.

Part 2, on-policy cost with a served teacher: one trial of search_spaces/kd.yaml with
on_policy_fraction 0.5 over --on-policy-examples conversations, its off-policy batches read from the
teacher cache (built first, as the search's driver does) and its on-policy batches scored by the
served teacher; beside it, the same trial holding its own teacher (bench/on_policy_cost.py's
figure). The loop times each batch by kind.

Prints a table and, last:
    served/local teacher memory (4 trials): X
    served/local trial step time: Y
    server batch occupancy: Z requests per teacher forward
    on-policy / cached off-policy batch: A (served teacher), B (own teacher)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tune_kd import demo  # noqa: E402
from tune_kd.config import absolute_paths, load_config  # noqa: E402

BENCH_DIR = REPO / "results" / "served-bench"
SAMPLE_SECONDS = 0.2


def pss_bytes(pid: str = "self") -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


class PeakPss(threading.Thread):
    """The largest PSS process `pid` reaches while running."""

    def __init__(self, pid: str = "self"):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, pss_bytes(self.pid))
            self.done.wait(SAMPLE_SECONDS)

    def __enter__(self) -> "PeakPss":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


def one_trial(cfg, key: str) -> dict:
    """A trial's loop.train in this Ray task, with its peak PSS and per-kind batch times."""
    from tune_kd import loop
    from tune_kd.models import quiet_progress_bars

    logging.basicConfig(level=logging.WARNING)
    quiet_progress_bars()
    with PeakPss() as peak:
        metrics = loop.train(cfg, use_wandb=False, trial_key=key).metrics
    return {"peak_pss": peak.peak, "off_policy_s_per_batch": metrics["off_policy_s_per_batch"],
            "on_policy_s_per_batch": metrics["on_policy_s_per_batch"]}


def save_big_teacher(hidden: int, layers: int) -> Path:
    """A random Llama teacher with the demo tokenizer's vocabulary, saved once (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = BENCH_DIR / f"teacher-h{hidden}-l{layers}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer

    demo_tokenizer = AutoTokenizer.from_pretrained(str(REPO / "results" / "demo" / "teacher"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(demo_tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=hidden // 64, intermediate_size=hidden * 8 // 3 // 64 * 64,
                                         max_position_embeddings=128, pad_token_id=demo_tokenizer.pad_token_id))
    model.to(torch.bfloat16).save_pretrained(target)
    demo_tokenizer.save_pretrained(target)
    return target


def demo_config(overrides: dict):
    return absolute_paths(load_config(REPO / "search_spaces" / "kd.yaml", overrides, storage=str(REPO / "results")),
                          REPO)


def small_val() -> str:
    """The first 64 validation conversations: an epoch's evaluation that does not dwarf its steps."""
    path = BENCH_DIR / "val64.jsonl"
    if not path.is_file():
        lines = (REPO / "results" / "demo" / "data" / "val.jsonl").read_text().splitlines()[:64]
        path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_trials(cfgs: list, serve_cfg=None, layout=None, cache_dir=None, server_cpus: float = 2.0) -> dict:
    """The trials as concurrent Ray tasks (half a CPU each), with a TeacherServer first when asked."""
    import ray

    from tune_kd import teacher_server

    ray.init(num_cpus=len(cfgs) // 2 + int(server_cpus) + 1, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        served, server_peak = None, None
        if serve_cfg is not None:
            served = teacher_server.start(serve_cfg, layout, cache_dir, [ray.get_runtime_context().get_node_id()],
                                          0.0, "bench")
            server_peak = PeakPss(str(ray.get(served.handles[0].info.remote())["pid"]))
            server_peak.start()
        task = ray.remote(num_cpus=0.5)(one_trial)
        started = time.perf_counter()
        results = ray.get([task.remote(cfg, str(i)) for i, cfg in enumerate(cfgs)])
        out = {"trials": results, "seconds": time.perf_counter() - started}
        if served is not None:
            server_peak.done.set()
            server_peak.join()
            stats = served.stats()[0]
            out.update(server_peak=server_peak.peak, occupancy=stats["requests"] / max(stats["forwards"], 1),
                       stats=stats)
            served.stop()
        return out
    finally:
        ray.shutdown()


def part_one(args) -> dict:
    from tune_kd.teacher_cache import layout

    teacher = save_big_teacher(args.teacher_hidden, args.teacher_layers)
    base = {"teacher.path": str(teacher), "teacher_cache.mode": "off", "train.epochs": 1,
            "data.max_train_examples": args.steps * 64, "data.val_path": small_val(), "train.log_interval": 10_000,
            "eval.generation_samples": 0, "teacher_server.cpus": 2.0}
    runs = {}
    for mode, extra in (("no teacher", {"train.alpha": 1.0}), ("own teacher", {}),
                        ("served teacher", {"teacher_server.mode": "on"})):
        cfgs = [demo_config({**base, **extra}) for _ in range(args.trials)]
        serve_cfg = cfgs[0] if mode == "served teacher" else None
        lay = layout(10**6, 103) if serve_cfg else None   # the demo's 103 ids: the full row
        runs[mode] = run_trials(cfgs, serve_cfg, lay)
        peaks = [t["peak_pss"] for t in runs[mode]["trials"]]
        steps = [t["off_policy_s_per_batch"] for t in runs[mode]["trials"]]
        print(f"  {mode:15s} trial peak PSS {sum(peaks) / 1e9:.2f} GB (sum of {len(peaks)}), server "
              f"{runs[mode].get('server_peak', 0) / 1e9:.2f} GB, step {sum(steps) / len(steps):.2f} s, "
              f"{runs[mode]['seconds']:.0f} s wall", flush=True)
    return runs


def part_two(args) -> dict:
    from tune_kd import cache_plan

    base = {"train.epochs": 1, "train.on_policy_fraction": 0.5, "train.max_new_tokens": 12,
            "data.max_train_examples": args.on_policy_examples, "data.val_path": small_val(),
            "train.log_interval": 10_000, "eval.generation_samples": 0, "teacher_cache.mode": "on",
            "teacher_server.cpus": 1.0}
    served_cfg = demo_config({**base, "teacher_server.mode": "on"})
    cache, _, lay = cache_plan.prepare_teacher_rows(served_cfg, serve=True)
    runs = {"served teacher": run_trials([served_cfg], served_cfg, lay, str(cache.directory), server_cpus=1.0),
            "own teacher": run_trials([demo_config(base)])}
    for mode, run in runs.items():
        trial = run["trials"][0]
        print(f"  {mode:15s} on-policy batch {trial['on_policy_s_per_batch'] * 1000:.0f} ms, cached off-policy "
              f"batch {trial['off_policy_s_per_batch'] * 1000:.0f} ms", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-hidden", type=int, default=1024)
    parser.add_argument("--teacher-layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="batches of 64 per trial in part 1")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--on-policy-examples", type=int, default=960)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    demo.prepare()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    print(f"part 1: {args.trials} concurrent trials, teacher Llama h{args.teacher_hidden} x {args.teacher_layers} layers "
          f"(bf16), {args.steps} batches of 64 each, teacher live:", flush=True)
    one = part_one(args)
    print("part 2: on-policy cost, one trial of the demo search, on_policy_fraction 0.5:", flush=True)
    two = part_two(args)
    no, own, served = (one[m] for m in ("no teacher", "own teacher", "served teacher"))
    alone = sum(t["peak_pss"] for t in no["trials"])
    local_memory = sum(t["peak_pss"] for t in own["trials"]) - alone
    served_memory = sum(t["peak_pss"] for t in served["trials"]) + served["server_peak"] - alone
    step = lambda run: sum(t["off_policy_s_per_batch"] for t in run["trials"]) / len(run["trials"])  # noqa: E731
    ratio = lambda trial: trial["on_policy_s_per_batch"] / trial["off_policy_s_per_batch"]  # noqa: E731
    figures = {"local_teacher_gb": local_memory / 1e9, "served_teacher_gb": served_memory / 1e9,
               "memory_ratio": served_memory / local_memory, "step_ratio": step(served) / step(own),
               "occupancy": served["occupancy"], "on_policy_served": ratio(two["served teacher"]["trials"][0]),
               "on_policy_own": ratio(two["own teacher"]["trials"][0]), "args": vars(args)}
    (BENCH_DIR / "figures.json").write_text(json.dumps({**figures, "part1": one, "part2": two}, indent=1, default=str))
    print(f"teacher memory: own {figures['local_teacher_gb']:.2f} GB over {args.trials} trials, served "
          f"{figures['served_teacher_gb']:.2f} GB (server {served['server_peak'] / 1e9:.2f} GB)")
    print(f"served/local teacher memory ({args.trials} trials): {figures['memory_ratio']:.3f}")
    print(f"served/local trial step time: {figures['step_ratio']:.3f}")
    print(f"server batch occupancy: {figures['occupancy']:.2f} requests per teacher forward")
    print(f"on-policy / cached off-policy batch: {figures['on_policy_served']:.2f} (served teacher), "
          f"{figures['on_policy_own']:.2f} (own teacher)")


if __name__ == "__main__":
    main()
