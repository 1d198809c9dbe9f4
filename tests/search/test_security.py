"""Exposure: the dashboard's binding and authentication, and no credential in results or output."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tune_kd.cli import main as cli
from tune_kd.config.errors import UserError
from tune_kd.search import preflight

from conftest import search_raw

REPO = Path(__file__).resolve().parents[2]


def test_dashboard_beyond_loopback_warns(monkeypatch, caplog):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    preflight.check_dashboard("127.0.0.1")
    assert not caplog.records
    with caplog.at_level("WARNING"):
        preflight.check_dashboard("0.0.0.0")
    assert "reachable from other machines" in caplog.text and "ray get-auth-token" in caplog.text


def test_dashboard_beyond_loopback_without_authentication_is_refused(monkeypatch, tmp_path, capsys, world):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    preflight.check_dashboard("127.0.0.1")            # loopback stays allowed
    with pytest.raises(UserError, match="would expose the Ray dashboard without authentication"):
        preflight.check_dashboard("0.0.0.0")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(search_raw(world, data={"cache_dir": str(tmp_path / "cache")})))
    assert cli.main(["search", "--space", str(space), "--storage", str(tmp_path / "results"),
                        "--dashboard-host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dashboard-host 0.0.0.0: RAY_AUTH_MODE=disabled" in err[0]
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_no_credential_reaches_results_or_output(world, tmp_path):
    """A search with W&B logging (offline) and fake secrets in its environment: none of them appears in
    any file under the results folder, nor in what the search printed."""
    secrets = {"WANDB_API_KEY": "local-0f1e2d3c4b5a69788796a5b4c3d2e1f0fake0000",
               "HF_TOKEN": "hf_FAKEfakeFAKEfakeFAKEfakeFAKEfake01", "TUNE_KD_TEST_SECRET": "s3cr3t-do-not-print"}
    raw = search_raw(world, num_samples=2, train={"epochs": 1}, scheduler={"type": "none"},
                     logging={"wandb": True, "wandb_project": "tune-kd-test"})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    results = tmp_path / "results"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(results), WANDB_SILENT="true", **secrets)
    proc = subprocess.run([sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage", str(results),
                           "--num-cpus", "2"], cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in results.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files), "W&B wrote nothing: the check would be vacuous"
    assert (results / "tiny-search" / "best_student" / "model.safetensors").is_file()
    for name, value in secrets.items():
        assert value not in proc.stdout and value not in proc.stderr, f"{name} printed"
        leaked = [p for p in files if value.encode() in p.read_bytes()]
        assert not leaked, f"{name} written to {leaked}"
