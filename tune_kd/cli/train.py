"""Single distillation run with the seed's flags: `tune-kd train [--config FILE] [flags]`
(or `python -m tune_kd.train`).

Teacher, student and data come from an experiment YAML (default: the embedded demo,
search_spaces/kd.yaml); the seed's flags override its `train`/`data`/`logging` settings. Under
`torchrun --nproc_per_node N -m tune_kd.train --ddp ...` it trains data-parallel (NCCL on GPU,
gloo on CPU) and only rank 0 logs and writes.

Output in --out_dir (default results/<name>/train): `last/` (resumable checkpoint, each epoch
and every --save_interval steps), `best/` (lowest val_ce so far; a Hugging Face model directory
that is also resumable) and metrics.jsonl. `--resume DIR` continues from a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

from tune_kd.cli import entry
from tune_kd.config.experiment import load_config

# flag -> dotted config key; a flag left out keeps the config's value.
FLAG_KEYS = {
    "epochs": "train.epochs", "batch_size": "train.batch_size", "learning_rate": "train.learning_rate",
    "device": "train.device", "dtype": "train.dtype", "use_wandb": "logging.wandb",
    "wandb_project": "logging.wandb_project", "num_workers": "train.num_workers",
    "accumulation_steps": "train.accumulation_steps", "grad_clip": "train.grad_clip",
    "warmup_iters": "train.warmup_iters", "log_interval": "train.log_interval",
    "save_interval": "train.save_interval", "data_path": "data.path", "alpha": "train.alpha",
    "temperature": "train.temperature", "seed": "train.seed",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    entry.add_config_argument(p)
    p.add_argument("--out_dir", help="where checkpoints go (default: results/<name>/train)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint directory (e.g. OUT_DIR/last)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--use_wandb", action="store_true", default=None, help="log to Weights & Biases")
    p.add_argument("--wandb_project")
    p.add_argument("--num_workers", type=int, help="DataLoader workers collating batches")
    p.add_argument("--ddp", action="store_true", help="data-parallel; launch with torchrun")
    p.add_argument("--accumulation_steps", type=int)
    p.add_argument("--grad_clip", type=float, help="max grad norm; 0 disables")
    p.add_argument("--warmup_iters", type=int, help="linear warmup steps before the cosine schedule")
    p.add_argument("--log_interval", type=int, help="optimizer steps between log lines")
    p.add_argument("--save_interval", type=int, help="optimizer steps between checkpoints (0: epoch ends only)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by older launchers; torchrun uses env vars")
    p.add_argument("--data_path", help="chat JSONL training file")
    p.add_argument("--alpha", type=float, help="CE weight: 1 = plain SFT, 0 = pure distillation")
    p.add_argument("--temperature", type=float, help="distillation temperature T")
    p.add_argument("--seed", type=int)


def run(args: argparse.Namespace) -> dict:
    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    cfg = load_config(args.config, overrides)
    from tune_kd.search.prepare import build_demo_after_checks

    build_demo_after_checks(cfg, args.config)  # file-locked: concurrent ranks wait for one build
    from tune_kd.train.loop import train

    out_dir = Path(args.out_dir or Path("results") / cfg.name / "train")
    best = {"val_ce": math.inf}

    def report(metrics: dict, save) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if metrics["val_ce"] < best["val_ce"]:
            best.update(metrics)
            save(out_dir / "best")

    result = train(cfg, report=report, resume_from=args.resume, out_dir=out_dir, ddp=args.ddp)
    if args.ddp:
        import torch.distributed as dist

        # every rank leaves together: rank 0 still writes its checkpoints after the last collective, and a
        # rank that tears down its process group meanwhile can abort in gloo's threads
        dist.barrier()
    if rank(args) == 0:
        m = result.metrics
        print(f"done: epoch {m['epoch']} val_ce {m['val_ce']:.4f} val_kl {m['val_kl']:.4f} "
              f"val_acc {m['val_acc']:.3f}; best val_ce {best['val_ce']:.4f} -> {out_dir / 'best'}")
    return result.metrics


def rank(args: argparse.Namespace) -> int:
    """This process's rank: RANK under torchrun with --ddp, else 0."""
    return int(os.environ.get("RANK", 0)) if args.ddp else 0


def command(args: argparse.Namespace) -> None:
    try:
        run(args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def log_level(args: argparse.Namespace) -> int:
    """Only rank 0 logs progress; the other ranks say only what goes wrong."""
    return logging.INFO if rank(args) == 0 else logging.WARNING


def main(argv: list[str] | None = None) -> int:
    return entry.run("train", __doc__, add_arguments, command, argv, log_level)


if __name__ == "__main__":
    raise SystemExit(main())
