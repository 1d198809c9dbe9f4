"""Teacher-output cache: the frozen teacher's next-token distributions, computed once per data set
and read by every trial of a search (and every later run on the same data).

Every trial runs the same frozen teacher over the same token sequences; only T, alpha and the
student differ. The cache stores, for every scored (assistant) position of the training split,
in data order (example by example, positions ascending):

    values (P, k) float32   the teacher's k largest logits z_i at T = 1 (the set K)
    ids    (P, k) int32     their token ids
    tail   (P, G) float32   log S(T_g), S(T) = sum over j not in K of exp(z_j / T), at the G
                            temperatures of TAIL_TEMPERATURES (absent when k = V)

4 bytes x (2k + G) per position; numpy files that trials memory-map, so concurrent trials on a
machine share the page cache instead of each holding a copy.

The maths. At temperature T the teacher's distribution is p_i = exp(z_i / T) / Z(T). The cache
knows z_i on K exactly; the other V - k tokens (the tail) are known only through their total
S(T), so the cache rebuilds the distribution as

    p_i = exp(z_i / T) / Z(T)                      for i in K           (exact)
    p_j = S(T) / (V - k) / Z(T)                    for j not in K       (the tail's mass, spread evenly)
    Z(T) = sum over K of exp(z_i / T) + S(T)

and every divergence of losses.KD_LOSSES runs on it unchanged, against the student's live
log-probabilities (losses reads live and cached teachers through one function).

- k = V: no tail; the rebuilt distribution is the teacher's, the loss and gradient the live ones.
- The mass on K and the tail's total are exact at the grid temperatures (T = 1 among them); only
  how the tail's mass is shared among its tokens is assumed. The gradient of the forward KL with
  respect to a student logit s_j is (q_j - p_j) / T, so its L1 error is at most
  sum over the tail of |p_j - p_tail / (V - k)| / T <= 2 p_tail(T) / T: small when the teacher
  puts little mass outside its top k at T, or spreads it evenly.
- S(T) between grid points: log S is convex in 1/T (a log-partition function), and linear
  interpolation in 1/T draws its chord, slightly above it; beyond the grid the nearest segment
  is extended.
The error therefore grows with T and shrinks with k; bench/teacher_cache_fidelity.py measures it
(loss and gradient, against the live teacher) by k for T in [1, 5], and the README has the curve
for the embedded default.

The key hashes the teacher's weights (the loaded tensors, so a built or re-saved teacher counts
too), the tokenizer, the training split's token ids and masks (which cover the data file, the
subset and max_seq_len), max_seq_len, the teacher's dtype and vocabulary columns, k and the
format. Another key is another folder: a changed input is rebuilt, never read. A folder is
complete only once meta.json is in it (written last, then the folder renamed into place); one
that does not match its meta is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FORMAT = 1
TAIL_TEMPERATURES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0)
BUILD_BATCH = 64            # conversations per teacher forward while building


@dataclass
class CachedTeacher:
    """Cached teacher outputs for N scored positions: what the losses take instead of (N, V) logits."""

    values: torch.Tensor            # (N, k) float32 logits at T = 1
    ids: torch.Tensor               # (N, k) int64 token ids
    tail: torch.Tensor | None       # (N, G) float32 log S(T_g); None when k = V

    def __getitem__(self, rows: slice) -> "CachedTeacher":
        return CachedTeacher(self.values[rows], self.ids[rows], None if self.tail is None else self.tail[rows])

    def to(self, device, non_blocking: bool = False) -> "CachedTeacher":
        move = lambda x: None if x is None else x.to(device, non_blocking=non_blocking)  # noqa: E731
        return CachedTeacher(move(self.values), move(self.ids), move(self.tail))

    def log_tail(self, temperature: float) -> torch.Tensor:
        """(N, 1) log S(T): linear in 1/T between the grid's neighbours (extended past its ends)."""
        betas = [1.0 / t for t in TAIL_TEMPERATURES]          # descending
        beta = 1.0 / temperature
        upper = next((i for i in range(1, len(betas)) if betas[i] <= beta), len(betas) - 1)
        lo, hi = upper - 1, upper                             # betas[lo] > betas[hi]
        weight = (betas[lo] - beta) / (betas[lo] - betas[hi])
        return (self.tail[:, lo] * (1.0 - weight) + self.tail[:, hi] * weight).unsqueeze(1)

    def log_probs(self, student_logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q, log p) over the vocabulary at temperature T: the student's live, the teacher's
        rebuilt from the cache (exact on K, the tail's mass spread evenly over the tail tokens)."""
        logq = F.log_softmax(student_logits.float() / temperature, dim=-1)          # (N, V)
        scaled = self.values / temperature                                         # (N, k)
        vocab, k = logq.shape[-1], scaled.shape[-1]
        if self.tail is None:   # k = V: the full distribution, nothing estimated
            return logq, torch.empty_like(logq).scatter_(1, self.ids, scaled - torch.logsumexp(scaled, 1, keepdim=True))
        log_tail = self.log_tail(temperature)                                      # (N, 1) log S(T)
        log_z = torch.logsumexp(torch.cat([scaled, log_tail], dim=1), dim=1, keepdim=True)
        logp = (log_tail - math.log(vocab - k) - log_z).expand(-1, vocab).clone()  # each tail token: S / (V - k) / Z
        return logq, logp.scatter_(1, self.ids, scaled - log_z)


def bytes_per_position(top_k: int, vocab: int) -> int:
    k = min(top_k, vocab)
    return 4 * (2 * k + (len(TAIL_TEMPERATURES) if k < vocab else 0))


# ----------------------------------------------------------------------------------------------
# The key
# ----------------------------------------------------------------------------------------------

def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 of the teacher's parameters and buffers, by name, as loaded (dtype included)."""
    h = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(train_data) -> str:
    """Which examples, in which order: data.TokenizedData keeps that hash (its cache key and subset)."""
    return train_data.identity


def cache_key(teacher_hash: str, tokenizer_hash: str, train_data, max_seq_len: int, teacher_cols: int | None,
              vocab: int, top_k: int) -> tuple[str, dict]:
    parts = {"format": FORMAT, "teacher": teacher_hash, "tokenizer": tokenizer_hash,
             "data": data_fingerprint(train_data), "max_seq_len": max_seq_len, "teacher_cols": teacher_cols,
             "vocab": vocab, "top_k": min(top_k, vocab), "tail_temperatures": list(TAIL_TEMPERATURES)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24], parts


# ----------------------------------------------------------------------------------------------
# Build and read
# ----------------------------------------------------------------------------------------------

class TeacherCache:
    """A built cache folder, memory-mapped. rows(example indices) -> CachedTeacher (CPU)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.values = np.load(self.directory / "values.npy", mmap_mode="r")
        self.ids = np.load(self.directory / "ids.npy", mmap_mode="r")
        tail = self.directory / "tail.npy"
        self.tail = np.load(tail, mmap_mode="r") if tail.is_file() else None
        self.row_offsets = np.load(self.directory / "row_offsets.npy")

    def rows(self, indices) -> CachedTeacher:
        spans = [(int(self.row_offsets[i]), int(self.row_offsets[i + 1])) for i in np.asarray(indices)]
        take = lambda array: torch.from_numpy(np.concatenate([array[lo:hi] for lo, hi in spans]))  # noqa: E731
        return CachedTeacher(take(self.values), take(self.ids).long(), None if self.tail is None else take(self.tail))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.values, self.ids, self.tail, self.row_offsets) if a is not None)


def _is_complete(directory: Path, key: str, positions: int) -> bool:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        cache = TeacherCache(directory)
    except (OSError, ValueError):
        return False
    return meta.get("key") == key and cache.values.shape[0] == positions == int(cache.row_offsets[-1])


def build(teacher_rows: Callable[[dict], torch.Tensor], train_data, pad_id: int, top_k: int, vocab: int,
          target: Path, meta: dict) -> None:
    """Run the teacher over train_data once, writing target/ (via a temporary sibling, renamed).

    teacher_rows(batch) -> (N, V) teacher logits at the batch's scored positions, in row-major
    (example, position) order, the order the loop selects them in."""
    from tune_kd import data

    k = min(top_k, vocab)
    counts = train_data.target_counts.astype(np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(counts)])
    positions = int(row_offsets[-1])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        open_array = lambda name, dtype, width: np.lib.format.open_memmap(  # noqa: E731
            tmp / name, mode="w+", dtype=dtype, shape=(positions, width))
        values, ids = open_array("values.npy", np.float32, k), open_array("ids.npy", np.int32, k)
        tail = open_array("tail.npy", np.float32, len(TAIL_TEMPERATURES)) if k < vocab else None
        started = time.perf_counter()
        for lo in range(0, len(train_data), BUILD_BATCH):
            indices = np.arange(lo, min(lo + BUILD_BATCH, len(train_data)))
            logits = teacher_rows(data.collate(train_data, indices, pad_id)).float()       # (N, V)
            a, b = int(row_offsets[indices[0]]), int(row_offsets[indices[-1] + 1])
            if logits.shape[0] != b - a:
                raise RuntimeError(f"teacher cache: {logits.shape[0]} scored rows for examples {lo}.., expected {b - a}")
            top = logits.topk(k, dim=1)
            values[a:b] = top.values.cpu().numpy()
            ids[a:b] = top.indices.to(torch.int32).cpu().numpy()
            if tail is not None:
                rest = logits.scatter(1, top.indices, float("-inf"))
                tail[a:b] = torch.stack([torch.logsumexp(rest / t, dim=1) for t in TAIL_TEMPERATURES], 1).cpu().numpy()
        for array in (values, ids, tail):
            if array is not None:
                array.flush()
        np.save(tmp / "row_offsets.npy", row_offsets)
        seconds = time.perf_counter() - started
        nbytes = sum(p.stat().st_size for p in tmp.iterdir())
        (tmp / "meta.json").write_text(json.dumps({**meta, "positions": positions, "examples": len(train_data),
                                                   "build_seconds": seconds, "bytes": nbytes,
                                                   "built_by_pid": os.getpid()}, indent=1))
        if target.exists():   # a stale or broken copy under this key: replaced, never read
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock across processes (the first trial builds, the others wait and read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_or_build(cache_dir: str | Path, teacher: torch.nn.Module, teacher_rows, tokenizer_hash: str, train_data,
                  pad_id: int, max_seq_len: int, teacher_cols: int | None, vocab: int, top_k: int) -> TeacherCache:
    """The cache for these inputs, built first (under a lock) when it is missing or stale."""
    key, parts = cache_key(teacher_fingerprint(teacher), tokenizer_hash, train_data, max_seq_len, teacher_cols,
                           vocab, top_k)
    target = Path(cache_dir) / "teacher" / key
    positions = int(train_data.target_counts.sum())
    with _locked(target.with_name(f"{key}.lock")):
        if not _is_complete(target, key, positions):
            log.info("teacher cache: building %s (%d positions, top-%d of %d%s)", target, positions,
                     parts["top_k"], vocab, " + the tail's mass" if parts["top_k"] < vocab else ": the full distribution")
            with torch.inference_mode():
                build(teacher_rows, train_data, pad_id, top_k, vocab, target, {**parts, "key": key})
            meta = json.loads((target / "meta.json").read_text())
            log.info("teacher cache: built in %.1f s, %.1f MB (%d bytes per position) -> %s", meta["build_seconds"],
                     meta["bytes"] / 2**20, bytes_per_position(top_k, vocab), target)
    cache = TeacherCache(target)
    return cache


def tail_mass(cache: TeacherCache, temperature: float, rows: int = 4096) -> float:
    """Mean teacher tail mass p_tail at T over the first `rows` positions (0 when k = V)."""
    if cache.tail is None:
        return 0.0
    chunk = CachedTeacher(torch.from_numpy(np.array(cache.values[:rows])), torch.from_numpy(np.array(cache.ids[:rows])).long(),
                          torch.from_numpy(np.array(cache.tail[:rows])))
    scaled = chunk.values / temperature
    log_tail = chunk.log_tail(temperature)
    return float((log_tail - torch.logsumexp(torch.cat([scaled, log_tail], 1), 1, keepdim=True)).exp().mean())


def planned_bytes(positions: int, top_k: int, vocab: int) -> int:
    return positions * bytes_per_position(top_k, vocab)


def decide(cfg, positions: int, vocab: int, free_bytes: int) -> tuple[bool, str]:
    """(use the cache?, why) for a run of cfg whose training split has `positions` scored tokens.

    auto uses it when the run needs the teacher's logits only (not its hidden states: feature
    distillation runs it live) and the cache fits teacher_cache.max_gb and the free disk. Nothing
    a trial can vary changes the token sequences (max_seq_len and the data are not searchable),
    so one cache serves every trial."""
    from tune_kd.config import UserError

    c = cfg.teacher_cache
    if c.mode == "off":
        return False, "off (teacher_cache: off)"
    if cfg.teacher is None or (cfg.train.alpha >= 1.0 and "alpha" not in cfg.parameters):
        return False, "not used: training never runs the teacher (no teacher, or alpha 1)"
    if cfg.train.feature_weight > 0 or "feature_weight" in cfg.parameters:
        return False, "not used: feature distillation needs the teacher's hidden states, so the teacher runs live"
    size = planned_bytes(positions, c.top_k, vocab)
    if c.mode == "auto" and size > c.max_gb * 2**30:
        return False, (f"not used: it would take {size / 2**30:.1f} GiB, above teacher_cache.max_gb {c.max_gb:g} "
                       "(raise it, or set teacher_cache: on)")
    if size > 0.9 * free_bytes:
        if c.mode == "on":
            raise UserError(f"teacher_cache: on needs {size / 2**30:.1f} GiB but {cfg.data.cache_dir} has "
                            f"{free_bytes / 2**30:.1f} GiB free (free space, lower teacher_cache.top_k, or use auto)")
        return False, f"not used: {size / 2**30:.1f} GiB would not fit the {free_bytes / 2**30:.1f} GiB free"
    return True, f"{c.mode}: top-{min(c.top_k, vocab)} of {vocab} logits per position, {size / 2**20:.1f} MB"


def fidelity(cfg, student, teacher, cache: TeacherCache, batches: list[dict], precision,
             temperatures) -> dict[float, tuple[float, float]]:
    """{T: (loss error, gradient error)} of the cache against the live teacher on `batches`:
    |KD_cache - KD_live| / KD_live for cfg's kd_loss summed over the batches, and
    ||g_cache - g_live|| / ||g_live|| for its gradient w.r.t. every parameter of `student`
    (a loop.SelectedLogits). What bench/teacher_cache_fidelity.py and the tests measure."""
    from tune_kd import loop, losses

    def kd_and_grad(temperature, source):
        student.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            s_logits, t_logits, targets, _, _ = loop.forward_pair(student, teacher, batch, precision, None, True, source)
            kd = losses.distillation_loss(s_logits, t_logits, targets, 0.0, temperature, 1.0, cfg.train.kd_loss,
                                          kd_options=loop.kd_options(cfg.train)).kd
            kd.backward()
            total += float(kd.detach())
        return total, torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])

    errors = {}
    for temperature in temperatures:
        (live, live_grad), (cached, cached_grad) = kd_and_grad(temperature, None), kd_and_grad(temperature, cache)
        errors[temperature] = (abs(cached - live) / abs(live), float((cached_grad - live_grad).norm() / live_grad.norm()))
    student.zero_grad(set_to_none=True)
    return errors
