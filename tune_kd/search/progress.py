"""Live progress in the terminal: one line per trial epoch, one line for the whole search.

    trial 0fef1808 epoch 2/3  val_ce 1.0712  (learning_rate 0.0041, temperature 2.31, alpha 0.207)
    search: 5/8 trials done (3 stopped early), 2 running | best val_ce 1.0253 (trial 0fef1808) | 2m10s, ~1m30s left

The search line comes when a trial ends, and otherwise at most every `every_s` seconds. Its
estimate counts the trial-epochs still to run (unfinished trials are expected to run as many
epochs as the finished ones did on average, ASHA's stops included) at the mean epoch time so far,
spread over the trials that run at once. A resumed search counts on from where the killed one was
(get_state / set_state, saved by Tune with the experiment state).
"""

from __future__ import annotations

import math
import statistics
import sys
import time

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


def last_error_line(trial) -> str:
    """The exception line of a failed trial's error file, and where the rest is."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [line for line in open(path).read().splitlines() if line.strip()] if path else []
    except OSError:
        lines = []
    return f"{lines[-1].strip()} (full error: {path})" if lines else "see the trial's folder"


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

    def setup(self, **info) -> None:
        # a resumed search runs the callback pickled into tuner.pkl when the search was first built
        self.started = self.last_line = time.monotonic()

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

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished[trial.trial_id] = "failed"
        self._print(f"trial {trial.trial_id} failed: {last_error_line(trial)}")
        self._print(self.status_line(trials))

    def status_line(self, trials) -> str:
        self.last_line = time.monotonic()
        # a trial that just ended can still read RUNNING while its own callback runs
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in self.finished)
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
