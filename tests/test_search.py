"""The search end to end on local Ray (2 CPUs): ASHA, Optuna, summary, export, faults, resume."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_raw
from tune_kd.config import load_config

REPO = Path(__file__).resolve().parents[1]
PARAMETERS = {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
              "temperature": {"distribution": "uniform", "min": 1.0, "max": 4.0},
              "alpha": {"distribution": "uniform", "min": 0.0, "max": 1.0}}


def search_raw(world, num_samples=6, **sections):
    raw = tiny_raw(world, name="tiny-search", train={"epochs": 3, "batch_size": 64}, parameters=copy.deepcopy(PARAMETERS),
                   search={"num_samples": num_samples, "seed": 0, "max_failures": 1},
                   scheduler={"grace_period": 1, "reduction_factor": 2}, resources={"cpu_per_trial": 1},
                   logging={"tensorboard": True})
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def epochs_by_trial(experiment_dir: Path) -> dict[str, list[int]]:
    out = {}
    for result in experiment_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = [r["epoch"] for r in rows]
    return out


class ActorProbe:
    """A Tune callback that asks Ray's state API (served by the dashboard) for the live actors."""

    def __init__(self):
        self.class_names = set()

    def __getattr__(self, name):   # every other Callback hook: do nothing
        if name.startswith("on_") or name in ("setup", "get_state", "set_state"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from ray.util.state import list_actors

        for actor in list_actors(filters=[("state", "=", "ALIVE")]):
            self.class_names.add(actor.class_name)


@pytest.mark.slow
def test_search_end_to_end(world, tmp_path):
    import optuna
    import ray
    import torch
    from ray.tune import Callback
    from transformers import AutoModelForCausalLM

    from tune_kd import data, loop, models, search

    class Probe(ActorProbe, Callback):
        pass

    probe = Probe()
    cfg = load_config(raw=search_raw(world))
    urls = []
    original_init = ray.init

    def init_and_record(*args, **kwargs):
        context = original_init(*args, **kwargs)
        urls.append(context.dashboard_url)
        return context

    ray.init = init_and_record
    try:
        summary = search.run_search(cfg, "test", storage=str(tmp_path), num_cpus=2, callbacks=[probe])
    finally:
        ray.init = original_init
    experiment = tmp_path / "tiny-search"

    # the dashboard was up on loopback and listed the trial actors while trials ran
    assert urls and urls[0].startswith("127.0.0.1:")
    assert any(name.startswith("distill_tiny_search") for name in probe.class_names), probe.class_names
    assert summary["parallel"] == 2

    rows = summary["rows"]
    assert len(rows) == 6 and len((experiment / "trials.csv").read_text().splitlines()) == 7
    assert any(r["status"] == "STOPPED_EARLY" for r in rows)
    for trial, epochs in epochs_by_trial(experiment).items():
        assert epochs == list(range(1, len(epochs) + 1)), (trial, epochs)

    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{experiment / 'optuna.db'}")
    states = {t.state.name for t in study.trials}
    assert {"PRUNED", "COMPLETE"} <= states
    first = study.trials[0].params            # the YAML's own train settings are evaluated first
    assert first == {"learning_rate": 3e-3, "temperature": 2.0, "alpha": 0.5}
    assert all(t.intermediate_values for t in study.trials)

    # the exported student reloads and scores the reported best val_ce
    best = json.loads((experiment / "best.json").read_text())
    exported = experiment / "best_student"
    meta = json.loads((exported / "tune_kd.json").read_text())
    assert meta["trial_id"] == best["trial_id"] and meta["metrics"]["val_ce"] == pytest.approx(best["best_val_ce"])
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (exported / name).is_file(), name
    student = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    tokenizer, _, val_data = loop.load_data(cfg)
    precision = models.resolve_precision("float32", torch.device("cpu"))
    metrics = loop.evaluate(loop.SelectedLogits(student), None, val_data, tokenizer.pad_token_id, cfg, precision, None)
    assert metrics["val_ce"] == pytest.approx(best["best_val_ce"], rel=1e-5)
    assert list(experiment.glob("trial_*/events.out.tfevents*"))   # TensorBoard logs


@pytest.mark.slow
@pytest.mark.parametrize("times,max_failures,errored", [(1, 1, 0), (2, 0, 2)])
def test_failing_trials_are_retried_or_marked_errored(world, tmp_path, monkeypatch, times, max_failures, errored):
    import ray

    from tune_kd import search

    fault = tmp_path / "fault.json"
    fault.write_text(json.dumps({"epoch": 2, "times": times}))
    monkeypatch.setenv("TUNE_KD_FAULT_FILE", str(fault))   # inherited by the Ray workers started below
    cfg = load_config(raw=search_raw(world, num_samples=4, search={"max_failures": max_failures},
                                     scheduler={"type": "none"}))
    summary = search.run_search(cfg, "test", storage=str(tmp_path), num_cpus=2)
    assert not ray.is_initialized()
    assert json.loads(fault.read_text())["times"] == 0            # the faults really fired
    rows = summary["rows"]
    assert len(rows) == 4
    assert sum(r["status"] == "ERROR" for r in rows) == errored
    assert all("injected fault" in r["error"] for r in rows if r["status"] == "ERROR")
    assert sum(r["status"] == "COMPLETED" for r in rows) == 4 - errored
    for trial, epochs in epochs_by_trial(tmp_path / "tiny-search").items():
        assert epochs == list(range(1, len(epochs) + 1))          # a retry resumes, never repeats an epoch
    assert (tmp_path / "tiny-search" / "best_student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(world, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(search_raw(world, num_samples=6, scheduler={"type": "none"},
                                               search={"max_concurrent": 1})))
    cmd = [sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage", str(tmp_path), "--num-cpus", "2"]
    experiment = tmp_path / "tiny-search"
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        finished = {t: e for t, e in epochs_by_trial(experiment).items() if e and e[-1] == 3}
        if len(finished) >= 2:
            break
        time.sleep(0.5)
    assert len(finished) >= 2, "the search did not get going"
    time.sleep(2)
    os.killpg(driver.pid, signal.SIGKILL)                          # the driver and everything it started
    driver.wait(timeout=30)
    before = epochs_by_trial(experiment)
    assert len(before) < 6

    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = epochs_by_trial(experiment)
    assert len(after) == 6
    for trial, epochs in finished.items():
        assert after[trial] == epochs                               # finished trials were not re-run
    for trial, epochs in after.items():
        assert epochs == [1, 2, 3], (trial, epochs)
    assert len((experiment / "trials.csv").read_text().splitlines()) == 7
    assert (experiment / "best_student" / "model.safetensors").is_file()


def test_bad_space_fails_before_ray_starts(tmp_path, world):
    raw = search_raw(world)
    raw["parameters"]["alpha"]["max"] = 1.5
    raw["search"]["num_samples"] = 0
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "parameters.alpha.max: must be in [0, 1]" in proc.stderr
    assert "search.num_samples: must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_missing_paths_and_gpus_are_config_errors(world):
    from tune_kd.config import ConfigError
    from tune_kd.search import check_gpus, check_paths

    cfg = load_config(raw=search_raw(world, data={"path": "/nonexistent/train.jsonl"}, teacher={"path": "/no/teacher"},
                                     resources={"gpu_per_trial": 2}))
    with pytest.raises(ConfigError) as err:
        check_paths(cfg, "x.yaml")
    assert len(err.value.problems) == 2
    assert "x.yaml: data.path: /nonexistent/train.jsonl does not exist" in str(err.value)
    assert "teacher.path: /no/teacher does not exist" in str(err.value)
    with pytest.raises(ConfigError, match="resources.gpu_per_trial: 2 asked for, but this machine has 0 GPU"):
        check_gpus(cfg, 0, "x.yaml")


def test_resources_and_concurrency(world):
    from tune_kd.search import concurrency, trial_resources

    cfg = load_config(raw=search_raw(world))
    resources = trial_resources(cfg, gpus=0)
    assert resources == {"cpu": 1.0, "gpu": 0}
    assert concurrency(cfg, resources, cpus=2, gpus=0) == 2
    shared = load_config(raw=search_raw(world, resources={"gpu_per_trial": 0.25, "cpu_per_trial": 2}))
    assert concurrency(shared, trial_resources(shared, gpus=1), cpus=16, gpus=1) == 4
