"""Whole-or-absent writes, block checksums and the one line a full disk gets (config/files.py)."""

import errno
import os
import stat
from pathlib import Path

import pytest
import xxhash

from tune_kd.cli import entry
from tune_kd.config import files
from tune_kd.config.files import BlockChecksums, DiskFullError


def test_block_checksums_written_piecewise_equal_the_files_and_name_the_damaged_block(tmp_path):
    data = os.urandom(10_000)
    sums = BlockChecksums(start=16, block_bytes=4096)
    path = tmp_path / "rows.bin"
    path.write_bytes(b"h" * 16 + data)
    for lo in range(0, len(data), 777):   # written in pieces that straddle the blocks
        sums.add(data[lo:lo + 777], offset=lo)
    record = sums.to_json()
    assert record == files.file_checksums(path, start=16, block_bytes=4096)
    assert record["xxh3_64"][0] == xxhash.xxh3_64_intdigest(data[:4096]) and len(record["xxh3_64"]) == 3
    assert files.verify_blocks(path, record) == []

    with open(path, "r+b") as handle:   # one byte of the second block flipped
        handle.seek(16 + 5000)
        handle.write(bytes([data[5000] ^ 0xFF]))
    assert files.verify_blocks(path, record) == [(4096, 8192)]
    with open(path, "ab") as handle:    # and a tail that was never written
        handle.write(b"x" * 10)
    assert (10_000, 10_010) in files.verify_blocks(path, record)


def test_checksummed_bytes_must_come_in_order():
    sums = BlockChecksums(block_bytes=8)
    sums.add(b"abcd", offset=0)
    with pytest.raises(ValueError, match="out of order"):
        sums.add(b"efgh", offset=8)


def fail_with(code):
    def write(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return write


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EDQUOT, "the disk quota is spent"),
                                        (errno.EROFS, "the file system is read-only")])
def test_a_full_disk_keeps_the_old_file_and_is_one_line(tmp_path, monkeypatch, code, words):
    target = tmp_path / "best.json"
    target.write_text("old")
    monkeypatch.setattr(Path, "write_text", fail_with(code))
    with pytest.raises(DiskFullError) as error:
        files.atomic_write_text(target, "new" * 1000)
    monkeypatch.undo()
    line = str(error.value)
    assert line.startswith(f"{target}: {words} (") and "\n" not in line
    assert "free, 3 kB needed): free space or set data.cache_dir / --storage elsewhere" in line
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best.json"]


def test_other_os_errors_pass_through_as_they_are(tmp_path):
    with pytest.raises(PermissionError):
        with files.disk_writes(tmp_path):
            raise PermissionError(errno.EACCES, "denied")


def test_an_unnamed_full_disk_anywhere_in_a_command_is_one_line_and_exit_2(capsys):
    def command(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/cache/tokens.bin")
    parser = entry.configure(entry.argparse.ArgumentParser(), "doc", lambda p: None)
    assert entry.execute(parser.parse_args([]), command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: /data/cache/tokens.bin: no space left on the device") and "\n" not in err


def test_a_temporary_folder_gets_the_permissions_the_umask_gives(tmp_path):
    import tempfile
    old = os.umask(0o027)
    try:
        folder = Path(tempfile.mkdtemp(dir=tmp_path))
        (folder / "meta.json").write_text("{}")
        os.chmod(folder / "meta.json", 0o600)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        files.permit_as_umask(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert stat.S_IMODE((folder / "meta.json").stat().st_mode) == 0o640
