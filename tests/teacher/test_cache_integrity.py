"""The teacher cache proves its contents: block checksums verified once by the planning process, a
damaged block named and rebuilt, non-finite teacher logits refused at build, a full disk one line,
a complete cache used whatever the free space."""

import errno
import logging
import os
import shutil

import pytest
import torch

from tune_kd.config import files
from tune_kd.config.experiment import load_config
from tune_kd.config.files import DiskFullError
from tune_kd.data import inputs, tokenized
from tune_kd.kd.scored import Scored
from tune_kd.search.prepare import prepare_teacher_rows
from tune_kd.teacher import cache_plan, cache_store, stored_rows
from tune_kd.teacher.local import CacheReader

from conftest import tiny_raw


@pytest.fixture
def cache_cfg(world, tmp_path):
    """A config whose teacher cache (top-8, on) lives in this test's own folder."""
    return load_config(raw=tiny_raw(world, teacher_cache={"mode": "on", "top_k": 8},
                                    data={"cache_dir": str(tmp_path / "cache"), "max_train_examples": 300}))


def damage(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.mark.parametrize("garbage", ["random", "zeros"])
def test_a_damaged_block_is_named_by_rows_and_the_cache_rebuilt(cache_cfg, monkeypatch, caplog, garbage):
    monkeypatch.setattr(files, "BLOCK_BYTES", 64 << 10)   # several blocks in a small cache
    builds = []
    original = cache_store.build
    monkeypatch.setattr(cache_store, "build", lambda *a, **k: (builds.append(1), original(*a, **k)))
    cache = prepare_teacher_rows(cache_cfg, serve=False)[0]
    good = {name: (cache.directory / name).read_bytes() for name in ("values.npy", "ids.npy", "tail.npy")}
    values = cache_store.RowFile(cache.directory / "values.npy")
    row = values.shape[0] // 2
    offset = values.start + row * values.row_bytes
    damage(cache.directory / "values.npy", offset, os.urandom(4096) if garbage == "random" else bytes(4096))
    first_block = (row * values.row_bytes) // (64 << 10)
    rows_per_block = (64 << 10) / values.row_bytes
    assert cache_store.damaged_blocks(cache.directory)[0].startswith(f"values.npy rows {int(first_block * rows_per_block):,}..")

    with caplog.at_level(logging.WARNING):
        rebuilt = prepare_teacher_rows(cache_cfg, serve=False)[0]
    warned = [r.getMessage() for r in caplog.records if "damaged on disk" in r.getMessage()]
    assert len(warned) == 1 and "values.npy rows" in warned[0] and "rebuilding it" in warned[0]
    assert len(builds) == 2 and rebuilt.directory == cache.directory
    assert all((rebuilt.directory / name).read_bytes() == data for name, data in good.items())
    assert cache_store.damaged_blocks(rebuilt.directory) == []


def test_trials_trust_the_verified_cache_and_the_planner_reads_it_once(cache_cfg, monkeypatch):
    prepare_teacher_rows(cache_cfg, serve=False)
    checked = []
    monkeypatch.setattr(cache_store, "damaged_blocks", lambda d: (checked.append(d), [])[1])
    prepare_teacher_rows(cache_cfg, serve=False)             # the search's driver, prepare, train
    assert len(checked) == 1
    from tune_kd.train.run import build_run
    assert isinstance(build_run(cache_cfg).teacher, CacheReader)   # a trial: no second read of the whole cache
    assert len(checked) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_teacher_logits_stop_the_build_and_leave_nothing(tiny_config, tmp_path, bad):
    cfg = tiny_config(data={"max_train_examples": 40})
    _, train_data, _ = inputs.load_data(cfg)

    def rows(batch):
        count = int((batch["labels"][:, 1:] != tokenized.IGNORE_INDEX).sum())
        logits = torch.randn(count, 103)
        logits[count // 2, 7] = bad
        return Scored.of_logits(logits)
    with pytest.raises(cache_store.TeacherLogitsNotFinite, match="NaN or inf at the scored positions of examples 0..39"):
        cache_store.build(rows, train_data, 0, stored_rows.layout(8, 103, "float16"), tmp_path / "cache" / "key", {})
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_full_disk_while_building_is_one_line_and_leaves_nothing(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(data={"max_train_examples": 40})
    _, train_data, _ = inputs.load_data(cfg)
    calls = []

    def pwrite(fd, data, offset):   # the disk fills on the third write
        calls.append(offset)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)
    monkeypatch.setattr(cache_store.os, "pwrite", pwrite)
    lay = stored_rows.layout(8, 103, "float16")
    target = tmp_path / "cache" / "key"
    with pytest.raises(DiskFullError) as error:
        cache_store.build(lambda b: Scored.of_logits(torch.randn(int((b["labels"][:, 1:] != -100).sum()), 103)),
                          train_data, 0, lay, target, {})
    needed = int(train_data.target_counts.sum()) * lay.bytes_per_position
    assert str(error.value).startswith(f"{target}: no space left on the device (")
    assert f"{files.size_text(needed)} needed): free space or set data.cache_dir" in str(error.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_complete_cache_is_used_whatever_the_free_space(cache_cfg, monkeypatch):
    built = prepare_teacher_rows(cache_cfg, serve=False)[0]
    usage = shutil.disk_usage(cache_cfg.data.cache_dir)
    monkeypatch.setattr(cache_plan.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    cache, why = prepare_teacher_rows(cache_cfg, serve=False)[:2]
    assert cache is not None and cache.directory == built.directory, why
    auto = cache_cfg.replace(teacher_cache=cache_cfg.teacher_cache.__class__(
        **{**cache_cfg.teacher_cache.__dict__, "mode": "auto"}))
    assert prepare_teacher_rows(auto, serve=False)[0].directory == built.directory
    shutil.rmtree(built.directory)        # not on disk: 1000 bytes free is too little, said so
    cache, why = prepare_teacher_rows(auto, serve=False)[:2]
    assert cache is None and "more than 90% of the" in why
