"""Does on-policy distillation help on the embedded default? One config, only the share varies.

    python bench/on_policy_fraction.py [--fractions 0 0.25 0.5 1] [--seeds 0] [--epochs 3]
    python bench/on_policy_fraction.py --smoke    # seconds: a toy demo in a scratch folder (tests/bench)

search_spaces/kd_on_policy.yaml's own train settings (lr 3e-3, T 2, alpha 0.5, 6000 conversations,
3 epochs, generation temperature 1) trained once per train.on_policy_fraction and seed, plus plain
SFT (alpha 1, no teacher) as the reference, every run judged on the same 200 validation prompts
(eval.generation_samples): val_gen_acc (exact greedy replies), val_gen_ce (the teacher's CE on the
student's greedy replies), and val_ce / val_acc (teacher-forced) at the last epoch, with the run's
seconds. A controlled comparison: the search (kd_on_policy.yaml) varies lr, T and alpha as well.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_kd.config.experiment import load_config
from tune_kd.search import demo
from tune_kd.train.loop import train

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("val_gen_acc", "val_gen_ce", "val_ce", "val_acc")
SMOKE_OVERRIDES: dict = {}     # --smoke: the YAML pointed at a toy demo (bench/_smoke.py), fewer prompts


def run(args, seed: int, **train_overrides) -> dict:
    overrides = {"train.epochs": args.epochs, "train.seed": seed, "train.log_interval": 10_000,
                 **{f"train.{k}": v for k, v in train_overrides.items()}, **SMOKE_OVERRIDES}
    cfg = load_config(REPO / "search_spaces" / "kd_on_policy.yaml", overrides, storage=args.storage)
    started = time.perf_counter()
    metrics = train(cfg, use_wandb=False).metrics
    return {**{k: metrics[k] for k in COLUMNS}, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--storage", default=str(REPO / "results"))
    parser.add_argument("--smoke", action="store_true", help="seconds: fraction 0.5 and plain SFT, 1 epoch on 32 "
                        "conversations of a toy demo (untrained tiny teacher), 8 prompts, in a scratch folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        import _smoke

        folder = _smoke.scratch("on-policy-fraction")
        SMOKE_OVERRIDES.update(_smoke.demo_overrides(_smoke.tiny_demo(folder / "demo"), "train.jsonl"),
                               **{"data.max_train_examples": 32, "eval.generation_samples": 8,
                                  "train.max_new_tokens": 4})
        args.fractions, args.seeds, args.epochs, args.storage = [0.5], [0], 1, str(folder)
    else:
        demo.prepare()
    arms = {f"on_policy_fraction {f:g}": {"on_policy_fraction": f} for f in args.fractions}
    arms["plain SFT (alpha 1)"] = {"alpha": 1.0, "on_policy_fraction": 0.0}
    rows = {}
    for name, overrides in arms.items():
        rows[name] = [run(args, seed, **overrides) for seed in args.seeds]
        print(f"# {name}: " + ", ".join(f"{k} {statistics.fmean(r[k] for r in rows[name]):.4f}"
                                       for k in (*COLUMNS, "seconds")), flush=True)
    print(f"\nkd_on_policy.yaml's train settings, {args.epochs} epochs, seeds {args.seeds}, 200 validation prompts "
          "(mean over seeds, last epoch):\n")
    print("| run | " + " | ".join(COLUMNS) + " | seconds |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for name, results in rows.items():
        cells = [f"{statistics.fmean(r[k] for r in results):.4f}" for k in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.fmean(r['seconds'] for r in results):.0f} |")


if __name__ == "__main__":
    main()
