"""The Ray adapter: a sampled config -> loop.train, with a report() that calls tune.report.

Each epoch end reports every metric of loop.METRICS plus a checkpoint of the student (a Hugging
Face directory that is also resumable). A retried or restored trial continues from
tune.get_checkpoint(). The trial reads the teacher and the tokenized data from the disk caches the
driver built; only the small config travels through Ray.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path

from tune_kd import loop, space
from tune_kd.config import ExperimentConfig


FAULT_FILE_ENV = "TUNE_KD_FAULT_FILE"


def inject_fault(epoch: int) -> None:
    """Fire drill for fault-tolerance tests: when $TUNE_KD_FAULT_FILE names a JSON file
    {"epoch": N, "times": K}, the first K reports at epoch N (across all trials) raise, as a
    crash before that epoch's checkpoint would. Without the variable this does nothing."""
    path = os.environ.get(FAULT_FILE_ENV)
    if not path or not Path(path).is_file():
        return
    with open(path, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        plan = json.load(handle)
        if plan["epoch"] != epoch or plan["times"] <= 0:
            return
        plan["times"] -= 1
        handle.seek(0)
        handle.truncate()
        json.dump(plan, handle)
    raise RuntimeError(f"injected fault at epoch {epoch} ({FAULT_FILE_ENV})")


def make_trainable(base: ExperimentConfig):
    """A function trainable for ray.tune that trains `base` with each trial's sampled values."""

    def distill_trial(point: dict) -> None:
        from ray import tune

        from tune_kd.models import quiet_progress_bars

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        quiet_progress_bars()
        cfg = space.apply_point(base, point)

        def report(metrics: dict, save) -> None:
            inject_fault(metrics["epoch"])
            with tempfile.TemporaryDirectory(prefix="tune_kd-ckpt-") as tmp:
                save(Path(tmp))
                tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(tmp))

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            loop.train(cfg, report=report, use_wandb=False)
            return
        with checkpoint.as_directory() as resume_dir:
            # load_checkpoint reads everything it needs before training starts
            loop.train(cfg, report=report, resume_from=resume_dir, use_wandb=False)

    return distill_trial
