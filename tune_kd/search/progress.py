"""Live progress in the terminal: one line per trial epoch, one line for the whole search.

    trial 0fef1808 epoch 2/3  val_ce 1.0712  (learning_rate 0.0041, temperature 2.31, alpha 0.207)
    search: 5/8 trials done (3 stopped early), 2 running | best val_ce 1.0253 (trial 0fef1808) | 2m10s, ~1m30s left

The search line comes when a trial ends, and otherwise at most every `every_s` seconds. Its
estimate counts the trial-epochs still to run (unfinished trials are expected to run as many
epochs as the finished ones did on average, ASHA's stops included) at the mean epoch time so far,
spread over the trials that run at once. A resumed search counts on from where the killed one was
(get_state / set_state, saved by Tune with the experiment state).

A trial that fails (its worker killed, out of memory, an exception) is one line, instead of the
traceback Ray's tune controller logs and the raylet's paragraph on the dead worker:

    trial 740e074a: worker died (pid 24745 exited unexpectedly: killed, out of memory or crashed); retrying from epoch 1 (retry 1 of 1; full error: .../error.txt)
    trial 740e074a failed after 1 retry: worker died (...) (full error: .../error.txt)

and the search line counts a trial being retried as running. The full error stays in the trial's
error.txt, which Tune writes whatever the terminal shows.

The search's last line says where its wall time went (runner.run_search times its steps with `timed`):

    search: 2752 s: preflight 29 s (1%), ray start 32 s (1%), size trials 222 s (8%), trials 914 s (33%), ...
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import statistics
import sys
import time
from pathlib import Path

from ray.tune import Callback

TRIAL_LOG_FILES = ("stdout.log", "stderr.log")


def trial_log_options() -> dict:
    """tune.RunConfig options that put each trial's own output in its folder (the trial's working
    directory, synced to storage as an artifact); the terminal gets this module's lines instead,
    unless the search runs with --trial-logs."""
    from ray import tune

    return {"log_to_file": TRIAL_LOG_FILES, "sync_config": tune.SyncConfig(sync_artifacts=True)}


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------
# A failed trial in one line
# ----------------------------------------------------------------------------------------------

# Ray 2.60's TuneController logs each trial failure here, as "Trial task failed for trial <name>"
# with the exception's traceback (tune_controller.py, _trial_task_failure)
CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"
CONTROLLER_FAILURE = "Trial task failed for trial"
# how Ray words an actor whose process is gone (ActorDiedError's text, in the trial's error.txt); not
# "The actor died because of an error raised in its creation task", which is an exception like any other
WORKER_DIED = ("died unexpectedly", "worker process has died", "its node has died")
_trial_pids: set[int] = set()   # the trial workers this driver has heard from (each result carries its pid)


def last_failure(trial) -> str:
    """The text of the trial's latest failure: the last block of its error file (Tune appends one
    "Failure # N (occurred at ...)" block per failure); "" when there is none."""
    path = getattr(trial, "error_file", None)
    try:
        text = open(path).read() if path else ""
    except OSError:
        text = ""
    return re.split(r"^Failure # \d+ \(occurred at [^)]*\)$", text, flags=re.M)[-1].strip()


def death_reason(text: str) -> str:
    """A dead worker's cause in a few words, from the text of Ray's ActorDiedError."""
    pid = re.search(r"\bpid[:=] ?(\d+)", text)
    who = f"pid {pid.group(1)}" if pid else "its process"
    code = re.search(r"exit code (-?\d+)", text)
    if "its node has died" in text:
        return f"{who}: its node died"
    if "low on memory" in text:
        return f"{who} killed by Ray's memory monitor: the node ran low on memory"
    if "SIGKILL" in text:
        return f"{who} received SIGKILL"
    if code:
        return f"{who} exited with code {code.group(1)}"
    return f"{who} exited unexpectedly: killed, out of memory or crashed"


def failure_reason(text: str) -> str:
    """`worker died (<cause>)` for a dead worker, else the exception's own line (the text's last)."""
    if any(marker in text for marker in WORKER_DIED):
        return f"worker died ({death_reason(text)})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error recorded (see the trial's folder)"


def error_path(trial) -> str | None:
    """Where the user finds the trial's error file: in its folder in the search's storage (Tune
    syncs it there), not the driver's staging copy in Ray's session folder that Tune writes first."""
    local, stored = getattr(trial, "error_file", None), getattr(trial, "path", None)
    return f"{stored}/{Path(local).name}" if local and stored else local


def last_error_line(trial) -> str:
    """The reason of a failed trial's latest failure, and where the rest is."""
    text = last_failure(trial)
    return f"{failure_reason(text)} (full error: {error_path(trial)})" if text else "see the trial's folder"


def checkpoint_epoch(trial) -> int | None:
    """The epoch of the trial's latest checkpoint (where a retry resumes), None before the first."""
    metrics = getattr(getattr(trial, "latest_checkpoint_result", None), "metrics", None) or {}
    return metrics.get("epoch")


def retry_line(trial) -> str:
    """The line for a failed trial that Tune retries."""
    epoch = checkpoint_epoch(trial)
    failures, limit = getattr(trial, "num_failures", 1), getattr(trial, "max_failures", -1)
    # Tune does not count a preempted node's loss against max_failures
    count = f"retry {failures}{f' of {limit}' if limit >= 0 else ''}; " if failures > 0 else ""
    return (f"trial {trial.trial_id}: {failure_reason(last_failure(trial))}; retrying from "
            f"{f'epoch {epoch}' if epoch else 'the start'} ({count}full error: {error_path(trial)})")


class TrialFailureFilter(logging.Filter):
    """Drops Tune's record of a trial failure (its message and traceback: some 25 lines for a
    killed worker), for which SearchProgress prints one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CONTROLLER_FAILURE)


def _is_trial_death(line: str) -> bool:
    pid = re.search(r"Worker PID: (\d+)", line)
    return line.startswith("A worker died or was killed") and pid is not None and int(pid.group(1)) in _trial_pids


def quiet_trial_failures() -> None:
    """Install, once per driver process, what keeps a trial failure to SearchProgress's one line:
    TrialFailureFilter on Tune's controller logger, and a wrapper on Ray's printer of the raylet's
    notes, which drops the paragraph on a dead worker whose pid is a trial's (the error listener
    thread prints through ray._private.worker.print_to_stdstream, looked up per call; a private
    name: if Ray moves it, the note simply shows again). Any other worker's death still shows."""
    controller = logging.getLogger(CONTROLLER_LOGGER)
    if not any(isinstance(f, TrialFailureFilter) for f in controller.filters):
        controller.addFilter(TrialFailureFilter())
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "tune_kd_quiet", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            data = {**data, "lines": [line for line in data.get("lines", []) if not _is_trial_death(line)]}
            if not data["lines"]:
                return None
        return original(data, *args, **kwargs)

    print_to_stdstream.tune_kd_quiet = True
    worker.print_to_stdstream = print_to_stdstream


# ----------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------


class SearchProgress(Callback):
    """A Tune callback printing the lines above (to stdout, flushed)."""

    def __init__(self, metric: str, mode: str, num_trials: int, epochs: int, parallel: int,
                 label: str = "search", every_s: float = 60.0):
        self.metric, self.mode, self.num_trials, self.epochs = metric, mode, num_trials, epochs
        self.parallel, self.label, self.every_s = max(1, parallel), label, every_s
        self.started = time.monotonic()
        self.last_line = self.started
        self.reached: dict[str, int] = {}        # trial id -> epochs reported
        self.finished: dict[str, str] = {}       # trial id -> "done" | "stopped" | "failed"
        self.epoch_seconds: list[float] = []
        self.best: tuple[float, str] | None = None
        self.retrying: set[str] = set()          # failed trials Tune is restarting from their checkpoint

    def setup(self, **info) -> None:
        # a resumed search runs the callback pickled into tuner.pkl when the search was first built
        self.started = self.last_line = time.monotonic()
        self.retrying = set()
        quiet_trial_failures()   # Tune calls setup in the driver, where its failures are logged

    def get_state(self) -> dict:
        """Saved by Tune with the experiment state; a resumed search gets it back through set_state,
        so its line counts on from where the killed run was."""
        return {"reached": dict(self.reached), "finished": dict(self.finished),
                "epoch_seconds": list(self.epoch_seconds), "best": self.best}

    def set_state(self, state: dict) -> None:
        self.reached, self.finished = dict(state["reached"]), dict(state["finished"])
        self.epoch_seconds, self.best = list(state["epoch_seconds"]), state["best"]

    def _print(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)   # looked up per call: the Tuner pickles its callbacks

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", 0))
        self.reached[trial.trial_id] = epoch
        self.retrying.discard(trial.trial_id)
        if isinstance(result.get("pid"), int):
            _trial_pids.add(result["pid"])
        if result.get("time_this_iter_s"):
            self.epoch_seconds.append(float(result["time_this_iter_s"]))
        config = dict(trial.config.get("control", trial.config))
        who = f"arm {config.pop('arm')}" if "arm" in config else f"trial {trial.trial_id}"   # a control arm: its name
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
            if better:
                self.best = (float(value), who)
        settings = ", ".join(f"{k} {short(v)}" for k, v in config.items())
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
        note = f"  diverged: {result['diverged']}" if result.get("diverged") else \
            f"  {result['rejected']}" if result.get("rejected") else ""
        self._print(f"{who} epoch {epoch}/{self.epochs}  {self.metric} {shown}  ({settings}){note}")
        if time.monotonic() - self.last_line >= self.every_s:
            self._print(self.status_line(trials))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished[trial.trial_id] = "done" if self.reached.get(trial.trial_id, 0) >= self.epochs else "stopped"
        self._print(self.status_line(trials))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.retrying.add(trial.trial_id)
        self._print(retry_line(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished[trial.trial_id] = "failed"
        self.retrying.discard(trial.trial_id)
        retries = getattr(trial, "num_failures", 1) - 1
        after = f" after {retries} retr{'y' if retries == 1 else 'ies'}" if retries > 0 else ""
        self._print(f"trial {trial.trial_id} failed{after}: {last_error_line(trial)}")
        self._print(self.status_line(trials))

    def status_line(self, trials) -> str:
        self.last_line = time.monotonic()
        # a trial that just ended can still read RUNNING while its own callback runs; one being
        # retried reads PENDING until its worker is back, but it is under way all the same
        running = sum(1 for t in trials if (t.status == "RUNNING" or t.trial_id in self.retrying)
                      and t.trial_id not in self.finished)
        stopped = sum(1 for state in self.finished.values() if state == "stopped")
        failed = sum(1 for state in self.finished.values() if state == "failed")
        counts = ", ".join(part for part in (f"{stopped} stopped early" if stopped else "",
                                             f"{failed} failed" if failed else "") if part)
        best = (f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best
                else f"no {self.metric} yet")
        elapsed = time.monotonic() - self.started
        left = self.seconds_left(trials)
        eta = f", ~{duration(left)} left" if left is not None else ""
        return (f"{self.label}: {len(self.finished)}/{self.num_trials} trials done"
                f"{f' ({counts})' if counts else ''}, {running} running | {best} | {duration(elapsed)}{eta}")

    def seconds_left(self, trials) -> float | None:
        if not self.epoch_seconds:
            return None
        ended = [self.reached.get(t, 0) for t, state in self.finished.items() if state != "failed"]
        expected = statistics.fmean(ended) if ended else float(self.epochs)
        unfinished = [t.trial_id for t in trials if t.trial_id not in self.finished]
        not_created = max(0, self.num_trials - len(trials))
        remaining = sum(max(0.0, max(expected, self.reached.get(t, 0)) - self.reached.get(t, 0)) for t in unfinished)
        remaining += not_created * expected
        return remaining * statistics.fmean(self.epoch_seconds) / self.parallel


# The search's steps as summary["phase_seconds"] names them: preflight (the inputs checked, the demo
# built and the data tokenized when missing), Ray started, size_trials (the teacher cache, a served
# teacher, the trials' resources), the trials (Tune's fit), the summary and export, the control arms,
# the teacher's own point, the verdict and report.html, Ray stopped.
PHASE_NAMES = ("preflight", "ray_start", "size_trials", "trials", "summary_export", "control_arms", "teacher_point",
               "report", "ray_stop")


@contextlib.contextmanager
def timed(phases: dict, name: str):
    """Add the block's wall seconds to phases[name]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - started


def phase_line(phases: dict) -> str:
    """The search's wall time and each step's share of it, e.g. `search: 212 s: trials 70 s (33%), ...`."""
    total = phases["total"]
    parts = [f"{name.replace('_', ' ')} {phases[name]:.0f} s ({100 * phases[name] / max(total, 1e-9):.0f}%)"
             for name in PHASE_NAMES if name in phases]
    return f"search: {total:.0f} s: " + ", ".join(parts)
