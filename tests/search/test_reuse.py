"""Reused trial actors: a trial that runs in a worker an earlier trial used trains exactly as in a
fresh worker, and logs to its own stderr.log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import search_raw
from tune_kd.config.experiment import load_config

SAME = ("train_loss", "val_ce", "val_kl", "val_loss", "val_acc")   # every metric that is not a timing


def reports(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_reused_worker_trains_as_a_fresh_one(world, tmp_path):
    from tune_kd.search import runner

    first = {"learning_rate": 3e-3, "temperature": 2.0, "alpha": 0.5}
    other = {"learning_rate": 8e-3, "temperature": 4.0, "alpha": 0.1}
    # one trial at a time: the second and third run in the first one's worker, the third with the
    # first's config and seed after a trial with other settings
    grid = [first, other, first]
    cfg = load_config(raw=search_raw(world, num_samples=len(grid), train={"epochs": 2}, scheduler={"type": "none"},
                                     search={"max_concurrent": 1}, logging={"tensorboard": False}))
    runner.run_search(cfg, "test", storage=str(tmp_path), num_cpus=1, export_best=False, dashboard_host=None,
                      grid=grid)
    trials = {}
    for trial_dir in (tmp_path / cfg.name).glob("trial_*"):
        rows = reports(trial_dir)
        trials[rows[-1]["trial_in_process"]] = (json.loads((trial_dir / "params.json").read_text()), rows, trial_dir)
    assert sorted(trials) == [1, 2, 3], "the later trials did not run in the first one's worker"
    fresh, reused = trials[1], trials[3]
    assert fresh[0] == reused[0] == first
    assert [{k: r[k] for k in SAME} for r in reused[1]] == [{k: r[k] for k in SAME} for r in fresh[1]]
    assert trials[2][1][-1]["val_ce"] != fresh[1][-1]["val_ce"]   # the trial between them trained otherwise
    for params, rows, trial_dir in trials.values():   # each trial's log lines in its own folder, once
        assert (trial_dir / "stderr.log").read_text().count("train: ") == 1, trial_dir
