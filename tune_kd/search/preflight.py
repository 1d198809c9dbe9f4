"""What a search checks before Ray starts (search/runner.py calls `preflight` first): the
dashboard's exposure, search.warm_start's earlier search, the GPUs of this machine, an experiment
already in the folder or one to resume, a resume's changed config; then the inputs validated and
tokenized once (prepare.py: data errors name file:line; trials read the cache) and experiment.json
written.

A folder a search was started in but whose trials never began (the cache build ran out of disk, a
bad teacher, Ctrl-C before the first trial) holds experiment.json and no Ray state (tuner.pkl):
the same command starts it afresh, with or without --resume, so a fixed problem costs no
--overwrite.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.config.files import atomic_write_text
from tune_kd.model import student_shape
from tune_kd.results import export, reading
from tune_kd.search import prepare, resources
from tune_kd.search.warm_start import WarmStart, read_warm_start

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
RAY_STATE_FILE = "tuner.pkl"     # Ray Tune writes it when the Tuner is made: the search's trials began


def check_dashboard(host: str | None) -> None:
    """Ray's dashboard accepts jobs: reachable from the network without a token it is remote code
    execution. Loopback is the default; another host needs Ray's token authentication left on
    (Ray 2.5x turns it on for a new local cluster unless RAY_AUTH_MODE says otherwise) and warns."""
    if host is None or host in (LOOPBACK, "localhost", "::1"):
        return
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise UserError(f"--dashboard-host {host}: RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']} would expose the Ray "
                        "dashboard without authentication (anyone who reaches it can run code here); unset "
                        f"RAY_AUTH_MODE to keep token authentication, or leave the dashboard on {LOOPBACK}")
    log.warning("WARNING: the Ray dashboard listens on %s, reachable from other machines; it is protected only "
                "by Ray's token (`ray get-auth-token`): share it with no one, or use an SSH tunnel to %s instead",
                host, LOOPBACK)


def resume_or_start(experiment_dir: Path, resume: bool) -> bool:
    """Whether the search resumes (True) or starts (False) in experiment_dir; a UserError for a
    fresh start over a search whose trials began, or a resume of a folder where none was started."""
    began = (experiment_dir / RAY_STATE_FILE).is_file()
    started = (experiment_dir / reading.EXPERIMENT_FILE).is_file()
    if began and not resume:
        raise UserError(f"{experiment_dir} already holds an experiment: continue it with --resume, or start over "
                        "with --overwrite (the old one is moved aside)")
    if resume and not began:
        if not started:
            raise UserError(f"{experiment_dir}: nothing to resume (no search was started there): drop --resume to "
                            "start it, or give the --storage and name of the one to continue")
        log.info("%s: its trials never began (the last attempt stopped before them): starting it afresh", experiment_dir)
        return False
    return resume


def preflight(cfg: ExperimentConfig, source: str, experiment_dir: Path, address: str | None, resume: bool,
              dashboard_host: str | None) -> tuple[prepare.Prepared, bool, WarmStart | None]:
    """(what prepare_inputs found, whether the search resumes, search.warm_start's earlier trials for a
    fresh start): the module docstring's checks, in order."""
    from tune_kd.search.resume_checks import SEARCH_FORMAT, check_resume_config, check_resume_format

    check_dashboard(dashboard_host if address is None else None)
    warm = read_warm_start(cfg)   # before the inputs: a bad search.warm_start costs no tokenizing
    if address is None:
        import torch

        resources.check_gpus(cfg, torch.cuda.device_count(), source)
    resume = resume_or_start(experiment_dir, resume)
    if resume:
        check_resume_format(experiment_dir)
        check_resume_config(cfg, experiment_dir)
    prepared = prepare.prepare_inputs(cfg, source, teacher_cache=False)
    student_shape.check_teacher_for_init(cfg)   # searched init: teacher with a teacher it cannot copy
    for line in prepared.lines:
        log.info("%s", line)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(experiment_dir / reading.EXPERIMENT_FILE, json.dumps(
            {"name": cfg.name, "source": source, "search_format": SEARCH_FORMAT,
             "metric": {"name": cfg.metric.name, "mode": cfg.metric.mode},
             "config": cfg.to_dict(), "versions": export.versions(), "command": sys.argv}, indent=1, default=str))
    return prepared, resume, None if resume else warm   # a resumed study holds the earlier trials already
