"""Shared fixtures: a tiny offline world (tokenizer, chat data, trained teacher) built once per session."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tune_kd.config.experiment import load_config
from tune_kd.search import demo

TINY_ARCH = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    """Tokenizer, train/val JSONL and a teacher trained for a few seconds (alpha = 1)."""
    root = tmp_path_factory.mktemp("world")
    demo.build_tokenizer(root / "tokenizer")
    demo.write_jsonl(root / "train.jsonl", demo.make_conversations(1200, seed=1))
    demo.write_jsonl(root / "val.jsonl", demo.make_conversations(120, seed=2))
    paths = {"root": root, "tokenizer": str(root / "tokenizer"), "train": str(root / "train.jsonl"),
             "val": str(root / "val.jsonl"), "cache": str(root / "cache")}
    from tune_kd.model.checkpoint import save_student
    from tune_kd.train.loop import train

    teacher_cfg = tiny_raw(paths, teacher=None, student={"arch": dict(TINY_ARCH, hidden_size=64)},
                           train={"alpha": 1.0, "epochs": 2, "learning_rate": 5e-3})
    result = train(load_config(raw=teacher_cfg))
    save_student(result.student, result.tokenizer, root / "teacher")
    paths["teacher"] = str(root / "teacher")
    return paths


def tiny_raw(paths: dict, **sections) -> dict:
    """A raw config dict for a seconds-long CPU run on the tiny world; sections override keys."""
    raw = {
        "name": "tiny",
        "tokenizer": paths["tokenizer"],
        "teacher": {"path": paths.get("teacher")},
        "student": {"arch": dict(TINY_ARCH)},
        "data": {"path": paths["train"], "val_path": paths["val"], "max_seq_len": 64, "cache_dir": paths["cache"]},
        "train": {"epochs": 2, "batch_size": 32, "learning_rate": 3e-3, "dtype": "float32", "device": "cpu",
                  "alpha": 0.5, "temperature": 2.0, "log_interval": 10, "seed": 0},
        "logging": {"tensorboard": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


@pytest.fixture
def tiny_config(world):
    """Build an ExperimentConfig on the tiny world: tiny_config(train={...}, ...)."""
    return lambda **sections: load_config(raw=tiny_raw(world, **sections))


PARAMETERS = {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
              "temperature": {"distribution": "uniform", "min": 1.0, "max": 4.0},
              "alpha": {"distribution": "uniform", "min": 0.0, "max": 1.0}}


def search_raw(world, num_samples=6, **sections):
    raw = tiny_raw(world, name="tiny-search", train={"epochs": 3, "batch_size": 64}, parameters=copy.deepcopy(PARAMETERS),
                   # TPE: the tiny searches' ASHA stops were set against its proposals; the GP that
                   # sampler auto picks here runs in test_search_end_to_end and tests/search/test_gp_sampler.py
                   search={"num_samples": num_samples, "seed": 0, "max_failures": 1, "sampler": "tpe"},
                   scheduler={"grace_period": 1, "reduction_factor": 2}, resources={"cpu_per_trial": 1},
                   logging={"tensorboard": True},
                   controls={"plain_sft": False, "minimind_defaults": False, "seeds": 0})   # test_search_end_to_end turns them on
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


# trials.csv status -> the state the trial's Optuna trial must end in
OPTUNA_STATE = {"COMPLETED": "COMPLETE", "STOPPED_EARLY": "PRUNED", "DIVERGED": "PRUNED", "REJECTED": "PRUNED",
                "ERROR": "FAIL"}


def check_study_agrees(experiment_dir: Path) -> None:
    """What every finished search (fresh or resumed) leaves: optuna.db holds no RUNNING or WAITING trial;
    each trials.csv row's Optuna trial (its latest with that tune_trial_id) is in the state its status
    maps to and ranks by the row's best value; every other Optuna trial is FAIL (asked but never run,
    or replaced by a retry), except the earlier search's trials a warm start gave it; best.json names
    the best row, which is the study's best trial when it completed."""
    import optuna

    from tune_kd.search.searcher import epoch_values
    from tune_kd.search.warm_start import WARM_START_ATTR

    experiment = json.loads((experiment_dir / "experiment.json").read_text())
    metric, mode = experiment["metric"]["name"], experiment["metric"]["mode"]
    study = optuna.load_study(study_name=experiment["name"], storage=f"sqlite:///{experiment_dir / 'optuna.db'}")
    assert not [t.number for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    latest = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}   # study.trials is in number order
    with (experiment_dir / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    pick = min if mode == "min" else max
    ranked = {}
    for row in rows:
        trial = latest.get(row["trial_id"])
        assert trial is not None, f"trial {row['trial_id']} is not in the study"
        assert trial.state.name == OPTUNA_STATE[row["status"]], (row, trial)
        reported = [v for v in epoch_values(trial).values() if not math.isnan(v)]
        told = trial.values[0] if trial.state.name == "COMPLETE" else pick(reported) if reported else math.nan
        value = float(row[f"best_{metric}"])
        assert told == value or math.isnan(told) and math.isnan(value), (row, trial)
        ranked[row["trial_id"]] = value
    mapped = {latest[r["trial_id"]].number for r in rows}
    assert all(t.state.name == "FAIL" for t in study.trials if t.number not in mapped and WARM_START_ATTR not in t.user_attrs)
    scored = {trial_id: value for trial_id, value in ranked.items() if not math.isnan(value)}
    if not scored:
        assert not (experiment_dir / "best.json").exists()
        return
    best = json.loads((experiment_dir / "best.json").read_text())
    assert best[f"best_{metric}"] == pick(scored.values()) == scored[best["trial_id"]]
    if best["status"] == "COMPLETED" and len(study.directions) == 1 and not any(WARM_START_ATTR in t.user_attrs
                                                                                for t in study.trials):
        assert study.best_trial.number == latest[best["trial_id"]].number
    elif best["status"] == "COMPLETED":   # two objectives: the best by the metric is on Optuna's front
        assert latest[best["trial_id"]].number in {t.number for t in study.best_trials}


def render_in_chromium(page: Path) -> str:
    """The DOM of `page` after headless Chromium loaded it and ran its scripts (as a user opens it)."""
    import shutil
    import subprocess

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.fail("headless Chromium is needed to check the report: install Debian's chromium package "
                    "(the README's test command does)")
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def step_run(cfg, student, teacher, precision, columns=None, cache=None):
    """A Run around a test's own models, for train/step.backward_step: cfg's run (train/run.build_run)
    with them swapped in (the teacher a ScoredLM, run live; with `cache`, its rows read there), and no
    loss scaling."""
    import dataclasses

    from tune_kd.teacher.local import CacheReader, LiveTeacher
    from tune_kd.train.run import build_run

    run = build_run(cfg, cache=False)
    live = LiveTeacher(teacher, precision, columns) if teacher is not None else None
    return dataclasses.replace(run, student=student, trained=student,
                               teacher=CacheReader(cache, live) if cache is not None else live, precision=precision,
                               need_teacher=teacher is not None,
                               scaler=torch.amp.GradScaler(precision.device.type, enabled=False))
