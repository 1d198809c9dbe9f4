"""The search: `tune-kd search --space FILE.yaml` (or `python -m tune_kd.search`).

Runs Ray Tune with Optuna's TPE and ASHA over the YAML's `parameters:` (search/runner.py), a chain
of searches for a `stages:` YAML (search/stages.py); --resume continues an interrupted search.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from tune_kd.cli import entry
from tune_kd.config.errors import UserError
from tune_kd.config.experiment import load_config
from tune_kd.config.files import DiskFullError
from tune_kd.search.preflight import LOOPBACK
from tune_kd.search.runner import run_search, trials_out_of_room

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    entry.add_config_argument(parser)
    parser.add_argument("--address", help="join a running Ray cluster (ray start --head ...), e.g. auto or host:6379")
    parser.add_argument("--storage", help="results root on storage every node sees (default: results)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this YAML")
    parser.add_argument("--retry-errored", action="store_true",
                        help="with --resume: run errored trials again (else they stay ERROR)")
    parser.add_argument("--overwrite", action="store_true", help="move an existing experiment of this name aside")
    parser.add_argument("--num-samples", type=int, help="override search.num_samples")
    parser.add_argument("--num-cpus", type=int, help="CPUs a local Ray may use (default: all)")
    parser.add_argument("--dashboard-host", default=LOOPBACK,
                        help="interface for the Ray dashboard (default: %(default)s; anything else warns, and needs "
                             "Ray's token authentication on)")
    parser.add_argument("--no-dashboard", action="store_true", help="start a local Ray without its dashboard")
    parser.add_argument("--no-export", action="store_true", help="skip exporting the best student")
    parser.add_argument("--trial-logs", action="store_true",
                        help="stream every trial's log lines here too (always in trial_*/stdout.log, stderr.log)")


def command(args: argparse.Namespace) -> None:
    overrides = {"search.num_samples": args.num_samples} if args.num_samples else {}
    cfg = load_config(args.config, overrides, storage=args.storage)
    if args.retry_errored and not args.resume:
        raise UserError("--retry-errored re-runs the errored trials of an interrupted or finished search: use it "
                        "with --resume")
    if args.storage and "://" in args.storage:
        raise UserError(f"--storage {args.storage}: give a filesystem path every node sees (an NFS or other "
                        "shared mount); the summary and export read trial files from it")
    experiment_dir = Path(args.storage or "results").resolve() / cfg.name
    if args.overwrite and experiment_dir.exists():
        aside = experiment_dir.with_name(f"{cfg.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(experiment_dir), aside)
        log.info("moved the previous experiment to %s", aside)
    options = {"address": args.address, "num_cpus": args.num_cpus, "trial_logs": args.trial_logs,
               "retry_errored": args.retry_errored,
               "dashboard_host": None if args.no_dashboard else args.dashboard_host}
    if cfg.stages:   # progressive distillation: a chain of searches (stages.py)
        from tune_kd.search import stages

        stages.run_stages(cfg, args.config, run_search, storage=args.storage, resume=args.resume, **options)
    else:
        summary = run_search(cfg, args.config, storage=args.storage, resume=args.resume,
                             export_best=not args.no_export, **options)
        full_disk = trials_out_of_room(summary["rows"])
        if full_disk:
            raise DiskFullError(full_disk)


def main(argv: list[str] | None = None) -> int:
    return entry.run("search", __doc__, add_arguments, command, argv)
