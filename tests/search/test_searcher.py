"""The searcher, the scheduler and the progress callback across a resume, driven directly (no Ray
run): fake trial ids and results, a tmp sqlite Optuna study, pickles standing in for tuner.pkl."""

import copy
import json
import pickle
from types import SimpleNamespace

import pytest
import yaml

from tune_kd.cli import main as cli
from tune_kd.config.experiment import load_config
from tune_kd.search import space
from tune_kd.search.progress import SearchProgress
from tune_kd.search.searcher import make_optuna_searcher, make_scheduler

from conftest import search_raw

# load_config checks no file: the search objects below never read these paths
FAKE_WORLD = {"tokenizer": "/nowhere/tokenizer", "train": "/nowhere/train.jsonl", "val": "/nowhere/val.jsonl",
              "cache": "/nowhere/cache", "teacher": "/nowhere/teacher"}


def config(**sections):
    return load_config(raw=search_raw(FAKE_WORLD, **sections))   # epochs 3, ASHA grace 1, reduction 2, val_ce min


def fake_trial(trial_id: str, experiment_dir) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, storage=SimpleNamespace(experiment_fs_path=str(experiment_dir)))


def as_tuner_pickle(obj):
    """What Tuner.restore hands back: the object as it was pickled into tuner.pkl when the Tuner was built."""
    from ray import cloudpickle

    return cloudpickle.loads(cloudpickle.dumps(obj))


def study_of(url: str, cfg):
    import optuna

    return optuna.load_study(study_name=cfg.name, storage=url)


def limited(built, max_concurrent: int = 4):
    """The searcher as tune.run wraps it for max_concurrent_trials."""
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(built, max_concurrent=max_concurrent)


def started_searcher(built, cfg, max_concurrent: int = 4):
    """tune.run's part in a fresh search: wrap the searcher and hand it the search space (it
    creates the study)."""
    searcher = limited(built, max_concurrent)
    searcher.set_search_properties(None, None, space.tune_domains(cfg))
    return searcher


def result(epoch: int, value: float, **extra) -> dict:
    return {"epoch": epoch, "val_ce": value, **extra}


# ----------------------------------------------------------------------------------------------
# ASHA's rungs across a resume
# ----------------------------------------------------------------------------------------------

def test_asha_decisions_survive_a_resume(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    cfg = config()
    scheduler = make_scheduler(cfg)
    built = as_tuner_pickle(scheduler)
    trials = {name: fake_trial(name, tmp_path) for name in ("a", "b", "c", "d")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trials["a"], result(1, 1.0)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials["b"], result(1, 2.0)) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, trials["c"], result(1, 0.5)) == TrialScheduler.CONTINUE
    reference = copy.deepcopy(scheduler)                  # the run as it would have gone on (elsewhere)
    (tmp_path / "reference").mkdir()
    uninterrupted = reference.on_trial_result(None, fake_trial("d", tmp_path / "reference"), result(1, 1.5))
    assert uninterrupted == TrialScheduler.STOP

    # the driver dies; Tune restores the scheduler from tuner.pkl and re-adds the trials it knew
    resumed = built
    for trial in trials.values():
        resumed.on_trial_add(None, trial)
    assert resumed.on_trial_result(None, trials["d"], result(1, 1.5)) == uninterrupted
    # b was stopped before the kill but Tune's saved state still had it running: it stays stopped
    assert resumed.on_trial_result(None, trials["b"], result(1, 2.0)) == TrialScheduler.STOP
    assert resumed.on_trial_result(None, trials["c"], result(2, 0.4)) == TrialScheduler.CONTINUE


# ----------------------------------------------------------------------------------------------
# The Optuna study: what is told, and what a resume finds
# ----------------------------------------------------------------------------------------------

def test_complete_trials_are_told_their_best_epoch(tmp_path):
    cfg = config()
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = started_searcher(make_optuna_searcher(cfg, url, None), cfg)
    searcher.suggest("a")
    searcher.on_trial_result("a", result(1, 1.0))
    searcher.on_trial_result("a", result(2, 0.8))
    searcher.on_trial_complete("a", result(3, 0.9))   # ASHA's STOP at max_t: the last result comes only here
    (trial,) = study_of(url, cfg).trials
    assert trial.state.name == "COMPLETE"
    assert trial.value == 0.8                            # what trials.csv and best.json rank by
    assert trial.intermediate_values == {1: 1.0, 2: 0.8, 3: 0.9}


def test_a_retried_errored_trial_reaches_the_study(tmp_path):
    cfg = config()
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = started_searcher(make_optuna_searcher(cfg, url, None), cfg, max_concurrent=1)
    params = searcher.suggest("a")
    assert searcher.suggest("b") is None                  # one at a time
    searcher.on_trial_result("a", result(1, 1.0))
    searcher.on_trial_complete("a", error=True)
    # --resume --retry-errored: Tune re-runs `a` under its id, from its epoch-1 checkpoint
    searcher.on_trial_result("a", result(2, 0.7))
    searcher.on_trial_complete("a", result(3, 0.75))
    trials = [t for t in study_of(url, cfg).trials if t.params == params]
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[-1].value == 0.7 and trials[-1].intermediate_values == {1: 1.0, 2: 0.7, 3: 0.75}
    assert trials[-1].user_attrs["tune_trial_id"] == "a"


def test_a_resumed_study_holds_no_stale_trial(tmp_path):
    """The driver was killed after Tune's last state save: `a` finished and `c` was asked after it."""
    from optuna.trial import TrialState

    # random proposals throughout: d sees b's re-run, which c never saw, so a modelling TPE may differ
    cfg = config(search={"startup_trials": 10})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = space.fixed_point(cfg)
    built = as_tuner_pickle(make_optuna_searcher(cfg, url, [first]))
    searcher = started_searcher(as_tuner_pickle(built), cfg)
    assert searcher.suggest("a") == first                 # the YAML's own settings come first
    searcher.suggest("b")
    saved = tmp_path / "searcher-state.pkl"
    searcher.save(str(saved))                             # Tune's periodic experiment save
    searcher.on_trial_result("a", result(1, 1.0))
    searcher.on_trial_complete("a", result(1, 1.0))     # ASHA stopped it: PRUNED
    searcher.on_trial_result("b", result(1, 0.9))
    searcher.on_trial_complete("b", error=True)          # b failed after the save
    asked_last = searcher.suggest("c")                    # ... and c was asked: then SIGKILL

    resumed = limited(as_tuner_pickle(built))
    resumed.restore(str(saved))                           # Tune's restore (tuner.pkl holds no search space)
    # c was asked after the save and never ran under Tune: closed, not left RUNNING
    running = study_of(url, cfg).get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert [t.user_attrs.get("tune_trial_id") for t in running] == []
    # Tune re-runs a and b from their saved state: the study already closed them
    resumed.on_trial_result("a", result(1, 1.0))
    resumed.on_trial_complete("a", result(1, 1.0))
    resumed.on_trial_result("b", result(1, 0.9))
    resumed.on_trial_result("b", result(2, 0.8))
    resumed.on_trial_complete("b", result(3, 0.85))
    assert resumed.suggest("d") == asked_last             # the sampler goes on as it would have
    resumed.on_trial_complete("d", result(1, 2.0))
    study = study_of(url, cfg)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    by_tune_id = {}
    for trial in study.trials:
        by_tune_id.setdefault(trial.user_attrs.get("tune_trial_id"), []).append(trial.state.name)
    assert by_tune_id["a"] == ["PRUNED"]
    assert by_tune_id["b"] == ["FAIL", "COMPLETE"]        # re-run after its failure: a new Optuna trial
    assert by_tune_id["c"] == ["FAIL"]                     # asked, never ran under Tune: closed
    assert by_tune_id["d"] == ["PRUNED"]
    assert len(study.trials) == 5


def test_reports_for_a_trial_optuna_finished_cannot_crash_the_searcher(tmp_path):
    cfg = config()
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = started_searcher(make_optuna_searcher(cfg, url, None), cfg)
    searcher.suggest("a")
    study_of(url, cfg).tell(0, 1.0)                       # finished behind the searcher's back
    searcher.on_trial_result("a", result(1, 1.0))
    searcher.on_trial_complete("a", result(2, 0.5))
    (trial,) = study_of(url, cfg).trials
    assert (trial.state.name, trial.value) == ("COMPLETE", 1.0)


# ----------------------------------------------------------------------------------------------
# The progress line and the config across a resume
# ----------------------------------------------------------------------------------------------

def test_progress_counts_continue_after_a_resume(capsys):
    progress = SearchProgress("val_ce", "min", num_trials=6, epochs=3, parallel=1, every_s=3600)
    built = as_tuner_pickle(progress)
    a = SimpleNamespace(trial_id="a", status="TERMINATED", config={"alpha": 0.25})
    b = SimpleNamespace(trial_id="b", status="TERMINATED", config={"alpha": 0.75})
    for trial, value, epochs in ((a, 1.5, 1), (b, 1.25, 3)):
        for epoch in range(1, epochs + 1):
            progress.on_trial_result(0, [a, b], trial, {"epoch": epoch, "val_ce": value, "time_this_iter_s": 10.0})
        progress.on_trial_complete(0, [a, b], trial)
    state = progress.get_state()
    assert state, "the callback must hand Tune a state to save with the experiment"

    resumed = as_tuner_pickle(built)
    resumed.set_state(pickle.loads(pickle.dumps(state)))
    resumed.setup()
    c = SimpleNamespace(trial_id="c", status="RUNNING", config={"alpha": 0.5})
    capsys.readouterr()
    resumed.on_trial_result(0, [a, b, c], c, {"epoch": 1, "val_ce": 1.75, "time_this_iter_s": 10.0})
    c.status = "TERMINATED"
    resumed.on_trial_complete(0, [a, b, c], c)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("search: 3/6 trials done (2 stopped early), 0 running | best val_ce 1.2500 (trial b) | ")


def test_resume_refuses_a_changed_yaml(tmp_path, capsys):
    import ray

    from tune_kd.results.reading import EXPERIMENT_FILE
    from tune_kd.search.resume_checks import SEARCH_FORMAT

    raw = search_raw(FAKE_WORLD)
    cfg = load_config(raw=raw)
    experiment = tmp_path / cfg.name
    experiment.mkdir()
    (experiment / EXPERIMENT_FILE).write_text(json.dumps({"name": cfg.name, "search_format": SEARCH_FORMAT,
                                                          "config": cfg.to_dict()}, default=str))
    (experiment / "tuner.pkl").write_bytes(b"Ray's state: the trials began")
    raw["search"]["num_samples"] = 8
    raw["metric"] = {"name": "val_kl", "goal": "minimize"}
    raw["parameters"]["temperature"]["max"] = 6.0
    raw["resources"]["cpu_per_trial"] = 2            # how trials run, not what they compute: allowed
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    code = cli.main(["search", "--space", str(changed), "--storage", str(tmp_path), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "metric.name: val_ce -> val_kl" in err[0]
    assert "parameters.temperature.max: 4.0 -> 6.0" in err[0]
    assert "search.num_samples: 6 -> 8" in err[0]
    assert "cpu_per_trial" not in err[0]
    assert not ray.is_initialized()
    assert cli.main(["search", "--space", str(changed), "--storage", str(tmp_path), "--retry-errored"]) == 2
    assert "use it with --resume" in capsys.readouterr().err


def test_a_search_whose_trials_never_began_starts_again_with_or_without_resume(tmp_path, caplog):
    """A full disk (or a bad teacher, or Ctrl-C) before the first trial leaves experiment.json and no
    Ray state: the same command must run once the cause is fixed, not ask for --overwrite."""
    import logging

    from tune_kd.config.errors import UserError
    from tune_kd.results.reading import EXPERIMENT_FILE
    from tune_kd.search.preflight import resume_or_start

    experiment = tmp_path / "exp"
    with pytest.raises(UserError, match="nothing to resume .*drop --resume to start it"):
        resume_or_start(experiment, resume=True)
    assert resume_or_start(experiment, resume=False) is False
    experiment.mkdir()
    (experiment / EXPERIMENT_FILE).write_text("{}")
    assert resume_or_start(experiment, resume=False) is False
    with caplog.at_level(logging.INFO):
        assert resume_or_start(experiment, resume=True) is False
    assert "its trials never began" in caplog.text
    (experiment / "tuner.pkl").write_bytes(b"Ray's state")
    assert resume_or_start(experiment, resume=True) is True
    with pytest.raises(UserError, match="already holds an experiment: continue it with --resume"):
        resume_or_start(experiment, resume=False)


@pytest.mark.parametrize("saved", [None, 99])
def test_resume_refuses_a_search_saved_in_another_format_in_one_line(tmp_path, capsys, saved):
    """A folder from before the stage packages (no search_format: its pickles name modules that moved)
    or from a newer tune_kd: one line that says what to do, before Ray starts, and the folder kept."""
    import ray

    from tune_kd.results.reading import EXPERIMENT_FILE
    from tune_kd.search.resume_checks import SEARCH_FORMAT

    raw = search_raw(FAKE_WORLD)
    cfg = load_config(raw=raw)
    experiment = tmp_path / cfg.name
    experiment.mkdir()
    document = {"name": cfg.name, "config": cfg.to_dict(), **({"search_format": saved} if saved else {})}
    (experiment / EXPERIMENT_FILE).write_text(json.dumps(document, default=str))
    (experiment / "tuner.pkl").write_bytes(b"a pickle naming tune_kd.searcher")
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(raw))
    code = cli.main(["search", "--space", str(space_file), "--storage", str(tmp_path), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"search format is {saved or 1}, this one reads {SEARCH_FORMAT}" in err[0] and "--overwrite" in err[0]
    assert not ray.is_initialized()
    assert sorted(p.name for p in experiment.iterdir()) == [EXPERIMENT_FILE, "tuner.pkl"]


def test_the_summary_leaves_out_a_trial_the_resumed_search_never_knew(tmp_path):
    """A trial started after Tune's last state save can leave its folder behind a SIGKILL; its
    Optuna trial was closed as FAIL on resume, and trials.csv must not list it either."""
    from tune_kd.results.reading import trial_rows

    cfg = config()
    for trial_id, value in (("known", 2.0), ("ghost", 1.0)):
        folder = tmp_path / f"trial_{trial_id}"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"learning_rate": 1e-3, "temperature": 2.0, "alpha": 0.5}))
        (folder / "result.json").write_text(json.dumps({"trial_id": trial_id, **result(1, value)}) + "\n")
    rows = trial_rows(tmp_path, cfg, {}, {"known"})
    assert [(r["trial_id"], r["status"]) for r in rows] == [("known", "STOPPED_EARLY")]


# ----------------------------------------------------------------------------------------------
# The sampler: models within the budget, spreads concurrent proposals
# ----------------------------------------------------------------------------------------------

def test_startup_trials_follow_num_samples():
    from tune_kd.search.samplers import make_sampler

    # a quarter of the budget, at least 2, at most 10; Optuna's default (10) left 8-16 trial searches random
    for num_samples, expected in ((4, 2), (8, 2), (16, 4), (24, 6), (50, 10), (200, 10)):
        assert make_sampler(config(search={"num_samples": num_samples}))._n_startup_trials == expected
    assert make_sampler(config(search={"num_samples": 16, "startup_trials": 7}))._n_startup_trials == 7


def test_startup_trials_must_be_auto_or_a_positive_int():
    import pytest

    from tune_kd.config.errors import ConfigError

    for bad in (0, "some", 2.5):
        with pytest.raises(ConfigError, match="search.startup_trials"):
            config(search={"startup_trials": bad})


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_concurrent_proposals_spread_once_past_startup(tmp_path, sampler):
    """Four asks before any result, after the startup trials: TPE's constant liar counts the running
    ones as bad, the GP's batch expected improvement counts them as pending points, so the proposals
    differ instead of all landing on the one good region seen so far."""
    import math

    cfg = config(search={"num_samples": 8, "sampler": sampler})            # startup: 2
    searcher = started_searcher(make_optuna_searcher(cfg, f"sqlite:///{tmp_path / 'optuna.db'}", None), cfg)
    for name, value in (("a", 1.0), ("b", 2.0), ("c", 1.5)):
        searcher.suggest(name)
        for epoch in (1, 2, 3):
            searcher.on_trial_result(name, result(epoch, value))
        searcher.on_trial_complete(name, result(3, value))
    proposals = [searcher.suggest(name) for name in ("d", "e", "f", "g")]
    assert all(proposals)
    # in the unit cube of the space (log lr); without the liar the four land within ~0.1 of each other
    unit = [(math.log(p["learning_rate"] / 1e-4) / math.log(100), (p["temperature"] - 1) / 3, p["alpha"])
            for p in proposals]
    closest = min(math.dist(x, y) for i, x in enumerate(unit) for y in unit[i + 1:])
    assert closest > 0.3, proposals


# ----------------------------------------------------------------------------------------------
# Two objectives (search.objectives): the study records both; ASHA stops within size brackets
# ----------------------------------------------------------------------------------------------

SIZED = {"search": {"objectives": ["val_ce", "student_params"]}}


def test_a_two_objective_study_records_the_metric_and_the_size(tmp_path):
    cfg = config(**SIZED)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = started_searcher(make_optuna_searcher(cfg, url, None), cfg)
    for name in ("small", "large", "stopped"):
        searcher.suggest(name)
    for epoch, value in ((1, 1.2), (2, 1.0), (3, 1.1)):
        searcher.on_trial_result("small", result(epoch, value, student_params=1000))
    searcher.on_trial_complete("small", result(3, 1.1, student_params=1000))
    searcher.on_trial_result("large", result(1, 0.9, student_params=8000))
    searcher.on_trial_result("large", result(2, 0.7, student_params=8000))
    searcher.on_trial_complete("large", result(3, 0.8))            # the last result need not carry the size
    searcher.on_trial_result("stopped", result(1, 1.5, student_params=500))
    searcher.on_trial_complete("stopped", result(1, 1.5, student_params=500))   # ASHA stopped it at epoch 1
    study = study_of(url, cfg)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert by_id["small"].values == [1.0, 1000.0]                   # best epoch's metric, the size
    assert by_id["large"].values == [0.7, 8000.0]
    assert by_id["stopped"].state.name == "PRUNED"
    assert by_id["small"].user_attrs["epoch_values"] == {"1": 1.2, "2": 1.0, "3": 1.1}
    assert {t.user_attrs["tune_trial_id"] for t in study.best_trials} == {"small", "large"}   # neither dominates


def test_a_speed_objective_is_maximised(tmp_path):
    cfg = config(search={"objectives": ["val_ce", "gen_tokens_per_s"]})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = started_searcher(make_optuna_searcher(cfg, url, None), cfg)
    searcher.suggest("a")
    searcher.on_trial_result("a", result(3, 0.5, gen_tokens_per_s=321.0))
    searcher.on_trial_complete("a", result(3, 0.5, gen_tokens_per_s=321.0))
    study = study_of(url, cfg)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert study.trials[0].values == [0.5, 321.0]


def test_a_retried_trial_of_a_two_objective_study_keeps_its_epochs(tmp_path):
    cfg = config(**SIZED)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = started_searcher(make_optuna_searcher(cfg, url, None), cfg, max_concurrent=1)
    params = searcher.suggest("a")
    searcher.on_trial_result("a", result(1, 1.0, student_params=64))
    searcher.on_trial_complete("a", error=True)
    searcher.on_trial_result("a", result(2, 0.7, student_params=64))
    searcher.on_trial_complete("a", result(3, 0.75, student_params=64))
    trials = [t for t in study_of(url, cfg).trials if t.params == params]
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[-1].values == [0.7, 64.0]
    assert trials[-1].user_attrs["epoch_values"] == {"1": 1.0, "2": 0.7, "3": 0.75}


def rung_decisions(cfg, tmp_path, reports):
    """ASHA's decision for each (trial, epoch, value, size), in order."""
    scheduler = make_scheduler(cfg)
    trials = {}
    decisions = []
    for name, epoch, value, size in reports:
        if name not in trials:
            trials[name] = fake_trial(name, tmp_path)
            scheduler.on_trial_add(None, trials[name])
        decisions.append(scheduler.on_trial_result(None, trials[name], result(epoch, value, student_params=size)))
    return decisions, scheduler, trials


# two large students first, then two small ones: worse than the large at epoch 1 as small students are
SIZES_AT_RUNG_1 = [("big1", 1, 1.0, 80_000), ("big2", 1, 1.1, 90_000), ("small1", 1, 1.6, 10_000),
                   ("small2", 1, 1.8, 11_000)]


def test_asha_compares_a_small_student_only_with_students_of_its_size(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    bracketed, _, _ = rung_decisions(config(**SIZED), tmp_path, SIZES_AT_RUNG_1)
    # small1 is the first of its bracket (it goes on); small2 loses to small1, within its size
    assert bracketed == [TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.CONTINUE, TrialScheduler.STOP]
    (tmp_path / "plain").mkdir()
    plain, _, _ = rung_decisions(config(**SIZED, scheduler={"size_bracket_ratio": 0}), tmp_path / "plain",
                                 SIZES_AT_RUNG_1)
    assert plain[2:] == [TrialScheduler.STOP, TrialScheduler.STOP]   # across sizes, every small student stops


def test_size_brackets_survive_a_resume(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    cfg = config(**SIZED)
    built = as_tuner_pickle(make_scheduler(cfg))
    rung_decisions(cfg, tmp_path, SIZES_AT_RUNG_1[:3])            # the first run: big1, big2, small1
    resumed = built
    for name in ("big1", "big2", "small1", "small2", "big3"):
        resumed.on_trial_add(None, fake_trial(name, tmp_path))
    # small2 still meets small1's value in its bracket (read back from scheduler_state.pkl), not the large ones'
    assert resumed.on_trial_result(None, fake_trial("small2", tmp_path), result(1, 1.5, student_params=11_000)) \
        == TrialScheduler.CONTINUE
    assert resumed.on_trial_result(None, fake_trial("big3", tmp_path), result(1, 1.5, student_params=70_000)) \
        == TrialScheduler.STOP


def test_tune_accepts_a_rejected_or_diverged_report_of_a_two_objective_search(tmp_path):
    """A rejected shape's or a diverged trial's report carries the metric but no size: Tune's strict
    metric check (which stops the whole search on a miss) asks only for the ranked metric."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search.search_generator import SearchGenerator

    cfg = config(**SIZED)
    searcher = make_optuna_searcher(cfg, f"sqlite:///{tmp_path / 'optuna.db'}", None)
    assert searcher.metric == "val_ce"
    controller = SimpleNamespace(_metric=None, _scheduler_alg=make_scheduler(cfg), _search_alg=SearchGenerator(searcher))
    for report in ({"epoch": 1, "val_ce": float("inf"), "rejected": "student shape rejected: ..."},
                   {"epoch": 2, "val_ce": float("nan"), "diverged": "loss became nan"}):
        TuneController._validate_result_metrics(controller, {**report, "training_iteration": 1, "time_this_iter_s": 0.1})
