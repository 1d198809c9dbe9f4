"""Faults a search must survive without losing or corrupting anything: a full disk while the teacher
cache is built (one line, exit 2; the same command then runs), every trial diverged (one line, exit
2, nothing exported), a diverged trial never the best."""

import errno
import json
import math
import re

import pytest
import yaml

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import load_config
from tune_kd.results import export, reading
from tune_kd.search import runner
from tune_kd.search.fault_drills import FAULT_FILE_ENV
from tune_kd.teacher import cache_store

from conftest import search_raw


@pytest.mark.slow
def test_a_full_disk_while_the_teacher_cache_is_built_is_one_line_then_the_same_command_runs(world, tmp_path,
                                                                                            monkeypatch, capsys):
    from tune_kd.cli import search as search_cli

    raw = search_raw(world, num_samples=1, train={"epochs": 1}, scheduler={"type": "none"},
                     teacher_cache={"mode": "on", "top_k": 8}, data={"cache_dir": str(tmp_path / "cache")})
    config = tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(raw))
    argv = ["--config", str(config), "--storage", str(tmp_path / "results"), "--num-cpus", "2", "--no-dashboard"]
    real_write = cache_store.RowFile.write_rows

    def write_rows(self, first, rows):   # the disk fills halfway through the build
        if first > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, first, rows)
    monkeypatch.setattr(cache_store.RowFile, "write_rows", write_rows)
    assert search_cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.match(rf"error: {tmp_path}/cache/teacher/\w+: no space left on the device \([^)]* free, [^)]* needed\): "
                    "free space or set data.cache_dir / --storage elsewhere$", errors[0]), errors[0]
    assert not list((tmp_path / "cache" / "teacher").glob("*/meta.json"))   # nothing half-built kept

    monkeypatch.setattr(cache_store.RowFile, "write_rows", real_write)   # room again: the same command runs
    assert search_cli.main(argv) == 0, capsys.readouterr().err
    experiment = tmp_path / "results" / "tiny-search"
    assert (experiment / "best.json").is_file() and (experiment / "best_student" / "config.json").is_file()


@pytest.mark.slow
def test_when_every_trial_diverges_the_search_says_so_and_exports_nothing(world, tmp_path, monkeypatch):
    fault = tmp_path / "fault.json"   # both trials' weights turn NaN at epoch 1 step 2 (search/fault_drills.py)
    fault.write_text(json.dumps([{"kind": "nan", "epoch": 1, "step": 2, "times": 2}]))
    monkeypatch.setenv(FAULT_FILE_ENV, str(fault))
    cfg = load_config(raw=search_raw(world, num_samples=2, train={"epochs": 2}, scheduler={"type": "none"}))
    with pytest.raises(UserError, match=r"every one of the 2 trials diverged \(loss NaN or inf; the first: loss became "
                                        r"nan at epoch 1 step 3.*nothing is exported: lower train.learning_rate \(the "
                                        r"lowest tried was"):
        runner.run_search(cfg, "test", storage=str(tmp_path), num_cpus=2, dashboard_host=None)
    experiment = tmp_path / "tiny-search"
    rows = list(reading.read_statuses(experiment).values())
    assert [status for status, _ in rows] == ["DIVERGED", "DIVERGED"]          # the table is kept
    assert not (experiment / "best.json").exists() and not (experiment / "best_student").exists()


def test_a_diverged_trial_is_never_the_best_whatever_its_early_epochs(tmp_path, tiny_config):
    cfg = tiny_config(parameters={"learning_rate": {"distribution": "uniform", "min": 1e-4, "max": 1e-2}})
    rows = [{"trial_id": "a", "learning_rate": 9e-3, "epochs": 2, "best_val_ce": 1.10, "val_acc": math.nan,
             "status": "DIVERGED", "error": "loss became nan at epoch 2 step 5"},
            {"trial_id": "b", "learning_rate": 1e-3, "epochs": 3, "best_val_ce": 1.60, "val_acc": 0.5,
             "status": "COMPLETED", "error": ""},
            {"trial_id": "c", "learning_rate": 2e-3, "epochs": 1, "best_val_ce": math.inf, "val_acc": math.nan,
             "status": "STOPPED_EARLY", "error": ""}]
    best = runner.write_summary(tmp_path, cfg, rows)
    assert best["trial_id"] == "b" and json.loads((tmp_path / "best.json").read_text())["trial_id"] == "b"
    runner.check_some_trial_converged(rows, cfg)                       # one converged: no error
    with pytest.raises(UserError, match="every one of the 1 trials diverged"):
        runner.check_some_trial_converged(rows[:1], cfg)
    (tmp_path / "diverged").mkdir()
    assert runner.write_summary(tmp_path / "diverged", cfg, rows[:1]) is None
    assert not (tmp_path / "diverged" / "best.json").exists()


def test_the_export_passes_over_a_diverged_trials_checkpoints(tmp_path):
    from tune_kd.model.checkpoint import write_manifest

    experiment = tmp_path / "exp"
    (experiment).mkdir()
    (experiment / reading.EXPERIMENT_FILE).write_text(json.dumps({"metric": {"name": "val_ce", "mode": "min"}}))
    for trial, values, diverged in (("a", [1.1, math.inf], True), ("b", [1.6], False)):
        folder = experiment / f"trial_{trial}"
        reports = []
        for epoch, value in enumerate(values, start=1):
            row = {"trial_id": trial, "epoch": epoch, "val_ce": value}
            if math.isfinite(value):
                checkpoint = folder / f"checkpoint_{epoch:06d}"
                checkpoint.mkdir(parents=True)
                (checkpoint / "weights").write_text("w")
                write_manifest(checkpoint)
                row["checkpoint_dir_name"] = checkpoint.name
            elif diverged:
                row["diverged"] = "loss became nan"
            reports.append(row)
        (folder / "result.json").write_text("\n".join(json.dumps(r) for r in reports))
    candidate, _ = export.best_candidate(experiment)
    assert candidate.trial_id == "b" and candidate.value == 1.6
    assert export.best_candidate(experiment, "a")[0].value == 1.1          # asked for by name: still exportable
