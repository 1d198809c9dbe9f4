"""The Ray adapter: a sampled config -> loop.train, with a report() that calls tune.report.

Each epoch end reports every metric of loop.METRICS plus a checkpoint of the student (a Hugging
Face directory that is also resumable). A retried or restored trial continues from
tune.get_checkpoint(). The trial reads the teacher and the tokenized data from the disk caches the
driver built; only the small config travels through Ray.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import signal
import tempfile
from unittest import mock
from pathlib import Path

from tune_kd import loop, space
from tune_kd.config import ExperimentConfig


FAULT_FILE_ENV = "TUNE_KD_FAULT_FILE"
FAULT_KINDS = ("error", "oom", "kill", "nan", "disk_full")


def take_fault(epoch: int, step: int | None) -> str | None:
    """Fire drill for the fault-tolerance tests; does nothing unless $TUNE_KD_FAULT_FILE names a JSON
    list of plans {"kind": one of FAULT_KINDS, "epoch": N, "step": S or absent, "times": K}. A plan
    fires K times in all (across trials and retries): at step S of epoch N, or at epoch N's report
    when it has no step. Each firing records the trial that took it under "fired_by"."""
    path = os.environ.get(FAULT_FILE_ENV)
    if not path or not Path(path).is_file():
        return None
    with open(path, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        plans = json.load(handle)
        plan = next((p for p in plans if p["epoch"] == epoch and p.get("step") == step and p["times"] > 0), None)
        if plan is None:
            return None
        plan["times"] -= 1
        plan.setdefault("fired_by", []).append(_trial_id())
        handle.seek(0)
        handle.truncate()
        json.dump(plans, handle)
    return plan["kind"]


def _trial_id() -> str:
    from ray import tune

    try:
        return tune.get_context().get_trial_id()
    except Exception:   # outside a Tune trial
        return str(os.getpid())


def fire(kind: str, where: str, student=None) -> contextlib.AbstractContextManager:
    """Act out one fault: raise, die, poison the weights, or return a context in which writes hit a full disk."""
    if kind == "error":
        raise RuntimeError(f"injected fault {where} ({FAULT_FILE_ENV})")
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected {where}, {FAULT_FILE_ENV})")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "nan" and student is not None:
        import torch

        with torch.no_grad():
            next(student.parameters()).fill_(float("nan"))
    if kind == "disk_full":
        import torch

        full = OSError(errno.ENOSPC, "No space left on device (injected)")
        return mock.patch.object(torch, "save", side_effect=full)
    return contextlib.nullcontext()


def make_trainable(base: ExperimentConfig):
    """A function trainable for ray.tune that trains `base` with each trial's sampled values.

    A diverged trial (loss NaN/inf) reports once more, with the worst metric value and a `diverged`
    reason, and ends: ASHA and the searcher see a bad trial, and retrying would only diverge again."""

    def distill_trial(point: dict) -> None:
        import ray
        from ray import tune

        from tune_kd.models import quiet_progress_bars

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        quiet_progress_bars()
        cfg = space.apply_point(base, point)
        reached = {"epoch": 0}
        node_id = ray.get_runtime_context().get_node_id()

        def report(metrics: dict, save) -> None:
            kind = take_fault(metrics["epoch"], None)
            drill = fire(kind, f"at the epoch {metrics['epoch']} report") if kind else contextlib.nullcontext()
            with tempfile.TemporaryDirectory(prefix="tune_kd-ckpt-") as tmp, drill:
                save(Path(tmp))
                # node_id: which Ray node ran this epoch (result.json's node_ip is shared by nodes on one host)
                tune.report({**metrics, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(tmp))
            reached["epoch"] = metrics["epoch"]

        def step_hook(epoch: int, step: int, student) -> None:
            kind = take_fault(epoch, step)
            if kind:
                fire(kind, f"at epoch {epoch} step {step}", student)

        checkpoint = tune.get_checkpoint()
        try:
            if checkpoint is None:
                loop.train(cfg, report=report, use_wandb=False, step_hook=step_hook)
                return
            with checkpoint.as_directory() as resume_dir:
                # load_checkpoint reads everything it needs before training starts
                loop.train(cfg, report=report, resume_from=resume_dir, use_wandb=False, step_hook=step_hook)
        except loop.TrainingDiverged as exc:
            logging.getLogger(__name__).error("trial stopped: %s", exc)
            worst = math.inf if cfg.metric.mode == "min" else -math.inf
            tune.report({"epoch": reached["epoch"] + 1, cfg.metric.name: worst, "diverged": str(exc)})

    return distill_trial
