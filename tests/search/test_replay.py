"""bench/curves: the recorded sample and its table, and searches replayed against recorded curves."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "curves"))

import record  # noqa: E402
import replay  # noqa: E402
from replay import Arm, NearestAnswers, SurrogateAnswers, Table  # noqa: E402

from tune_kd.config.experiment import load_config
from tune_kd.search import searcher

from conftest import search_raw  # noqa: E402

SPACE = {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
         "temperature": {"distribution": "uniform", "min": 1.0, "max": 5.0},
         "alpha": {"distribution": "uniform", "min": 0.0, "max": 1.0},
         "kd_loss": {"values": ["forward_kl", "reverse_kl", "tvd"]},
         "warmup_iters": {"distribution": "int_uniform", "min": 0, "max": 20}}


def bowl(config: dict) -> float:
    """A known landscape: best at learning rate 10^-2.5, temperature 2, alpha 0.2, forward KL."""
    return (0.5 + 2.0 * (math.log10(config["learning_rate"]) + 2.5) ** 2 / 2.25 + 0.3 * (config["temperature"] - 2) ** 2 / 9
            + 0.5 * (config["alpha"] - 0.2) ** 2 + (0.0 if config["kd_loss"] == "forward_kl" else 0.4)
            + 0.002 * config["warmup_iters"])


def bowl_table(configs: int = 128, seeds: int = 2, epochs: int = 4, noise: float = 0.01) -> Table:
    rng = np.random.default_rng(0)
    rows = [{"config": number, "seed": seed, "epoch": epoch, **config,
             "val_ce": bowl(config) + 1.0 / epoch + rng.normal(0, noise)}
            for number, config in enumerate(record.sobol_configs(SPACE, configs))
            for seed in range(seeds) for epoch in range(1, epochs + 1)]
    return Table.from_rows("bowl", SPACE, rows)


@pytest.fixture(scope="module")
def table():
    return bowl_table()


def test_the_sobol_sample_covers_the_space_and_is_the_same_every_time():
    configs = record.sobol_configs(SPACE, 64)
    assert configs == record.sobol_configs(SPACE, 64) and configs != record.sobol_configs(SPACE, 64, seed=1)
    lrs = [c["learning_rate"] for c in configs]
    assert min(lrs) >= 1e-4 and max(lrs) <= 1e-1
    assert sum(lr < 10 ** -2.5 for lr in lrs) == 32            # balanced on the log scale: half below the middle
    assert {c["kd_loss"] for c in configs} == set(SPACE["kd_loss"]["values"])
    assert all(isinstance(c["warmup_iters"], int) and 0 <= c["warmup_iters"] <= 20 for c in configs)
    assert {c["warmup_iters"] for c in configs} >= {0, 20}
    points = record.grid_points(configs[:3], seeds=2)
    assert [p["seed"] for p in points] == [0, 1, 0, 1, 0, 1]   # config-major: a stopped recording keeps whole configs
    assert points[0] == {**configs[0], "seed": 0} and points[2] == {**configs[1], "seed": 0}


def test_the_recorded_space_adds_the_loss_and_warm_up_to_the_yaml_keys():
    space = record.recorded_space({"learning_rate": SPACE["learning_rate"], "grad_clip": {"value": 1.0},
                                   "warmup_iters": {"distribution": "int_uniform", "min": 5, "max": 9}})
    assert list(space) == ["learning_rate", "warmup_iters", "kd_loss"]      # a constant is not searched
    assert space["warmup_iters"]["min"] == 5                                  # the YAML's own range wins


def test_collected_runs_round_trip_through_the_table_file(tmp_path):
    """record.collect reads trial folders (an unfinished run is left out), write_table and Table.load
    give back the same curves; a diverged epoch (NaN) counts as the worst recorded value."""
    space = {k: SPACE[k] for k in ("learning_rate", "kd_loss")}
    experiment = tmp_path / "curves-x"
    runs = {("a", 0): [3.0, 2.0], ("a", 1): [3.1, 2.1], ("b", 0): [4.0, float("nan")], ("b", 1): [4.2, 3.9],
            ("c", 0): [5.0]}   # c stopped after one epoch: not recorded
    configs = {"a": {"learning_rate": 1e-3, "kd_loss": "tvd"}, "b": {"learning_rate": 2e-3, "kd_loss": "forward_kl"},
               "c": {"learning_rate": 3e-3, "kd_loss": "tvd"}}
    for number, ((name, seed), values) in enumerate(runs.items()):
        folder = experiment / f"trial_{number:05d}"
        folder.mkdir(parents=True)
        (folder / "params.json").write_text(json.dumps({**configs[name], "seed": seed}))
        (folder / "result.json").write_text("\n".join(json.dumps({"epoch": e, "val_ce": v, "val_acc": 0.5,
                                                                   "time_this_iter_s": 1.5})
                                                      for e, v in enumerate(values, start=1)) + "\n")
    rows = record.collect(experiment, space, epochs=2)
    assert len(rows) == 8 and {row["learning_rate"] for row in rows} == {1e-3, 2e-3}
    record.write_table(rows, space, tmp_path / "x.csv")
    (tmp_path / "x.json").write_text(json.dumps({"recorded_space": space}))
    loaded = Table.load(tmp_path / "x.csv")
    assert loaded.runs.shape == (2, 2, 2)
    by_rate = {c["learning_rate"]: i for i, c in enumerate(loaded.configs)}
    assert loaded.configs[by_rate[1e-3]] == configs["a"]
    np.testing.assert_allclose(loaded.runs[by_rate[1e-3]], [[3.0, 2.0], [3.1, 2.1]])
    np.testing.assert_allclose(loaded.runs[by_rate[2e-3]], [[4.0, 4.2], [4.2, 3.9]])   # NaN -> the worst, 4.2
    assert "val_gen_acc" not in (tmp_path / "x.csv").read_text().splitlines()[0]       # never recorded: no column


def test_a_grid_searcher_runs_exactly_the_points(world, tmp_path):
    raw = search_raw(world, num_samples=3)
    points = [{"learning_rate": 1e-3, "temperature": 2.0, "alpha": 0.5}, {"learning_rate": 2e-3, "temperature": 3.0, "alpha": 0.1},
              {"learning_rate": 1e-3, "temperature": 2.0, "alpha": 0.5}]
    built = searcher.make_searcher(load_config(raw=raw), tmp_path, grid=points)
    assert built._points_to_evaluate == points            # in order, repeats kept (a config's second seed)
    with pytest.raises(ValueError, match="num_samples 2"):
        searcher.make_searcher(load_config(raw=raw), tmp_path, grid=points[:2])


def test_a_search_replayed_with_the_same_seed_is_the_same_search(table):
    answers = NearestAnswers(table)
    for arm in (Arm("tpe+asha"), Arm("random", searcher="random", scheduler="none"),
                Arm("bohb", scheduler="hyperband"), Arm("median", scheduler="median")):
        first = replay.replay(answers, arm, seed=3)
        assert first == replay.replay(answers, arm, seed=3), arm.name
        assert first != replay.replay(answers, arm, seed=4), arm.name


def test_every_replayed_search_starts_from_the_yaml_settings(table):
    """As a search evaluates the YAML's own train settings first (search.evaluate_train_first)."""
    import dataclasses

    first = {"learning_rate": 3e-3, "temperature": 2.0, "alpha": 0.5, "kd_loss": "forward_kl", "warmup_iters": 10}
    with_yaml = dataclasses.replace(table, yaml_point=first)
    for arm in (Arm("tpe+asha"), Arm("random", searcher="random"), Arm("bohb", scheduler="hyperband")):
        assert replay.make_driver(arm, with_yaml, seed=0).propose("a") == first, arm.name
        assert replay.make_driver(dataclasses.replace(arm, evaluate_first=False), with_yaml, seed=0).propose("a") != first


def test_the_default_search_finds_the_known_optimum_and_beats_random(table):
    """The bowl's best recorded config is within reach: tune_kd's TPE with ASHA lands on it on half the
    seeds, twice as often as random search with ASHA, and at the same trial-epochs it is ahead."""
    answers = NearestAnswers(table)
    best, spread = table.best_and_spread()
    optimum = int(np.argmin(table.runs.min(axis=2).mean(axis=1)))
    assert table.configs[optimum]["kd_loss"] == "forward_kl"
    default, rand = Arm("tpe+asha", num_samples=32), Arm("random+asha", searcher="random", num_samples=32)
    found, regrets = {"tpe": 0, "random": 0}, {"tpe": [], "random": []}
    for seed in range(6):
        runs = {"tpe": replay.replay(answers, default, seed), "random": replay.replay(answers, rand, seed)}
        spent = min(len(values) for values in runs.values())
        for arm, values in runs.items():
            found[arm] += min(values) <= table.runs[optimum].min(axis=1).max()   # one of the optimum's runs
            regrets[arm].append((min(values[:spent]) - best) / spread)
    assert found["tpe"] >= 3 and found["tpe"] >= 2 * found["random"], found
    assert np.median(regrets["tpe"]) < 0.05 < np.median(regrets["random"]), regrets


def test_asha_and_optuna_pruners_stop_trials_and_tpe_learns_from_them(table):
    answers = NearestAnswers(table)
    full = replay.replay(answers, Arm("tpe", scheduler="none", num_samples=12), seed=0)
    assert len(full) == 12 * table.epochs
    for scheduler in ("asha", "sha", "hyperband", "median"):
        assert len(replay.replay(answers, Arm(scheduler, scheduler=scheduler, num_samples=12), seed=0)) < len(full), scheduler
    driver = replay.make_driver(Arm("tpe+asha", num_samples=4, parallel=4), table, seed=0)
    for trial, curve in enumerate(([1.0, 0.9, 0.8, 0.7], [2.0, 1.9, 1.8, 1.7], [0.5, 0.4, 0.3, 0.2], [3.0, 2.0, 1.0, 0.5])):
        driver.propose(str(trial))
    ended = {}
    for epoch in range(1, 5):   # four trials side by side, ASHA's rungs at epochs 1 and 2
        for trial, curve in enumerate(([1.0, 0.9, 0.8, 0.7], [2.0, 1.9, 1.8, 1.7], [0.5, 0.4, 0.3, 0.2], [3.0, 2.0, 1.0, 0.5])):
            if str(trial) not in ended and (not driver.report(str(trial), epoch, curve[epoch - 1]) or epoch == 4):
                driver.end(str(trial), epoch, curve[epoch - 1])
                ended[str(trial)] = epoch
    assert ended["2"] == 4 and ended["1"] < 4 and ended["3"] < 4
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in driver.searcher._ot_study.trials}
    assert states["2"] == "COMPLETE" and states["1"] == states["3"] == "PRUNED"   # as the search tells ASHA's stops


def test_the_surrogate_answers_held_out_configs_within_the_training_noise():
    table = bowl_table(configs=64, epochs=2, noise=0.03)
    surrogate, nearest = replay.held_out_error(table, "surrogate"), replay.held_out_error(table, "nearest")
    assert surrogate["error"] < 1.5 * surrogate["noise"], surrogate
    assert nearest["error"] > 2 * surrogate["error"], (nearest, surrogate)
    answers = SurrogateAnswers(table)
    optimum = {"learning_rate": 10 ** -2.5, "temperature": 2.0, "alpha": 0.2, "kd_loss": "forward_kl", "warmup_iters": 0}
    assert abs(answers.mean_curve(optimum)[-1] - (bowl(optimum) + 0.5)) < 0.1     # between the recorded configs
    two = [answers.curve(optimum, pick) for pick in range(2)]
    assert not np.allclose(two[0], two[1])                # each recorded seed lends its own noise


@pytest.mark.slow
def test_a_recording_trains_every_config_with_every_seed(world, tmp_path):
    """record.py end to end on the tiny world: 2 configs x 2 seeds, a resumable tune_kd run over the
    grid; the table holds each run's epochs and the seeds really differ."""
    raw = search_raw(world, num_samples=1, train={"epochs": 2, "batch_size": 64})
    raw["search"]["max_concurrent"] = 2
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert record.main(["--table", "tiny", "--space", str(space_file), "--configs", "2", "--seeds", "2", "--epochs", "2",
                        "--max-train-examples", "128", "--storage", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                        "--num-cpus", "2"]) == 0
    loaded = Table.load(tmp_path / "out" / "tiny.csv")
    assert loaded.runs.shape == (2, 2, 2)
    assert list(loaded.space) == ["learning_rate", "temperature", "alpha", "kd_loss", "warmup_iters"]
    assert not np.allclose(loaded.runs[:, 0], loaded.runs[:, 1])      # train.seed 0 and 1 trained differently
    provenance = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert provenance["runs_recorded"] == 4 and provenance["max_train_examples"] == 128 and provenance["commit"]


def test_a_subspace_holds_the_other_keys_and_a_warm_start_begins_where_the_earlier_search_ended(table):
    """Table.subspace searches two keys with the rest at the YAML's values; a search warm-started from
    an earlier replayed search (as search.warm_start gives it) proposes near that search's best from
    its first trials, where the same search started cold proposes at random."""
    import dataclasses

    yaml_point = {"learning_rate": 1e-3, "temperature": 3.0, "alpha": 0.2, "kd_loss": "forward_kl", "warmup_iters": 0}
    view = dataclasses.replace(table, yaml_point=yaml_point).subspace(["learning_rate", "temperature"])
    assert view.fixed == {"alpha": 0.2, "kd_loss": "forward_kl", "warmup_iters": 0}
    answers = NearestAnswers(table)
    earlier = replay.replay_search(answers, Arm("tpe+asha", num_samples=16, evaluate_first=False), seed=1, table=view)
    assert all(set(config) == {"learning_rate", "temperature"} for config, _ in earlier.trials.values())
    warm = earlier.earlier_trials(view.epochs)
    assert len(warm) == 16 and sum(t.completed for t in warm) < 16      # ASHA stopped some: given as stopped
    best = min(warm, key=lambda t: t.value).params

    def distance(config):   # in the unit square (log learning rate)
        return math.hypot(math.log10(config["learning_rate"] / best["learning_rate"]) / 3,
                          (config["temperature"] - best["temperature"]) / 4)

    for searcher_name in ("tpe", "gp"):
        arm = Arm(searcher_name, searcher=searcher_name, num_samples=4, evaluate_first=False)
        first = {}
        for kind, given in (("cold", None), ("warm", warm)):
            run = replay.replay_search(answers, arm, seed=0, table=view, warm=given)
            first[kind] = np.median([distance(config) for config, _ in run.trials.values()])
        assert first["warm"] < 0.7 * first["cold"], (searcher_name, first)   # measured: 0.60 (tpe), 0.41 (gp)
