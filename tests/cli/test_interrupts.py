"""Ctrl-C while top_k auto measures or while the teacher cache is built: one line, exit code 130, and
nothing half-written that a rerun would trust (the rerun measures and builds it whole)."""

import json

import pytest
import yaml

from tune_kd.cli import entry
from tune_kd.cli import main as cli
from tune_kd.teacher import cache_fidelity, cache_store

from conftest import tiny_raw


def write_config(world, tmp_path, **sections) -> str:
    raw = tiny_raw(world, data={"cache_dir": str(tmp_path / "cache"), "max_train_examples": 300}, **sections)
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def interrupt_on_call(monkeypatch, module, name: str, call: int) -> list:
    """Make module.name raise KeyboardInterrupt (what Ctrl-C raises) on its `call`-th call."""
    calls, original = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def teacher_folder(tmp_path):
    return tmp_path / "cache" / "teacher"


def leftovers(tmp_path) -> list[str]:
    """What the teacher cache folder holds besides lock files."""
    folder = teacher_folder(tmp_path)
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


@pytest.mark.parametrize("where", ["measuring top_k", "building the cache"])
def test_ctrl_c_stops_with_one_line_and_leaves_nothing_a_rerun_would_trust(world, tmp_path, monkeypatch, capsys, where):
    if where == "measuring top_k":   # the second layout of the bisection
        config = write_config(world, tmp_path, teacher_cache={"mode": "on"})
        calls = interrupt_on_call(monkeypatch, cache_fidelity, "measure_layouts", 2)
    else:                            # the third chunk the build compresses
        config = write_config(world, tmp_path, teacher_cache={"mode": "on", "top_k": 16})
        calls = interrupt_on_call(monkeypatch, cache_store, "compress", 3)
    assert cli.main(["prepare", "--config", config]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [entry.INTERRUPTED]
    assert len(calls) == (2 if where == "measuring top_k" else 3)
    assert leftovers(tmp_path) == []          # no auto-*.json, no cache folder, no temporary folder

    monkeypatch.undo()
    assert cli.main(["prepare", "--config", config]) == 0
    (built,) = [d for d in teacher_folder(tmp_path).iterdir() if d.is_dir()]
    cache = cache_store.TeacherCache(built)
    assert cache.values.shape[0] == cache.meta["positions"] == int(cache.row_offsets[-1]) > 0
    if where == "measuring top_k":
        (measured,) = teacher_folder(tmp_path).glob("auto-*.json")
        assert json.loads(measured.read_text())["errors"] and cache.meta["auto"]["chosen_k"] == cache.meta["top_k"]


def test_debug_shows_the_interrupts_traceback(world, tmp_path, monkeypatch):
    config = write_config(world, tmp_path, teacher_cache={"mode": "on", "top_k": 16})
    interrupt_on_call(monkeypatch, cache_store, "compress", 1)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["prepare", "--config", config, "--debug"])
