"""Checkpoint writes that crash or hit a full disk never cost an earlier checkpoint, and a partial
directory is never loaded or exported."""

import errno
import json
import os

import pytest
import torch

from tune_kd.config.errors import UserError
from tune_kd.model import checkpoint
from tune_kd.model.checkpoint import CheckpointWriteError, Progress
from tune_kd.results import export
from tune_kd.results.reading import EXPERIMENT_FILE


@pytest.fixture
def trained(tiny_config):
    """A student with an optimizer, and a save(directory, step) that checkpoints it."""
    from tune_kd.train import loop

    cfg = tiny_config(train={"epochs": 1})
    result = loop.train(cfg)
    student = result.student
    optimizer = torch.optim.AdamW(student.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def save(directory, step):
        checkpoint.save_checkpoint(directory, student, result.tokenizer, optimizer, scaler, Progress(step=step))

    def load(directory):
        return checkpoint.load_checkpoint(directory, student, optimizer, scaler)

    return save, load


def test_crash_while_writing_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    save, load = trained
    target = tmp_path / "last"
    save(target, step=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt   # the process dies half-way through writing
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save(target, step=2)
    monkeypatch.undo()
    assert load(target).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last"]          # no temporary left behind


def test_crash_between_the_renames_is_undone_before_the_next_read(trained, tmp_path, monkeypatch):
    save, load = trained
    target = tmp_path / "last"
    save(target, step=1)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:   # the old version is aside, the new one not yet in place: crash
            raise KeyboardInterrupt
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save(target, step=2)
    monkeypatch.undo()
    assert not target.exists()                                         # the window the crash hit
    assert load(target).step == 1                                      # restored from aside, loadable
    save(target, step=3)
    assert load(target).step == 3


def test_disk_full_fails_clearly_and_keeps_earlier_checkpoints(trained, tmp_path, monkeypatch):
    save, load = trained
    target = tmp_path / "last"
    save(target, step=1)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(CheckpointWriteError) as err:
        save(target, step=2)
    monkeypatch.undo()
    assert str(err.value).startswith(f"{target}: no space left on the device (")
    assert " free, " in str(err.value) and str(err.value).endswith("; earlier checkpoints are intact")
    assert load(target).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_a_checkpoint_cut_short_is_neither_loaded_nor_exported(trained, tmp_path):
    save, load = trained
    experiment = tmp_path / "exp"
    (experiment / "trial_a").mkdir(parents=True)
    (experiment / EXPERIMENT_FILE).write_text(json.dumps({"name": "exp", "metric": {"name": "val_ce",
                                                                                           "mode": "min"}}))
    rows = []
    for epoch, value in ((1, 2.0), (2, 1.0)):
        save(experiment / "trial_a" / f"checkpoint_00000{epoch}", step=epoch)
        rows.append({"trial_id": "a", "epoch": epoch, "val_ce": value, "checkpoint_dir_name": f"checkpoint_00000{epoch}"})
    (experiment / "trial_a" / "result.json").write_text("\n".join(json.dumps(r) for r in rows))
    best = experiment / "trial_a" / "checkpoint_000002"
    with (best / "model.safetensors").open("r+b") as handle:   # a copy cut short: the better epoch is partial
        handle.truncate(100)
    assert not checkpoint.is_complete(best)
    with pytest.raises(UserError, match="incomplete checkpoint"):
        load(best)
    picked = export.export(experiment, tmp_path / "best_student")
    assert picked.path.name == "checkpoint_000001"
    assert checkpoint.is_complete(tmp_path / "best_student")


def test_a_failed_export_leaves_the_previous_export(trained, tmp_path, monkeypatch):
    save, _ = trained
    experiment = tmp_path / "exp"
    save(experiment / "trial_a" / "checkpoint_000001", step=1)
    (experiment / EXPERIMENT_FILE).write_text(json.dumps({"name": "exp", "metric": {"name": "val_ce",
                                                                                           "mode": "min"}}))
    (experiment / "trial_a" / "result.json").write_text(json.dumps(
        {"trial_id": "a", "epoch": 1, "val_ce": 1.0, "checkpoint_dir_name": "checkpoint_000001"}))
    out = tmp_path / "best_student"
    export.export(experiment, out)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(export, "verify_reload", lambda *a: (_ for _ in ()).throw(RuntimeError("crash mid-export")))
    with pytest.raises(RuntimeError):
        export.export(experiment, out)
    assert sorted(p.name for p in out.iterdir()) == before and checkpoint.is_complete(out)


def test_a_checkpoint_folder_is_readable_as_the_umask_says(trained, tmp_path):
    import os
    import stat

    save, _ = trained
    old = os.umask(0o027)
    try:
        save(tmp_path / "last", step=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "last").stat().st_mode) == 0o750   # not mkdtemp's 0700: the group reads it
