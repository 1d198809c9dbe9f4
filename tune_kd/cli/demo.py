"""The embedded default's world: `tune-kd demo` builds its data, tokenizer and teacher offline.

Each step is skipped when its output is already there (search/demo.py); --force rebuilds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tune_kd.cli import entry
from tune_kd.search.demo import DEMO_DIR, STUDENT_CONVERSATIONS, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=str(DEMO_DIR), help="where to build the demo (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a teacher is cached")


def command(args: argparse.Namespace) -> None:
    figures = prepare(Path(args.root), force=args.force)
    print(f"demo teacher: val_acc {figures['val_acc']:.3f}, val_ce {figures['val_ce']:.4f}, "
          f"prepared in {figures['prepare_seconds']:.0f} s -> {args.root}/teacher; the student's own set: "
          f"{STUDENT_CONVERSATIONS:,} conversations -> {args.root}/data/student.jsonl")


def main(argv: list[str] | None = None) -> int:
    return entry.run("demo", __doc__, add_arguments, command, argv)
