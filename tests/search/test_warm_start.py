"""search.warm_start: an earlier search's trials given to the sampler before its first proposal.
The earlier search is a results folder written here (experiment.json, trial folders, trials.csv);
the searcher is driven directly, as tests/search/test_searcher.py drives it (no Ray run)."""

import csv
import json
import math

import pytest
import yaml

from tune_kd.cli import main as cli
from tune_kd.config.errors import UserError
from tune_kd.config.experiment import load_config
from tune_kd.search.searcher import make_optuna_searcher
from tune_kd.search.warm_start import WARM_START_ATTR, read_warm_start

from conftest import search_raw
from search.test_searcher import FAKE_WORLD, as_tuner_pickle, limited, result, started_searcher, study_of

EARLIER_SPACE = {"learning_rate": {"distribution": "log_uniform_values", "min": 1.0e-4, "max": 1.0e-2},
                 "temperature": {"distribution": "uniform", "min": 1.0, "max": 5.0},
                 "alpha": {"distribution": "uniform", "min": 0.0, "max": 1.0}}
# this search: a narrower learning rate, alpha no longer searched, warmup_iters searched for the first time
THIS_SPACE = {"learning_rate": {"distribution": "log_uniform_values", "min": 1.0e-3, "max": 1.0e-2},
              "temperature": {"distribution": "uniform", "min": 1.0, "max": 5.0},
              "warmup_iters": {"distribution": "int_uniform", "min": 0, "max": 20}}

# trial id -> (learning_rate, temperature, alpha, val_ce per epoch, status); epochs 3
EARLIER_TRIALS = {
    "t0": (3e-3, 2.0, 0.5, [2.0, 1.6, 1.5], "COMPLETED"),
    "t1": (5e-3, 4.0, 0.2, [1.9, 1.4, 1.45], "COMPLETED"),
    "t2": (2e-3, 1.5, 0.9, [2.5], "STOPPED_EARLY"),
    "t3": (5e-4, 3.0, 0.4, [1.8, 1.3, 1.2], "COMPLETED"),     # learning rate below this space's
    "t4": (4e-3, 2.5, 0.1, [], "ERROR"),
    "t5": (8e-3, 4.5, 0.7, [2.2, math.nan], "DIVERGED"),
}


def raw_of(parameters: dict, **sections) -> dict:
    """search_raw with exactly these parameters (search_raw merges sections into its own)."""
    return {**search_raw(FAKE_WORLD, **sections), "parameters": parameters}


def config(tmp_path, parameters=THIS_SPACE, **search):
    return load_config(raw=raw_of(parameters, search={"warm_start": str(tmp_path / "earlier"), **search}))


def write_earlier_search(tmp_path, metric=("val_ce", "min"), parameters=EARLIER_SPACE, warmup_iters=7):
    """A finished search's results folder as the search leaves it (only what read_warm_start reads)."""
    folder = tmp_path / "earlier"
    folder.mkdir()
    earlier = load_config(raw=raw_of(parameters, train={"warmup_iters": warmup_iters}))
    (folder / "experiment.json").write_text(json.dumps(
        {"name": "earlier", "metric": {"name": metric[0], "mode": metric[1]}, "config": earlier.to_dict()}, default=str))
    rows = []
    for trial_id, (lr, temperature, alpha, curve, status) in EARLIER_TRIALS.items():
        trial_dir = folder / f"trial_{trial_id}"
        trial_dir.mkdir()
        (trial_dir / "params.json").write_text(json.dumps({"learning_rate": lr, "temperature": temperature, "alpha": alpha}))
        (trial_dir / "result.json").write_text("".join(
            json.dumps({"trial_id": trial_id, "epoch": epoch, metric[0]: value}) + "\n"
            for epoch, value in enumerate(curve, 1)))
        rows.append({"trial_id": trial_id, "status": status, "error": "boom" if status == "ERROR" else ""})
    with (folder / "trials.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["trial_id", "status", "error"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_earlier_trials_are_read_as_this_space_takes_them(tmp_path):
    write_earlier_search(tmp_path)
    warm = read_warm_start(config(tmp_path))
    by_id = {trial.trial_id: trial for trial in warm.trials}
    # t3's learning rate is outside this space, t4 errored: both left out, and said so
    assert sorted(by_id) == ["t0", "t1", "t2", "t5"]
    assert warm.dropped == {"with learning_rate outside this space": 1, "errored": 1}
    # shared keys keep their values; warmup_iters was the earlier search's fixed setting; alpha is dropped
    assert by_id["t0"].params == {"warmup_iters": 7, "learning_rate": 3e-3, "temperature": 2.0}
    assert (by_id["t0"].completed, by_id["t0"].value) == (True, 1.5)          # its best epoch
    assert (by_id["t2"].completed, by_id["t2"].values) == (False, {1: 2.5})   # what ASHA let it reach
    assert by_id["t5"].values == {1: 2.2}                                      # the NaN epoch is no value
    line = warm.line()
    assert "4 of 6 trials" in line and "2 completed, 2 stopped early" in line
    assert "warmup_iters at its setting there (7)" in line and "searched there only, ignored: alpha" in line


@pytest.mark.parametrize("sampler", ["gp", "tpe"])
def test_a_warm_started_search_proposes_only_its_own_space_and_resumes(tmp_path, sampler):
    from optuna.trial import TrialState

    write_earlier_search(tmp_path)
    # the sampler models from the first proposal: the earlier trials are enough
    cfg = config(tmp_path, startup_trials=2, sampler=sampler)
    warm = read_warm_start(cfg)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    built = as_tuner_pickle(make_optuna_searcher(cfg, url, None, warm))
    searcher = started_searcher(as_tuner_pickle(built), cfg)
    study = study_of(url, cfg)
    given = [t for t in study.trials if WARM_START_ATTR in t.user_attrs]
    assert [t.state for t in given] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert [t.value for t in given[:2]] == [1.5, 1.4]
    assert given[2].intermediate_values == {1: 2.5}

    def check(config):
        assert 1e-3 <= config["learning_rate"] <= 1e-2 and 1.0 <= config["temperature"] <= 5.0
        assert 0 <= config["warmup_iters"] <= 20 and "alpha" not in config

    proposals = {}
    for index in range(4):
        trial_id = f"n{index}"
        proposals[trial_id] = searcher.suggest(trial_id)
        check(proposals[trial_id])
        searcher.on_trial_result(trial_id, result(1, 2.0 - index / 10))
        searcher.on_trial_complete(trial_id, result(3, 1.9 - index / 10))
    saved = tmp_path / "searcher-state.pkl"
    searcher.save(str(saved))                             # Tune's experiment save; then the driver dies

    resumed = limited(as_tuner_pickle(built))
    resumed.restore(str(saved))                           # --resume: Tune restores the searcher
    for index in range(4, 8):
        config_ = resumed.suggest(f"n{index}")
        check(config_)
        resumed.on_trial_complete(f"n{index}", result(3, 1.5))
    study = study_of(url, cfg)
    # the earlier trials were given once, not again on the resume; every trial of this search is its own
    assert len([t for t in study.trials if WARM_START_ATTR in t.user_attrs]) == 4
    assert sorted(t.user_attrs["tune_trial_id"] for t in study.trials if WARM_START_ATTR not in t.user_attrs) == \
        [f"n{index}" for index in range(8)]
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


@pytest.mark.parametrize("case, message", [
    ("missing", "not a tune_kd search's results folder"),
    ("metric", "ranked trials by val_acc (max), this one by val_ce (min)"),
    ("goal", "ranked trials by val_ce (max), this one by val_ce (min)"),
    ("no shared key", "no searched key in common"),
])
def test_a_bad_warm_start_is_one_line_before_ray_starts(tmp_path, capsys, case, message):
    if case != "missing":
        metric = {"metric": ("val_acc", "max"), "goal": ("val_ce", "max")}.get(case, ("val_ce", "min"))
        write_earlier_search(tmp_path, metric=metric,
                             parameters={"alpha": EARLIER_SPACE["alpha"]} if case == "no shared key" else EARLIER_SPACE)
    with pytest.raises(UserError, match="search.warm_start"):
        read_warm_start(config(tmp_path))
    path = tmp_path / "space.yaml"
    raw = raw_of(THIS_SPACE, search={"warm_start": str(tmp_path / "earlier")})
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["search", "--space", str(path), "--storage", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert message in err and "search.warm_start" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()            # nothing started, nothing written


def test_warm_start_needs_optuna(tmp_path):
    from tune_kd.config.errors import ConfigError

    with pytest.raises(ConfigError, match="search.warm_start: needs search.algorithm optuna"):
        config(tmp_path, algorithm="random")
