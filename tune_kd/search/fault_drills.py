"""Fire drills for the fault-tolerance tests: injected errors, OOMs, kills, NaN weights, full disks.

Test machinery that must run inside Ray's trial processes, so trainable.py calls it at every epoch
report (take_fault / fire) and optimizer step (fault_step_hook); it does nothing unless the
environment variable $TUNE_KD_FAULT_FILE names a JSON file of plans, which only tests write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
from pathlib import Path
from unittest import mock

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
    if kind not in FAULT_KINDS:
        raise ValueError(f"{FAULT_FILE_ENV}: unknown fault kind {kind!r} (allowed: {', '.join(FAULT_KINDS)})")
    return contextlib.nullcontext()


def fault_step_hook(where: str):
    """loop.train's step_hook for the fault drills: fires a plan planned for this epoch and step."""
    def step_hook(epoch: int, step: int, student) -> None:
        kind = take_fault(epoch, step)
        if kind:
            fire(kind, f"at epoch {epoch} step {step}{where}", student)
    return step_hook
