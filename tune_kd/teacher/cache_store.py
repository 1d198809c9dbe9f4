"""Teacher-output cache: the frozen teacher's next-token distributions, computed once per data set
and read by every trial of a search (and every later run on the same data).

Every trial runs the same frozen teacher over the same token sequences; only T, alpha and the
student differ. The cache stores, for every scored (assistant) position of the training split,
in data order (example by example, positions ascending), with k = teacher_cache.top_k < V:

    values (P, k) dtype     the teacher's k largest logits z_i minus the row's largest, m (so <= 0)
    ids    (P, k) uint16    their token ids (uint32 when the vocabulary has more than 65,536 ids)
    tail   (P, G) float16   log S(T_g) - m / T_g, S(T) = sum over j not in K of exp(z_j / T), at the
                            G temperatures of TAIL_TEMPERATURES

dtype is teacher_cache.dtype: float16 (default), bfloat16 (stored as its raw 16 bits) or float32
(then the tail is float32 too). That is 2 + 2 bytes per kept logit plus 18 per position: 530 bytes
at k = 128, half of format 1's fp32 values + int32 ids (1,060). With k >= V the row is stored whole,
float32 logits in token-id order, no ids and no tail: 4 V bytes, what k = V of fp16 values + uint16
ids would take, and exact (so the k = V loss and gradient are the live ones, whatever the dtype).
Numpy files that trials read by rows (pread, a chunk of the loss at a time), so concurrent trials on a
machine share the kernel's page cache and none holds the file in its own memory.

Why shift by m. A distribution at any temperature is invariant to adding a constant to every
logit (p_i = exp(z_i / T) / Z(T)), and log S(T) shifts by the same m / T, so m itself is never
needed and is not kept. Shifted, the values that carry the mass are the ones near 0, where a float
is most precise: fp16 rounds x to within 2^-11 |x|, so a token 10 nats below the top (probability
ratio e^-10) moves by less than 0.004 nats, where unshifted logits around 30 (the top tokens
themselves) would move by up to 0.008.

The maths. At temperature T the teacher's distribution is p_i = exp(z_i / T) / Z(T). The cache
knows z_i on K (up to the dtype's rounding); the other V - k tokens (the tail) are known only
through their total S(T), so the cache rebuilds the distribution as

    p_i = exp(z_i / T) / Z(T)                      for i in K
    p_j = S(T) / (V - k) / Z(T)                    for j not in K       (the tail's mass, spread evenly)
    Z(T) = sum over K of exp(z_i / T) + S(T)

and every divergence of losses.KD_LOSSES runs on it unchanged, against the student's live
log-probabilities (losses reads live and cached teachers through one function).

- The mass on K and the tail's total are exact at the grid temperatures (T = 1 among them), up to
  rounding; only how the tail's mass is shared among its tokens is assumed. The gradient of the
  forward KL with respect to a student logit s_j is (q_j - p_j) / T, so its L1 error is at most
  sum over the tail of |p_j - p_tail / (V - k)| / T <= 2 p_tail(T) / T: small when the teacher
  puts little mass outside its top k at T, or spreads it evenly.
- S(T) between grid points: log S is convex in 1/T (a log-partition function), and linear
  interpolation in 1/T draws its chord, slightly above it; beyond the grid the nearest segment
  is extended.
The error therefore grows with T and shrinks with k. With teacher_cache.top_k: auto (the
default) the run measures it before building (cache_fidelity.py: loss and gradient against the
live teacher on a seeded sample of the training data, over the run's temperatures, in the stored
dtype) and keeps the smallest k of a ladder within 1% (cache_plan.decide, which also decides
whether a run reads the cache at all); bench/teacher_cache_fidelity.py measures it by k and dtype.

This module is the format: the layout, compressing rows and reading them back (kd/teacher_rows.TeacherRows), the
key (its inputs hashed in cache_inputs.py), and building, opening and reading a cache folder.

The key hashes the teacher's weights (the loaded tensors, so a built or re-saved teacher counts
too) and its config (rope_theta, rms_norm_eps, ...: the same weights can compute other logits), the
tokenizer, the training split's token ids and masks (which cover the data file, the
subset and max_seq_len), max_seq_len, the teacher's dtype and vocabulary columns, k, the stored
dtypes and the format. Another key is another folder: a changed input is rebuilt, never read. A
folder is complete only once meta.json is in it (written last, then the folder renamed into
place); one that does not match its meta is rebuilt.

Its contents are checked too: meta.json keeps an XXH3 hash per 16 MiB block of every file, computed as
the rows are written (config/files.BlockChecksums). The process that plans a search or a run (the
search's driver, `prepare`, `train`) verifies them once before any trial reads the rows
(open_or_build(verify=True): about one read of the cache); a damaged block is named by file and
rows and the cache rebuilt. Trials trust what their driver verified. Non-finite teacher logits
stop the build (TeacherLogitsNotFinite): a cache of NaN rows would make every trial diverge.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tune_kd.config.errors import UserError
from tune_kd.config import files
from tune_kd.config.files import BlockChecksums, atomic_write_text, disk_writes, file_checksums, permit_as_umask, verify_blocks
from tune_kd.data import ingest
from tune_kd.kd.scored import Scored, row_chunks
from tune_kd.kd.scoring import logit_chunks
from tune_kd.kd.teacher_rows import TAIL_TEMPERATURES, TeacherRows
from tune_kd.teacher.cache_inputs import CacheInputs, digest
from tune_kd.teacher.stored_rows import (
    STORAGE,
    Layout,
    StoredRows,
    compress,
    from_disk,
    to_disk,
)

log = logging.getLogger(__name__)

FORMAT = 4                  # 4: 3 (shifted values in teacher_cache.dtype, uint16/uint32 ids, fp16 tail; full rows
                            # fp32) with block checksums in meta.json
BUILD_BATCH = 64            # conversations per teacher forward while building


# ----------------------------------------------------------------------------------------------
# The key
# ----------------------------------------------------------------------------------------------

def cache_key(inputs: CacheInputs, lay: Layout) -> tuple[str, dict]:
    parts = {"format": FORMAT, **asdict(inputs), **lay.meta(), "tail_temperatures": list(TAIL_TEMPERATURES)}
    return digest(parts), parts


# ----------------------------------------------------------------------------------------------
# Build and read
# ----------------------------------------------------------------------------------------------

class RowFile:
    """A 2-D .npy file read (and, while building, written) by rows with pread / pwrite: the file's pages
    stay in the kernel's page cache, shared by every process on the machine and reclaimable, instead of
    being mapped into a process's memory (a memory map counts every page touched in the resident set:
    a full-row cache at V = 151,936 put 7 GB of file pages into each trial, 8.9 GB into the builder)."""

    def __init__(self, path: Path, writable: bool = False):
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, _, self.dtype = read_header(handle)
            self.start = handle.tell()
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self.checksums = BlockChecksums(self.start, files.BLOCK_BYTES) if writable else None

    @classmethod
    def create(cls, path: Path, dtype, shape: tuple[int, ...]) -> "RowFile":
        """A new .npy file of this dtype and shape (its header written, its rows still unwritten), open
        for write_rows."""
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_2_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                          "fortran_order": False, "shape": shape})
        return cls(path, writable=True)

    def write_rows(self, first: int, rows: np.ndarray) -> None:
        """Write `rows` (n, ...) at rows first..first + n: rows come in order (each write where the
        last ended), so the block checksums are computed in the same pass."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        data = memoryview(rows).cast("B")
        self.checksums.add(data, first * self.row_bytes)
        offset = self.start + first * self.row_bytes
        while len(data):   # pwrite may write less than asked (a signal, a nearly full disk)
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The rows at `positions` (runs of consecutive positions read in one call each)."""
        out = np.empty((len(positions), *self.shape[1:]), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(positions)]])):
            if hi > lo:
                os.preadv(self.fd, [memoryview(out[lo:hi]).cast("B")], self.start + int(positions[lo]) * self.row_bytes)
        return out


class TeacherCache:
    """A built cache folder: rows(example indices) -> CacheRows, read from disk a chunk at a time. The
    arrays are also open as read-only memory maps (values, ids, tail) for inspection."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        present = [name for name in ("values", "ids", "tail") if (self.directory / f"{name}.npy").is_file()]
        maps = {name: np.load(self.directory / f"{name}.npy", mmap_mode="r") for name in present}
        self.values, self.ids, self.tail = (maps.get(name) for name in ("values", "ids", "tail"))
        self.files = {name: RowFile(self.directory / f"{name}.npy") for name in present}
        self.row_offsets = np.load(self.directory / "row_offsets.npy")

    def rows(self, indices) -> "CacheRows":
        """The rows of these examples, in the order given (each example's positions ascending)."""
        spans = [np.arange(self.row_offsets[i], self.row_offsets[i + 1]) for i in np.asarray(indices)]
        return CacheRows(self, np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64))

    def read(self, positions: np.ndarray) -> TeacherRows:
        """The cache's rows at these positions (ascending within each example), as float32 / int64 tensors."""
        read = {name: rows.rows(positions) for name, rows in self.files.items()}
        return TeacherRows.from_stored(StoredRows(
            from_disk(read["values"], self.meta["value_dtype"]),
            torch.from_numpy(read["ids"].astype(np.int64)) if "ids" in read else None,
            from_disk(read["tail"], self.meta["tail_dtype"]) if "tail" in read else None))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.values, self.ids, self.tail, self.row_offsets) if a is not None)


@dataclass
class CacheRows:
    """A batch's rows of the cache (kd/teacher_rows.BatchRows), read from disk only a chunk at a time
    (chunk(lo, hi) -> TeacherRows on `device`), as the loss walks them: at a full row of a 150k
    vocabulary a batch's rows are hundreds of MB, a chunk's tens."""

    cache: TeacherCache
    positions: np.ndarray              # (N,) the batch's rows in the cache's files
    device: torch.device | None = None
    non_blocking: bool = False
    spans = staticmethod(row_chunks)

    @property
    def rows(self) -> int:
        return len(self.positions)

    def to(self, device, non_blocking: bool = False) -> "CacheRows":
        return CacheRows(self.cache, self.positions, torch.device(device), non_blocking)

    def chunk(self, lo: int, hi: int) -> TeacherRows:
        read = self.cache.read(self.positions[lo:hi])
        return read if self.device is None else read.to(self.device, non_blocking=self.non_blocking)


class TeacherLogitsNotFinite(UserError):
    """The teacher produced NaN or inf logits while the cache was built."""


def damaged_blocks(directory: Path) -> list[str]:
    """Each block of a built cache whose bytes no longer match the checksums written with them, as
    `file rows lo..hi` (row_offsets.npy by bytes); [] when every block matches. Reads the whole cache
    once, a block at a time."""
    meta = json.loads((directory / "meta.json").read_text())
    problems = []
    for name, record in meta["checksums"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        row_bytes = RowFile(path).row_bytes if name != "row_offsets.npy" else None
        for lo, hi in verify_blocks(path, record):
            where = f"rows {lo // row_bytes:,}..{-(-hi // row_bytes) - 1:,}" if row_bytes else f"bytes {lo:,}..{hi - 1:,}"
            problems.append(f"{name} {where}")
    return problems


def _is_complete(directory: Path, key: str, positions: int) -> bool:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        cache = TeacherCache(directory)
    except (OSError, ValueError):
        return False
    return meta.get("key") == key and cache.values.shape[0] == positions == int(cache.row_offsets[-1])


def is_built(cache_dir: str | Path, inputs: CacheInputs, lay: Layout, positions: int) -> bool:
    """Whether the cache for these inputs and layout is complete on disk (not verified)."""
    key, _ = cache_key(inputs, lay)
    return _is_complete(Path(cache_dir) / "teacher" / key, key, positions)


def build(teacher_outputs: Callable[[dict], Scored], train_data, pad_id: int, lay: Layout, target: Path,
          meta: dict, columns: int | None = None) -> None:
    """Run the teacher over train_data once, writing target/ (via a temporary sibling, renamed).

    teacher_outputs(batch) -> the teacher's scored.Scored at the batch's scored positions, in
    row-major (example, position) order, the order the loop selects them in; its logits are made,
    compressed and written a chunk of rows at a time (their first `columns`, build.check_vocab)."""
    counts = train_data.target_counts.astype(np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(counts)])
    positions = int(row_offsets[-1])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with disk_writes(target, positions * lay.bytes_per_position):
            _write_rows(teacher_outputs, train_data, pad_id, lay, tmp, row_offsets, meta, columns)
        if target.exists():   # a stale or broken copy under this key: replaced, never read
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_rows(teacher_outputs: Callable[[dict], Scored], train_data, pad_id: int, lay: Layout, tmp: Path,
                row_offsets: np.ndarray, meta: dict, columns: int | None) -> None:
    """build's body: every row into tmp/'s files, checksummed as written, then meta.json last."""
    from tune_kd.data import tokenized

    positions = int(row_offsets[-1])
    files = {name: RowFile.create(tmp / f"{name}.npy", STORAGE[dtype][1], (positions, width))
             for name, dtype, width in (("values", lay.value_dtype, lay.k), ("ids", lay.id_dtype, lay.k),
                                        ("tail", lay.tail_dtype, len(TAIL_TEMPERATURES))) if dtype is not None}
    started = time.perf_counter()
    for lo in range(0, len(train_data), BUILD_BATCH):
        indices = np.arange(lo, min(lo + BUILD_BATCH, len(train_data)))
        scored = teacher_outputs(tokenized.collate(train_data, indices, pad_id))                # N rows
        first, last = int(row_offsets[indices[0]]), int(row_offsets[indices[-1] + 1])
        if scored.rows != last - first:
            raise RuntimeError(f"teacher cache: {scored.rows} scored rows for examples {lo}.., expected {last - first}")
        for a, b, logits in logit_chunks(scored, columns):                               # (b - a, V)
            lowest, highest = torch.aminmax(logits)   # NaN and inf show in the extremes: no (rows, V) mask
            if not (math.isfinite(lowest) and math.isfinite(highest)):
                raise TeacherLogitsNotFinite(
                    f"teacher cache: the teacher's logits are NaN or inf at the scored positions of examples "
                    f"{indices[0]}..{indices[-1]}: its weights hold NaN/inf, or its dtype overflows (load the teacher "
                    "in float32: train.dtype float32), so no cache is written (every trial would diverge on it)")
            stored = compress(logits, lay)
            files["values"].write_rows(first + a, to_disk(stored.values, lay.value_dtype))
            if not lay.full:
                files["ids"].write_rows(first + a, to_disk(stored.ids, lay.id_dtype))
                files["tail"].write_rows(first + a, to_disk(stored.tail, lay.tail_dtype))
    for rows in files.values():
        os.fsync(rows.fd)
    checksums = {f"{name}.npy": rows.checksums.to_json() for name, rows in files.items()}
    del files   # closed before the folder is renamed
    np.save(tmp / "row_offsets.npy", row_offsets)
    checksums["row_offsets.npy"] = file_checksums(tmp / "row_offsets.npy")
    seconds = time.perf_counter() - started
    nbytes = sum(p.stat().st_size for p in tmp.iterdir())
    (tmp / "meta.json").write_text(json.dumps({**meta, **lay.meta(), "positions": positions,
                                               "examples": len(train_data), "build_seconds": seconds,
                                               "bytes": nbytes, "built_by_pid": os.getpid(),
                                               "checksums": checksums}, indent=1))
    permit_as_umask(tmp)   # mkdtemp made it 0700: the group reads the cache as the umask says


def open_or_build(cache_dir: str | Path, inputs: CacheInputs, teacher_outputs, train_data, pad_id: int, lay: Layout,
                  build_meta: dict | None = None, verify: bool = False) -> TeacherCache:
    """The cache for these inputs and layout, built first (under a lock) when it is missing or stale.
    build_meta: extra fields for a new build's meta.json (auto's measured fidelity). verify: check a
    cache found on disk against its block checksums (the planning process, once per search; trials
    do not), rebuilding it when a block is damaged."""
    key, parts = cache_key(inputs, lay)
    target = Path(cache_dir) / "teacher" / key
    positions = int(train_data.target_counts.sum())
    with ingest.file_lock(target.with_name(f"{key}.lock"), building=f"the teacher cache {target}"):
        complete = _is_complete(target, key, positions)
        if complete and verify:
            complete = _verified(target)
        if not complete:
            log.info("teacher cache: building %s (%d positions, %s)", target, positions, lay.describe())
            with torch.inference_mode():
                build(teacher_outputs, train_data, pad_id, lay, target, {**parts, **(build_meta or {}), "key": key},
                      inputs.columns)
            meta = json.loads((target / "meta.json").read_text())
            log.info("teacher cache: built in %.1f s, %.1f MB (%d bytes per position) -> %s", meta["build_seconds"],
                     meta["bytes"] / 2**20, meta["bytes_per_position"], target)
    return TeacherCache(target)


def _verified(target: Path) -> bool:
    """Whether the cache at target still matches its checksums; logs what was checked, or what is damaged."""
    started = time.perf_counter()
    damaged = damaged_blocks(target)
    seconds = time.perf_counter() - started
    if damaged:
        shown = "; ".join(damaged[:4]) + (f"; and {len(damaged) - 4} more blocks" if len(damaged) > 4 else "")
        log.warning("WARNING: teacher cache %s is damaged on disk (%s do not match the checksums written with them): "
                    "rebuilding it", target, shown)
        return False
    meta = json.loads((target / "meta.json").read_text())
    log.info("teacher cache: verified %s against its checksums in %.1f s (%.0f%% of its %.1f s build)",
             target.name, seconds, 100 * seconds / max(meta["build_seconds"], 1e-9), meta["build_seconds"])
    return True


def remembered(path: Path, compute: Callable[[], dict], building: str = "a measurement") -> dict:
    """compute()'s JSON result, stored at `path` by the first process that asks (under a lock) and
    read by the others, so every trial of a search takes the driver's measurement. building: what
    compute() measures, for the line of a process that waits on the lock."""
    with ingest.file_lock(path.with_suffix(".lock"), building=f"{building} ({path})"):
        if path.is_file():
            return json.loads(path.read_text())
        result = compute()
        atomic_write_text(path, json.dumps(result, indent=1))
        return result
