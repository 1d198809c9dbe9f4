"""What an on-policy batch costs against an off-policy one, on the embedded default.

    python bench/on_policy_cost.py [--examples 1920] [--max-new-tokens 12] [--device auto]
    python bench/on_policy_cost.py --smoke    # seconds: a toy demo in a scratch folder (tests/bench)

One epoch of loop.train with train.on_policy_fraction 0.5 on the demo's student and teacher (the
search space's settings, search_spaces/kd.yaml), so both kinds of batch run in the same process,
interleaved, on the same data: the loop times each micro-batch by kind (generation included for an
on-policy one) and reports the means as off_policy_s_per_batch / on_policy_s_per_batch. A second
run at fraction 0 with the teacher cache off gives an off-policy batch with a live teacher (what an
on-policy batch needs anyway), so the ratio separates generation from the cache's saving.
Prints the figures and the ratios; --device cuda on a GPU machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_kd.config.experiment import load_config
from tune_kd.search import demo
from tune_kd.train.loop import train

REPO = Path(__file__).resolve().parents[1]
SMOKE_OVERRIDES: dict = {}     # --smoke: kd.yaml pointed at a toy demo (bench/_smoke.py)


def one_epoch(args, fraction: float, teacher_cache: str) -> dict:
    overrides = {"train.epochs": 1, "train.on_policy_fraction": fraction, "train.max_new_tokens": args.max_new_tokens,
                 "train.device": args.device, "data.max_train_examples": args.examples,
                 "teacher_cache.mode": teacher_cache, "train.log_interval": 10_000, **SMOKE_OVERRIDES}
    cfg = load_config(REPO / "search_spaces" / "kd.yaml", overrides, storage=args.storage)
    return train(cfg, use_wandb=False).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=1920, help="training conversations (64 per batch)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--storage", default=str(REPO / "results"))
    parser.add_argument("--smoke", action="store_true", help="seconds: 32 conversations of a toy demo (untrained "
                        "tiny teacher) in a scratch folder, 4 new tokens, on CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        import _smoke

        folder = _smoke.scratch("on-policy-cost")
        SMOKE_OVERRIDES.update(_smoke.demo_overrides(_smoke.tiny_demo(folder / "demo")))
        args.examples, args.max_new_tokens, args.device, args.storage = 32, 4, "cpu", str(folder)
    else:
        demo.prepare()
    mixed = one_epoch(args, 0.5, "auto")
    live = one_epoch(args, 0.0, "off")
    on, off, off_live = mixed["on_policy_s_per_batch"], mixed["off_policy_s_per_batch"], live["off_policy_s_per_batch"]
    print(f"on-policy cost, embedded default, {args.examples} conversations (batches of 64), max_new_tokens "
          f"{args.max_new_tokens}, device {args.device}:")
    print(f"  off-policy batch, teacher cache (fraction 0.5 run): {off * 1000:.1f} ms")
    print(f"  off-policy batch, live teacher (fraction 0 run):    {off_live * 1000:.1f} ms")
    print(f"  on-policy batch (generation + live teacher):        {on * 1000:.1f} ms")
    print(f"on-policy / off-policy step time: {on / off:.2f} (cached teacher), {on / off_live:.2f} (live teacher)")


if __name__ == "__main__":
    main()
