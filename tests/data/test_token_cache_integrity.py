"""The token cache proves its contents, and a full disk while preparing is one line: on a real
small tmpfs where this machine lets the tests mount one, else on an injected ENOSPC."""

import errno
import logging
import subprocess
from pathlib import Path

import pytest
import yaml

from tune_kd.cli import prepare as prepare_cli
from tune_kd.data import ingest, inputs, tokenized

from conftest import tiny_raw


def test_a_damaged_token_block_is_named_by_examples_and_rebuilt(tiny_config, tmp_path, caplog):
    cfg = tiny_config(data={"cache_dir": str(tmp_path / "cache")})
    train = tokenized.tokenize_cached(cfg.data.path, inputs.run_tokenizers(cfg).student, 64, cfg.data.cache_dir)
    directory = Path(cfg.data.cache_dir) / "tokenized" / train.identity
    tokens = directory / "tokens.bin"
    good = tokens.read_bytes()
    with open(tokens, "r+b") as handle:
        handle.seek(len(good) // 2)
        handle.write(bytes(64))
    assert ingest.damaged_blocks(directory) == ["tokens.bin examples 0..1,199"]   # one 16 MiB block: every example
    tokenized.tokenize_cached(cfg.data.path, inputs.run_tokenizers(cfg).student, 64, cfg.data.cache_dir)
    assert tokens.read_bytes() != good                      # a trial does not read the whole cache again
    with caplog.at_level(logging.WARNING):
        again = tokenized.tokenize_cached(cfg.data.path, inputs.run_tokenizers(cfg).student, 64, cfg.data.cache_dir,
                                          verify=True)
    assert any("token cache" in r.getMessage() and "tokens.bin examples 0..1,199" in r.getMessage()
               and "rebuilding it" in r.getMessage() for r in caplog.records)
    assert tokens.read_bytes() == good and again.identity == train.identity


@pytest.fixture
def small_disk(tmp_path):
    """A 64 kB tmpfs at tmp_path/disk (resize(bytes) grows it), or None where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_while_preparing_is_one_line_exit_2_and_the_same_command_then_works(world, tmp_path, small_disk,
                                                                                         monkeypatch, capsys):
    cache_dir = tmp_path / "disk" / "cache"
    config = tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(world, data={"cache_dir": str(cache_dir)}, teacher_cache={"mode": "off"})))
    if small_disk is None:   # no mount here: the disk fills on the first block of tokens
        real_write = ingest.BlockChecksums.add
        monkeypatch.setattr(ingest.BlockChecksums, "add",
                            lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert prepare_cli.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no space left on the device (" in err[0], err
    assert "needed): free space or set data.cache_dir / --storage elsewhere" in err[0]
    assert not (cache_dir / "tokenized").exists() or not any((cache_dir / "tokenized").iterdir())   # nothing half-made

    if small_disk is None:
        monkeypatch.setattr(ingest.BlockChecksums, "add", real_write)
    else:
        small_disk("16m")
    assert prepare_cli.main(["--config", str(config)]) == 0
    assert "prepared in" in capsys.readouterr().out
