"""Ctrl-C (SIGINT) and SIGTERM (a scheduler's stop) during a search: stop cleanly, say how to resume.

What the user sees is one line on stderr and exit code 130 (cli/entry.py prints it):

    interrupted: 3 of 4 trials finished; resume with: python -m tune_kd.search --space kd.yaml --resume

Two pieces:

guarded(run_search) (runner.py's decorator), guard(cfg, experiment_dir, resume)   around the whole
    search. Either signal becomes a KeyboardInterrupt (SIGTERM would otherwise kill the driver on
    the spot, with no cleanup; take_sigterm_back restores that after ray.init, which takes SIGTERM
    for itself); when one ends the search, the guard closes the study's RUNNING Optuna trials as FAIL
    (user attribute `interrupted`), removes what a fresh search wrote before Ray saved any state
    (then the same command starts over, where --resume would find nothing to resume), and raises
    SearchInterrupted with the line. It writes no summary: trials.csv, best.json, best_student,
    controls.json and report.html are written only by a search whose trials all finished.
fit(tuner)   tuner.fit() for the search's trials (runner.fit) and for the control arms (controls.py).
    The first signal is a graceful stop: Ray ends the trials, saves the experiment state one last
    time (so --resume continues each interrupted trial from its last epoch checkpoint) and returns;
    then fit raises KeyboardInterrupt for the guard. A second signal stops at once (Ray's periodic
    save remains).

How Ray 2.60 is driven (ray/tune/tune.py, _setup_signal_catching): tune.run installs its own SIGINT
handler unless TUNE_DISABLE_SIGINT_HANDLER=1, and always points SIGUSR1 at the same graceful-stop
handler, which sets the event its loop polls and logs advice (`Tuner.restore(...)`) that is wrong for
our users. So fit sets TUNE_DISABLE_SIGINT_HANDLER=1, takes SIGINT and SIGTERM itself, forwards the
stop as SIGUSR1, and quiets the `ray.tune` loggers once stopping. Everything is restored afterwards.

A resumed Ray trial whose Optuna trial was closed here reports to a new Optuna trial (user
attribute `retry_of`), as an errored trial re-run by --retry-errored does (searcher.py): the study
holds no RUNNING trial at any stop and agrees with trials.csv after the resumed search.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

from tune_kd.config.experiment import ExperimentConfig
from tune_kd.results.arms import CONTROLS_DIR

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FINISHED = ("TERMINATED", "ERROR")   # Ray trial statuses a resume does not run again (ERROR: unless --retry-errored)
INTERRUPTED_ATTR = "interrupted"     # user attribute of an Optuna trial closed by an interrupt


class SearchInterrupted(KeyboardInterrupt):
    """A search ended by Ctrl-C or SIGTERM; args[0] is the one line for the terminal (exit code 130)."""


# ----------------------------------------------------------------------------------------------
# Around the whole search
# ----------------------------------------------------------------------------------------------

def guarded(run_search):
    """run_search inside guard(): the decorator reads cfg, storage and resume from its arguments (by
    name, as runner.run_search declares them), so the search's own steps read as they always did."""
    signature = inspect.signature(run_search)

    @functools.wraps(run_search)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        experiment_dir = Path(options["storage"] or "results").resolve() / options["cfg"].name   # run_search's own
        with guard(options["cfg"], experiment_dir, options["resume"]):
            return run_search(*args, **kwargs)

    return run


@contextlib.contextmanager
def guard(cfg: ExperimentConfig, experiment_dir: Path, resume: bool):
    """Run the block with SIGINT and SIGTERM as KeyboardInterrupt; turn one into SearchInterrupted
    after cleaning up (module docstring). Signal handlers are set only on the main thread (Python
    allows no other); elsewhere the block runs as it is."""
    before = set(os.listdir(experiment_dir)) if experiment_dir.is_dir() else None
    previous = _install({s: _raise_interrupt for s in STOP_SIGNALS})
    try:
        yield
    except KeyboardInterrupt:
        _install({s: signal.SIG_IGN for s in STOP_SIGNALS})   # the cleanup below is short: let it finish
        line = stopped(cfg, experiment_dir, resume, before)
        raise SearchInterrupted(line) from None
    finally:
        _install(previous)


def stopped(cfg: ExperimentConfig, experiment_dir: Path, resume: bool, before: set[str] | None) -> str:
    """Leave the experiment resumable and honest after an interrupt; returns the line to print.
    before: the experiment folder's entries when the search began (None: there was no folder)."""
    statuses = trial_statuses(experiment_dir)
    if statuses is None and not resume:   # no Ray state yet: nothing to resume, so nothing to keep
        discard_new(experiment_dir, before)
        return (f"interrupted: 0 of {cfg.search.num_samples} trials finished; nothing was kept (finished caches "
                "are), so the same command starts over")
    if cfg.search.algorithm == "optuna":
        close_running_trials(experiment_dir / "optuna.db", cfg.name)
    finished = sum(s in FINISHED for s in (statuses or {}).values())
    arms = trial_statuses(experiment_dir / CONTROLS_DIR)
    done = f"{finished} of {cfg.search.num_samples} trials finished"
    if arms and finished >= cfg.search.num_samples:   # stopped in the control arms, after every trial
        done += f", {sum(s in FINISHED for s in arms.values())} of {len(arms)} control arms"
    return f"interrupted: {done}; resume with: {resume_command(sys.argv)}"


def trial_statuses(experiment_dir: Path) -> dict[str, str] | None:
    """Trial id -> Ray status from the newest experiment state Ray saved in experiment_dir; None when
    there is none (or it cannot be read: then the search cannot be resumed either)."""
    saved = sorted(Path(experiment_dir).glob("experiment_state-*.json"))
    if not saved:
        return None
    try:
        trials = [json.loads(state) for state, _ in json.loads(saved[-1].read_text())["trial_data"]]
        return {str(t["trial_id"]): str(t["status"]) for t in trials}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def discard_new(experiment_dir: Path, before: set[str] | None) -> None:
    """Remove what this run added to experiment_dir (experiment.json, a new optuna.db, ...): the whole
    folder when it made it."""
    if before is None:
        shutil.rmtree(experiment_dir, ignore_errors=True)
        return
    for name in set(os.listdir(experiment_dir)) - before if experiment_dir.is_dir() else ():
        path = experiment_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def close_running_trials(db: Path, study_name: str) -> list[int]:
    """Tell FAIL to every RUNNING Optuna trial of the study (user attribute `interrupted`: true), so
    TPE's constant liar does not count it for ever; returns their numbers. A resumed trial reports to
    a new Optuna trial (searcher.py's retry: user attribute `retry_of`)."""
    if not db.is_file():
        return []
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:   # the study was never created: Ray stopped before asking for a trial
        return []
    closed = []
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        closed.append(trial.number)
    return closed


def resume_command(argv: list[str]) -> str:
    """The command that resumes this search: the one typed (argv), with --resume and without
    --overwrite; "the same command and --resume" when this process was not started as a search
    command (a script calling run_search)."""
    program, args = Path(argv[0]) if argv else Path(), list(argv[1:])
    if program.parts[-3:] == ("tune_kd", "search", "__main__.py"):
        head = ["python", "-m", "tune_kd.search"]
    elif args[:1] == ["search"] and (program.name == "tune-kd" or program.parts[-2:] == ("tune_kd", "__main__.py")):
        head, args = (["tune-kd"] if program.name == "tune-kd" else ["python", "-m", "tune_kd"]) + ["search"], args[1:]
    else:
        return "the same command and --resume"
    args = [a for a in args if a != "--overwrite"]
    return shlex.join(head + args + ([] if "--resume" in args else ["--resume"]))


def take_sigterm_back() -> None:
    """Inside guard, SIGTERM as KeyboardInterrupt again: ray.init points SIGTERM at a handler that
    exits at once (ray/_private/worker.py), and its core worker installs a C++ one over it that
    dumps a stack and aborts; either would skip the cleanup. Outside guard (SIGINT not the guard's)
    nothing changes."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _raise_interrupt:
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _install(handlers: dict) -> dict:
    """Set signal handlers (main thread only; elsewhere nothing); returns the ones they replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}


# ----------------------------------------------------------------------------------------------
# Around Tuner.fit
# ----------------------------------------------------------------------------------------------

def fit(tuner):
    """tuner.fit() (its ResultGrid) where the first SIGINT or SIGTERM stops Ray gracefully (it saves
    its state, then fit raises KeyboardInterrupt) and a second one stops at once. Before Ray listens
    (tune.run sets its SIGUSR1 handler after building the experiment) a signal stops at once too."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    stop = GracefulStop()
    with stop.installed():
        grid = tuner.fit()
    if stop.signum is not None:
        raise KeyboardInterrupt
    return grid


class GracefulStop:
    """The signal handlers of one Tuner.fit (fit)."""

    def __init__(self):
        self.signum: int | None = None
        self.quiet = logging.getLogger("ray.tune")   # Ray's stop messages advise Tuner.restore: ours is --resume
        # SIGUSR1's handler until Ray sets its own: a stray SIGUSR1 must not kill the driver (its default)
        self.not_listening = lambda signum, frame: None

    @contextlib.contextmanager
    def installed(self):
        level, env = self.quiet.level, os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        previous = _install({signal.SIGUSR1: self.not_listening, **{s: self.handle for s in STOP_SIGNALS}})
        try:
            yield
        finally:
            _install(previous)
            self.quiet.setLevel(level)
            if env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env

    def handle(self, signum, frame) -> None:
        if self.signum is not None or signal.getsignal(signal.SIGUSR1) is self.not_listening:
            raise KeyboardInterrupt   # the second signal, or Ray is not listening yet
        self.signum = signum
        self.quiet.setLevel(logging.CRITICAL)
        signal.raise_signal(signal.SIGUSR1)   # Ray's graceful stop: end the trials, save the state, return
