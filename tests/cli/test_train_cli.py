"""The single-run CLI: seed flags, one-line errors with exit code 2, and DDP under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_raw

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd=REPO, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "tune_kd.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def write_yaml(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_config_error_is_one_line_exit_2(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"teacher": {"path": "t"}, "train": {"alpha": 3}})
    proc = run_cli("--config", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.alpha: must be in [0, 1]" in lines[0] and f"{bad}:" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bad_data_line_is_one_line_exit_2(tmp_path, world):
    data = tmp_path / "d.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                    '{"conversations": [{"role": "user", "content": "x"}\n')
    cfg = write_yaml(tmp_path / "c.yaml", tiny_raw(world))
    proc = run_cli("--config", str(cfg), "--data_path", str(data), "--out_dir", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {data}:2: not valid JSON (Expecting ',' delimiter at column 52)"
    assert "Traceback" not in proc.stderr
    debug = run_cli("--config", str(cfg), "--data_path", str(data), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_seed_flags_override_the_config_and_outputs_are_written(tmp_path, world):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_raw(world))
    out = tmp_path / "out"
    proc = run_cli("--config", str(cfg), "--out_dir", str(out), "--epochs", "1", "--alpha", "1.0",
                   "--batch_size", "64", "--log_interval", "5")
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    assert metrics[0]["val_loss"] == pytest.approx(metrics[0]["val_ce"])      # alpha 1: the objective is CE
    assert (out / "best" / "model.safetensors").is_file() and (out / "last" / "trainer_state.pt").is_file()
    assert "step 5/" in proc.stderr


@pytest.mark.slow
def test_torchrun_ddp_on_cpu_trains_and_saves_once(tmp_path, world):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_raw(world))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "tune_kd.train", "--ddp", "--config", str(cfg),
                           "--out_dir", str(out), "--epochs", "2", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]              # one writer: rank 0
    assert metrics[1]["val_ce"] < metrics[0]["val_ce"]
    assert proc.stdout.count("done: epoch 2") == 1
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", "metrics.jsonl"]


@pytest.mark.slow
def test_bad_data_is_reported_before_the_demo_is_built(tmp_path):
    """A fresh checkout (no results/demo) with the demo YAML and the user's own --data_path: the bad
    line is reported at once; the demo teacher (minutes of training) is not built first."""
    data = tmp_path / "mine.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}\n')
    proc = subprocess.run([sys.executable, "-m", "tune_kd.train", "--config", str(REPO / "search_spaces/kd.yaml"),
                           "--data_path", str(data)], cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{data}:2:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results" / "demo" / "teacher").exists()
