"""Best trial -> a Hugging Face model directory: `tune-kd export results/<name> --out DIR`.

--trial ID exports that trial's best epoch, --front every student on a size/quality front; each is
verified by reloading it (results/export.py).
"""

from __future__ import annotations

import argparse

from tune_kd.cli import entry
from tune_kd.results.export import export, export_front


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="the experiment folder, results/<name>")
    parser.add_argument("--out", required=True, help="where to write the Hugging Face model directory (with "
                                                     "--front: a folder of them)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--trial", help="export this trial's best epoch instead of the overall best")
    which.add_argument("--front", action="store_true",
                       help="export every student on a size/quality search's front, cheapest first")


def command(args: argparse.Namespace) -> None:
    if args.front:
        for c, target in export_front(args.experiment, args.out):
            print(f"exported trial {c.trial_id} epoch {c.metrics.get('epoch')} -> {target} (reload verified)")
        return
    c = export(args.experiment, args.out, args.trial)
    print(f"exported trial {c.trial_id} epoch {c.metrics.get('epoch')} -> {args.out} (reload verified)")


def main(argv: list[str] | None = None) -> int:
    return entry.run("export", __doc__, add_arguments, command, argv)
