"""Everything a search does before its first trial: `tune-kd prepare --config FILE.yaml`.

Validates the inputs, tokenizes the data into the shared cache and builds the teacher cache when it
applies (search/prepare.py), so a search after it starts its trials at once.
"""

from __future__ import annotations

import argparse

from tune_kd.cli import entry
from tune_kd.config.experiment import load_config
from tune_kd.search.prepare import prepare_inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    entry.add_config_argument(parser)
    parser.add_argument("--storage", help="the results root the search will use (its --storage): the caches go "
                                          "under it unless data.cache_dir says otherwise (default: results)")
    parser.add_argument("--workers", type=int, help="override data.workers (ingestion processes; 0: one per core)")


def command(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, {"data.workers": args.workers} if args.workers is not None else {},
                      storage=args.storage)
    prepared = prepare_inputs(cfg, args.config)
    print("\n".join(prepared.lines))
    print(f"prepared in {prepared.seconds:.1f} s: `python -m tune_kd.search --space {args.config}` now starts its "
          "trials at once")


def main(argv: list[str] | None = None) -> int:
    return entry.run("prepare", __doc__, add_arguments, command, argv)
