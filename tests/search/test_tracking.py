"""W&B from a search: offline without credentials (fresh runs and --resume), one run per trial;
Ray's own experiment box stays out of the terminal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import search_raw

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wandb_without_credentials_logs_offline_per_trial_and_on_resume(world, tmp_path):
    """As a new user: wandb: true, no API key, no WANDB_MODE, no ~/.netrc."""
    raw = search_raw(world, num_samples=2, train={"epochs": 1}, scheduler={"type": "none"},
                     logging={"wandb": True, "wandb_project": "tune-kd-test", "tensorboard": True})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_SILENT="true")
    cmd = [sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage", str(tmp_path / "out"),
           "--num-cpus", "2", "--no-export"]
    experiment = tmp_path / "out" / "tiny-search"
    for run in (cmd, cmd + ["--resume"]):
        proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
        assert "Configuration for experiment" not in proc.stdout + proc.stderr   # Ray's box
        assert f"tensorboard --logdir {experiment}" in proc.stdout                 # ours, pointing at the results
        trials = sorted(experiment.glob("trial_*"))
        assert len(trials) == 2
        for trial in trials:
            runs = list((trial / "wandb").glob("offline-run-*"))
            assert runs and any(r.glob("*.wandb") for r in runs), f"{trial.name}: no offline W&B run"
