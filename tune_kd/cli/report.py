"""The experiment report: `tune-kd report results/<name>` writes results/<name>/report.html.

Rebuilt from what is on disk (results/report.py), so it also works on an interrupted experiment.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tune_kd.cli import entry
from tune_kd.results.reading import experiment_dirs
from tune_kd.results.report import build


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="the experiment folder, results/<name>")


def command(args: argparse.Namespace) -> None:
    for directory in experiment_dirs(Path(args.experiment)):
        print(f"report: {build(directory)}")


def main(argv: list[str] | None = None) -> int:
    return entry.run("report", __doc__, add_arguments, command, argv)
