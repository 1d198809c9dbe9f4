"""The cli package: `tune-kd <command>` and `python -m tune_kd.<command>` share one parser and one error
handler: a UserError is one line on stderr and exit code 2, re-raised with --debug, and an experiment
YAML is --config or --space."""

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tune_kd.cli import main as console
from tune_kd.config.errors import UserError

REPO = Path(__file__).resolve().parents[2]

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


def entry(name: str, style: str):
    """(the command's module, argv -> exit code) for `python -m tune_kd.<name>` or `tune-kd <name>`."""
    module = importlib.import_module(f"tune_kd.cli.{name}")
    if style == "python -m":
        return module, module.main
    return module, lambda argv: console.main([name, *argv])


STYLES = ["python -m", "tune-kd"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_user_error_is_one_line_and_exit_code_2(name, style, monkeypatch, capsys):
    module, main = entry(name, style)
    argv, job = ENTRY_POINTS[name]
    monkeypatch.setattr(module, job, fail)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: x.yaml: something the user can fix"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_debug_shows_the_traceback(name, style, monkeypatch):
    module, main = entry(name, style)
    argv, job = ENTRY_POINTS[name]
    monkeypatch.setattr(module, job, fail)
    with pytest.raises(UserError, match="something the user can fix"):
        main([*argv, "--debug"])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", ["search", "train", "prepare"])
@pytest.mark.parametrize("flag", ["--config", "--space"])
def test_the_experiment_yaml_is_config_or_space(name, flag, style, monkeypatch):
    module, main = entry(name, style)
    seen = []
    monkeypatch.setattr(module, "load_config", lambda path, *a, **k: seen.append(path) or fail())
    assert main([flag, "mine.yaml"]) == 2
    assert seen == ["mine.yaml"]


def test_both_entry_points_build_the_same_parser(capsys):
    """Every command's flags are the same under both: its help lists the same options."""
    for name in ENTRY_POINTS:
        module = importlib.import_module(f"tune_kd.cli.{name}")
        helps = []
        for call in (lambda: module.main(["--help"]), lambda: console.main([name, "--help"])):
            with pytest.raises(SystemExit):
                call()
            text = capsys.readouterr().out
            helps.append(sorted(set(re.findall(r"(--[a-z][a-z_-]*)", text))))
        assert helps[0] == helps[1] and "--debug" in helps[0], name


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


@pytest.mark.slow
def test_the_tune_kd_console_script_is_installed_and_runs_a_command(tmp_path):
    script = shutil.which("tune-kd", path=str(Path(sys.executable).parent)) or shutil.which("tune-kd")
    assert script, "tune-kd is not installed: pip install -e . installs it ([project.scripts])"
    proc = subprocess.run([script, "report", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}: not a tune_kd experiment folder (no "
                                                "experiment.json); give results/<name> of a search"]
    usage = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300).stdout
    assert all(name in usage for name in ENTRY_POINTS)
