"""Ctrl-C and SIGTERM during a search (search/interrupt.py): exit 130 with one line, no summary of an
unfinished search, no RUNNING Optuna trial, every attempt's logs kept, and --resume finishes it.

The fast tests drive the pieces directly (Ray's own signal handler on a fake Tuner, a tmp study, tmp
folders); the slow ones signal a real search run as `python -m tune_kd.search`."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tune_kd.config.experiment import load_config
from tune_kd.search import interrupt, space
from tune_kd.search.interrupt import SearchInterrupted
from tune_kd.search.searcher import make_optuna_searcher
from tune_kd.search.trial_logs import keep_earlier_attempts

from conftest import check_study_agrees, search_raw

REPO = Path(__file__).resolve().parents[2]
FAKE_WORLD = {"tokenizer": "/nowhere/tokenizer", "train": "/nowhere/train.jsonl", "val": "/nowhere/val.jsonl",
              "cache": "/nowhere/cache", "teacher": "/nowhere/teacher"}


# ----------------------------------------------------------------------------------------------
# Around Tuner.fit: Ray 2.60's own handler, on a Tuner that only waits to be stopped
# ----------------------------------------------------------------------------------------------

class WaitingTuner:
    """fit() does what tune.run does with signals (ray.tune.tune._setup_signal_catching, the real
    one) and then loops until its stop event is set, as tune.run's loop does; `stop_with` signals
    this process from inside the loop (a Ctrl-C or a scheduler's SIGTERM) and `again` once more."""

    def __init__(self, stop_with: int, again: bool = False, before_ray_listens: bool = False):
        self.stop_with, self.again, self.before_ray_listens = stop_with, again, before_ray_listens
        self.stopped_gracefully = False

    def fit(self):
        import logging

        from ray.tune.tune import _setup_signal_catching

        if self.before_ray_listens:
            signal.raise_signal(self.stop_with)
        assert os.environ.get("TUNE_DISABLE_SIGINT_HANDLER") == "1"
        event = _setup_signal_catching()
        signal.raise_signal(self.stop_with)
        if self.again:
            signal.raise_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while not event.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stopped_gracefully = event.is_set()
        logging.getLogger("ray.tune.tune").warning("Resume experiment with: Tuner.restore(path=...)")   # as Ray does
        return "grid"


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_stops_ray_gracefully_then_interrupts(stop_with, capsys, caplog):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    tuner = WaitingTuner(stop_with)
    with pytest.raises(KeyboardInterrupt):
        interrupt.fit(tuner)
    assert tuner.stopped_gracefully                       # Ray's loop ended and saved (not cut short)
    assert "Tuner.restore" not in capsys.readouterr().err + caplog.text   # Ray's advice is not ours
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


def test_a_second_signal_or_one_before_ray_listens_stops_at_once():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    for tuner in (WaitingTuner(signal.SIGINT, again=True), WaitingTuner(signal.SIGTERM, before_ray_listens=True)):
        with pytest.raises(KeyboardInterrupt):
            interrupt.fit(tuner)
        assert not tuner.stopped_gracefully
        assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_fit_without_a_signal_returns_the_grid():
    class Plain:
        def fit(self):
            return "grid"

    assert interrupt.fit(Plain()) == "grid"


# ----------------------------------------------------------------------------------------------
# Around the search: what is kept, what the line says
# ----------------------------------------------------------------------------------------------

def ray_state(experiment: Path, statuses: dict[str, str]) -> None:
    """An experiment state file as Ray 2.60 writes it (only what interrupt.trial_statuses reads)."""
    trials = [[json.dumps({"trial_id": t, "status": s}), "{}"] for t, s in statuses.items()]
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trials}))


def test_a_fresh_search_stopped_before_ray_saved_anything_leaves_nothing(tmp_path):
    cfg = load_config(raw=search_raw(FAKE_WORLD, num_samples=4))
    experiment = tmp_path / cfg.name
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SearchInterrupted) as stop:
        with interrupt.guard(cfg, experiment, resume=False):
            experiment.mkdir()
            (experiment / "experiment.json").write_text("{}")
            os.kill(os.getpid(), signal.SIGTERM)          # a scheduler's stop, while the teacher cache builds
            time.sleep(5)
    assert stop.value.args[0].startswith("interrupted: 0 of 4 trials finished; nothing was kept")
    assert not experiment.exists()                        # the same command starts over (no "use --resume")
    assert signal.getsignal(signal.SIGTERM) == handler


def test_sigterm_is_a_ctrl_c_again_after_ray_init_took_it(tmp_path):
    """ray.init points SIGTERM at sys.exit (and its core worker at a C++ handler that aborts): the
    search takes it back (runner.start_ray), so a scheduler's stop while the caches build still
    cleans up and says so."""
    cfg = load_config(raw=search_raw(FAKE_WORLD, num_samples=4))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SearchInterrupted):
        with interrupt.guard(cfg, tmp_path / cfg.name, resume=False):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))   # what ray.init does
            interrupt.take_sigterm_back()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    interrupt.take_sigterm_back()                         # outside a search: SIGTERM is left alone
    assert signal.getsignal(signal.SIGTERM) == handler


def test_a_stopped_search_keeps_its_state_and_says_how_far_it_got(tmp_path, monkeypatch):
    cfg = load_config(raw=search_raw(FAKE_WORLD, num_samples=4))
    experiment = tmp_path / cfg.name
    experiment.mkdir()
    monkeypatch.setattr(sys, "argv", ["/x/tune_kd/search/__main__.py", "--space", "a b.yaml", "--overwrite"])
    with pytest.raises(SearchInterrupted) as stop:
        with interrupt.guard(cfg, experiment, resume=False):
            (experiment / "experiment.json").write_text("{}")
            ray_state(experiment, {"a": "TERMINATED", "b": "ERROR", "c": "RUNNING"})
            raise KeyboardInterrupt
    assert stop.value.args == ("interrupted: 2 of 4 trials finished; resume with: python -m tune_kd.search "
                               "--space 'a b.yaml' --resume",)
    assert (experiment / "experiment.json").is_file()

    ray_state(experiment, {t: "TERMINATED" for t in "abcd"})   # stopped in the control arms
    (experiment / "controls").mkdir()
    ray_state(experiment / "controls", {"x": "TERMINATED", "y": "RUNNING"})
    line = interrupt.stopped(cfg, experiment, True, set())
    assert line.startswith("interrupted: 4 of 4 trials finished, 1 of 2 control arms; resume with: ")


@pytest.mark.parametrize("argv, command", [
    (["/x/tune_kd/search/__main__.py", "--space", "s.yaml", "--resume"],
     "python -m tune_kd.search --space s.yaml --resume"),
    (["/usr/bin/tune-kd", "search", "--space", "s.yaml", "--num-samples", "8"],
     "tune-kd search --space s.yaml --num-samples 8 --resume"),
    (["/x/tune_kd/__main__.py", "search"], "python -m tune_kd search --resume"),
    (["bench/gpu_search.py", "--smoke"], "the same command and --resume"),
])
def test_the_resume_command_is_the_one_typed_with_resume(argv, command):
    assert interrupt.resume_command(argv) == command


def test_an_interrupted_trial_closes_fail_and_its_resumed_run_gets_a_new_optuna_trial(tmp_path):
    """The study never holds a RUNNING trial after a stop, and after the resume it agrees with what
    the trial did: the interrupted attempt FAIL (interrupted), its continuation a new trial (retry_of)
    that carries the epochs of both attempts."""
    import optuna
    from ray import cloudpickle
    from ray.tune.search import ConcurrencyLimiter

    cfg = load_config(raw=search_raw(FAKE_WORLD))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    built = cloudpickle.loads(cloudpickle.dumps(make_optuna_searcher(cfg, url, None)))   # as tuner.pkl holds it
    searcher = ConcurrencyLimiter(cloudpickle.loads(cloudpickle.dumps(built)), max_concurrent=4)
    searcher.set_search_properties(None, None, space.tune_domains(cfg))
    params = searcher.suggest("a")
    searcher.suggest("b")                                 # asked, never started
    searcher.on_trial_result("a", {"epoch": 1, "val_ce": 1.0})
    searcher.save(str(tmp_path / "searcher.pkl"))         # Ray's last save, after the graceful stop
    assert sorted(interrupt.close_running_trials(tmp_path / "optuna.db", cfg.name)) == [0, 1]
    study = optuna.load_study(study_name=cfg.name, storage=url)
    assert [(t.state.name, t.user_attrs.get("interrupted")) for t in study.trials] == [("FAIL", True)] * 2

    resumed = ConcurrencyLimiter(cloudpickle.loads(cloudpickle.dumps(built)), max_concurrent=4)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("a", {"epoch": 2, "val_ce": 0.8})   # from its epoch-1 checkpoint
    resumed.on_trial_complete("a", {"epoch": 3, "val_ce": 0.9})
    resumed.on_trial_complete("b", {"epoch": 1, "val_ce": 2.0})
    trials = optuna.load_study(study_name=cfg.name, storage=url).trials
    assert not [t for t in trials if t.state.name == "RUNNING"]
    a = [t for t in trials if t.params == params]
    assert [t.state.name for t in a] == ["FAIL", "COMPLETE"]
    assert a[-1].user_attrs == {"tune_trial_id": "a", "retry_of": a[0].number}
    assert a[-1].value == 0.8 and a[-1].intermediate_values == {1: 1.0, 2: 0.8, 3: 0.9}
    assert [t.state.name for t in trials if t.user_attrs.get("tune_trial_id") == "b"] == ["FAIL", "PRUNED"]


# ----------------------------------------------------------------------------------------------
# The logs of every attempt
# ----------------------------------------------------------------------------------------------

def test_a_trial_run_again_in_a_fresh_working_directory_keeps_the_earlier_logs(tmp_path):
    stored, fresh, same = tmp_path / "trial_a", tmp_path / "session2", tmp_path / "session1"
    for folder in (stored, fresh, same):
        folder.mkdir()
    (stored / "stderr.log").write_text("attempt 1\n" * 100)
    (stored / "stdout.log").write_text("")                                  # nothing to keep
    (fresh / "stderr.log").write_text("attempt 2\n")
    (same / "stderr.log").write_text("attempt 1\n" * 100 + "retry in the same folder\n")
    assert keep_earlier_attempts(stored, same) == []                         # Ray appends there: it holds both
    assert keep_earlier_attempts(stored, fresh) == [stored / "stderr.1.log"]
    assert (stored / "stderr.1.log").read_text() == "attempt 1\n" * 100
    assert not (stored / "stderr.log").exists() and (stored / "stdout.log").exists()
    (stored / "stderr.log").write_text("attempt 2\n" * 50)                   # Ray's copy of the second attempt
    assert keep_earlier_attempts(stored, tmp_path / "session3") == []      # no log there: nothing to copy over
    (tmp_path / "session3").mkdir()
    (tmp_path / "session3" / "stderr.log").write_text("attempt 3\n")
    assert keep_earlier_attempts(stored, tmp_path / "session3") == [stored / "stderr.2.log"]


# ----------------------------------------------------------------------------------------------
# A real search, signalled
# ----------------------------------------------------------------------------------------------

def tiny_space(world, tmp_path: Path, num_samples: int) -> Path:
    """Trials of two epochs, one at a time, every trial to the end (no ASHA)."""
    raw = search_raw(world, num_samples=num_samples, train={"epochs": 2}, search={"max_concurrent": 1},
                     scheduler={"type": "none"}, logging={"tensorboard": False})
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_search(space_file: Path, storage: Path, out: Path, err: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tune_kd.search", "--space", str(space_file), "--storage",
                             str(storage), "--num-cpus", "2", "--no-dashboard", *flags], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out.open("w"), stderr=err.open("w"))


def signal_mid_trial(driver: subprocess.Popen, out: Path, err: Path, signum: int) -> list[str]:
    """Send signum once the first trial reported its first epoch (it is then in its second); returns
    the lines the search wrote to stderr after it."""
    deadline = time.time() + 300
    while "epoch 1/2" not in out.read_text():
        assert time.time() < deadline and driver.poll() is None, err.read_text()[-3000:]
        time.sleep(0.2)
    said = err.stat().st_size
    driver.send_signal(signum)
    assert driver.wait(timeout=120) == 130, err.read_text()[-3000:]
    return err.read_bytes()[said:].decode().splitlines()


def assert_stopped_honestly(experiment: Path) -> None:
    """No summary of an unfinished search, no RUNNING Optuna trial, Ray's state saved for --resume."""
    import optuna

    for summary in ("trials.csv", "best.json", "best_student", "report.html", "controls.json"):
        assert not (experiment / summary).exists(), summary
    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert [t.state.name for t in study.trials if t.user_attrs.get("interrupted")] == ["FAIL"]
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    assert interrupt.trial_statuses(experiment)


@pytest.mark.slow
def test_ctrl_c_mid_trial_stops_cleanly_and_the_printed_resume_finishes(world, tmp_path):
    """One trial (a second one would only add a minute): stopped in its second epoch, resumed from
    its first epoch's checkpoint by the command the line gives."""
    space_file, out, err = tiny_space(world, tmp_path, num_samples=1), tmp_path / "out.log", tmp_path / "err.log"
    experiment = tmp_path / "results" / "tiny-search"
    said = signal_mid_trial(start_search(space_file, tmp_path / "results", out, err), out, err, signal.SIGINT)
    assert len(said) == 1 and said[0].startswith("interrupted: 0 of 1 trials finished; resume with: "), said
    assert_stopped_honestly(experiment)
    (first,) = [p.parent for p in experiment.glob("trial_*/stderr.log") if p.stat().st_size]
    first_logs = (first / "stderr.log").read_text()
    assert "precision:" in first_logs

    command = shlex.split(said[0].split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "tune_kd.search"] and command[-1] == "--resume"
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_study_agrees(experiment)
    assert (experiment / "best.json").is_file() and (experiment / "report.html").is_file()
    for result in experiment.glob("trial_*/result.json"):     # each epoch once: the interrupted one resumed
        assert [json.loads(line)["epoch"] for line in result.read_text().splitlines()] == [1, 2]
    assert (first / "stderr.1.log").read_text() == first_logs             # the interrupted attempt's log, kept
    assert "Restored" in (first / "stderr.log").read_text()               # ... beside the resumed one's


@pytest.mark.slow
def test_sigterm_mid_trial_stops_cleanly(world, tmp_path):
    """A scheduler's stop (SIGTERM, as Slurm or Kubernetes send before killing) is a Ctrl-C."""
    space_file, out, err = tiny_space(world, tmp_path, num_samples=2), tmp_path / "out.log", tmp_path / "err.log"
    said = signal_mid_trial(start_search(space_file, tmp_path, out, err), out, err, signal.SIGTERM)
    assert len(said) == 1 and said[0].startswith("interrupted: 0 of 2 trials finished; resume with: "), said
    assert "Tuner.restore" not in err.read_text() and "Traceback" not in err.read_text()
    assert_stopped_honestly(tmp_path / "tiny-search")
