"""The shared runner (cli.py): every entry point turns a UserError into one line on stderr and exit
code 2, re-raises it with --debug, and takes an experiment YAML as --config or --space."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tune_kd.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# entry point -> (argv, the function its command calls to do its job)
ENTRY_POINTS = {
    "search": (["--config", "x.yaml"], "load_config"),
    "train": (["--config", "x.yaml"], "run"),
    "prepare": (["--config", "x.yaml"], "load_config"),
    "export": (["results/x", "--out", "out"], "export"),
    "report": (["results/x"], "experiment_dirs"),
    "demo": (["--root", "demo"], "prepare"),
}


def fail(*args, **kwargs):
    raise UserError("x.yaml: something the user can fix")


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_user_error_is_one_line_and_exit_code_2(name, monkeypatch, capsys):
    module = importlib.import_module(f"tune_kd.{name}")
    argv, job = ENTRY_POINTS[name]
    monkeypatch.setattr(module, job, fail)
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: x.yaml: something the user can fix"]


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_debug_shows_the_traceback(name, monkeypatch):
    module = importlib.import_module(f"tune_kd.{name}")
    argv, job = ENTRY_POINTS[name]
    monkeypatch.setattr(module, job, fail)
    with pytest.raises(UserError, match="something the user can fix"):
        module.main([*argv, "--debug"])


@pytest.mark.parametrize("name", ["search", "train", "prepare"])
@pytest.mark.parametrize("flag", ["--config", "--space"])
def test_the_experiment_yaml_is_config_or_space(name, flag, monkeypatch):
    module = importlib.import_module(f"tune_kd.{name}")
    seen = []
    monkeypatch.setattr(module, "load_config", lambda path, *a, **k: seen.append(path) or fail())
    assert module.main([flag, "mine.yaml"]) == 2
    assert seen == ["mine.yaml"]


@pytest.mark.slow
def test_python_m_prints_one_line_and_with_debug_the_traceback(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "tune_kd.report", str(tmp_path), *args],  # noqa: E731
                                       cwd=REPO, capture_output=True, text=True, timeout=300)
    plain = run()
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"error: {tmp_path}: not a tune_kd experiment folder (no "
                                                 "experiment.json); give results/<name> of a search"]
    debug = run("--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UserError" in debug.stderr
