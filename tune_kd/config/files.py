"""Writing files whole or not at all, block checksums that prove a cache is what was written, and
the one line a full disk gets.

Every cache and result tune_kd writes goes through a temporary name and is renamed into place
complete (atomic_write_text here; the cache and checkpoint folders rename a temporary sibling
folder), so a crash or a full disk leaves the previous copy or nothing, never half of one.

A write that fails because the disk is full (ENOSPC), the quota is spent (EDQUOT) or the file
system is read-only (EROFS) is the user's to fix, not a bug: `disk_writes(path, needed)` turns it
into DiskFullError, a UserError printed as one line with exit code 2 (cli/entry.py):

    <path>: no space left on the device (<free> free, <needed> needed): free space or set data.cache_dir / --storage elsewhere

BlockChecksums: an XXH3-64 hash per fixed-size block of a file's bytes, computed as the bytes are
written (about 11 GB/s on one core here, so it costs little next to the write: zlib's CRC-32 runs
at 3 GB/s) and checked later by reading the file back a block at a time (verify_blocks, on a few
threads: hashing and pread release the GIL), which names the damaged blocks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from tune_kd.config.errors import UserError

# errno -> how the line names it; any other OSError is a bug or a broken disk, not a full one
NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is spent",
           errno.EROFS: "the file system is read-only"}
FIX = "free space or set data.cache_dir / --storage elsewhere"
BLOCK_BYTES = 16 << 20       # a checksum per 16 MiB: a damaged spot is named to within a few MB
VERIFY_THREADS = 4           # blocks hashed at once when verifying (the page cache's copy and the hash in parallel)


class DiskFullError(UserError):
    """A write failed for lack of room (or a read-only disk); what was being written is not kept."""


def size_text(nbytes: float) -> str:
    """Bytes as a short human figure (1.5 GB, 320 MB, 12 kB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} B"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding `path` (its nearest existing parent), None if unknowable."""
    for place in (Path(path), *Path(path).parents):
        if place.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(place).free
            return None
    return None


def no_room_line(path: Path | str, error: OSError, needed: int | None = None) -> str:
    """The one line for a write that failed for lack of room at `path`."""
    free = free_bytes(Path(path))
    figures = [f"{size_text(free)} free" if free is not None else None,
               f"{size_text(needed)} needed" if needed else None]
    shown = ", ".join(f for f in figures if f)
    return f"{path}: {NO_ROOM[error.errno]}{f' ({shown})' if shown else ''}: {FIX}"


def is_no_room(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in NO_ROOM


@contextlib.contextmanager
def disk_writes(path: Path | str, needed: int | None = None):
    """Writes to `path` inside this block that fail for lack of room raise DiskFullError (one line,
    exit 2); the caller's own cleanup (a temporary folder removed) runs first, as the error passes."""
    try:
        yield
    except OSError as error:
        if not is_no_room(error):
            raise
        raise DiskFullError(no_room_line(path, error, needed)) from error


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` to `path` through a temporary sibling renamed into place: a reader sees the old
    file or the whole new one; a full disk raises DiskFullError and leaves the old one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with disk_writes(path, len(text.encode())):
        try:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def current_umask() -> int:
    """This process's umask (read from /proc on Linux, where setting it to read it would race threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def permit_as_umask(directory: Path) -> None:
    """Give a folder made by tempfile.mkdtemp (always 0700) and its files the permissions the
    user's umask gives a new folder and file: a cache shared by a group stays readable by it."""
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for child in Path(directory).iterdir():
        if child.is_file():
            os.chmod(child, 0o666 & ~mask)


# ----------------------------------------------------------------------------------------------
# Block checksums
# ----------------------------------------------------------------------------------------------

def block_hash(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass
class BlockChecksums:
    """XXH3-64 hashes of a file's bytes from `start` on, one per `block_bytes`, fed in file order (add)."""

    start: int = 0                       # where the checked bytes begin (after a .npy header)
    block_bytes: int = BLOCK_BYTES
    hashes: list = field(default_factory=list)
    _filled: int = 0                     # bytes of the current (last, unfinished) block
    _hasher: object = field(default_factory=xxhash.xxh3_64)
    _offset: int = 0                     # the next byte expected, counted from start

    def add(self, data, offset: int | None = None) -> None:
        """Fold the next bytes in; `offset` (from start), when given, must be where the last ended:
        blocks are checksummed in one pass, so the bytes must come in order."""
        if offset is not None and offset != self._offset:
            raise ValueError(f"checksummed bytes out of order: at {offset}, expected {self._offset}")
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.block_bytes - self._filled)
            self._hasher.update(view[:take])
            self._filled += take
            self._offset += take
            view = view[take:]
            if self._filled == self.block_bytes:
                self.hashes.append(self._hasher.intdigest())
                self._hasher, self._filled = xxhash.xxh3_64(), 0

    def to_json(self) -> dict:
        """The finished record (the last, partial block closed): what meta.json keeps per file."""
        hashes = self.hashes + ([self._hasher.intdigest()] if self._filled else [])
        return {"start": self.start, "block_bytes": self.block_bytes, "bytes": self._offset, "xxh3_64": hashes}


def file_checksums(path: Path, start: int = 0, block_bytes: int = BLOCK_BYTES) -> dict:
    """BlockChecksums of an existing file's bytes from `start` (small files written in one go)."""
    sums = BlockChecksums(start, block_bytes)
    with open(path, "rb") as handle:
        handle.seek(start)
        for block in iter(lambda: handle.read(block_bytes), b""):
            sums.add(block)
    return sums.to_json()


def verify_blocks(path: Path, record: dict) -> list[tuple[int, int]]:
    """The byte ranges [lo, hi) (counted from record["start"]) of `path`'s blocks whose hash does
    not match the record, a file of the wrong length included (its missing or extra tail)."""
    start, size, expected = record["start"], record["bytes"], record["xxh3_64"]
    block = record["block_bytes"]
    damaged = []
    actual = os.path.getsize(path) - start
    if actual != size:
        damaged.append((min(actual, size), max(actual, size)))
    fd = os.open(path, os.O_RDONLY)
    buffers = threading.local()

    def matches(index: int) -> bool:   # one block, read into this thread's own buffer
        lo = index * block
        want = min(block, size - lo)
        if getattr(buffers, "block", None) is None:
            buffers.block = bytearray(block)
        view = memoryview(buffers.block)[:want]
        got = os.preadv(fd, [view], start + lo)
        return got == want and block_hash(view) == expected[index]
    try:
        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            good = list(pool.map(matches, range(len(expected))))
    finally:
        os.close(fd)
    damaged += [(i * block, min((i + 1) * block, size)) for i, ok in enumerate(good) if not ok]
    return sorted(damaged)
