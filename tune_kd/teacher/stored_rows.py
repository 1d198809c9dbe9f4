"""The teacher's rows as stored: top-k shifted logits, their ids and the tail's mass, or full rows
(the layout), and a batch of them read back as the losses see a teacher (CachedTeacher)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


TAIL_TEMPERATURES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0)


VALUE_DTYPES = ("float16", "bfloat16", "float32")   # teacher_cache.dtype


UINT16_VOCAB = 2**16        # ids fit uint16 up to this vocabulary size


# stored dtype name -> (torch dtype, numpy dtype on disk); numpy has no bfloat16, so its 16 bits
# are written as uint16 and viewed back on read
STORAGE = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
            "bfloat16": (torch.bfloat16, np.uint16), "uint32": (torch.int64, np.uint32),
            "uint16": (torch.int32, np.uint16)}   # ids are computed wider, narrowed on the way to disk


@dataclass(frozen=True)
class Layout:
    """How each position's row is stored: the top k (k < vocab) or the whole row (k = vocab)."""

    k: int
    vocab: int
    dtype: str                      # teacher_cache.dtype: the values' dtype when k < vocab

    @property
    def full(self) -> bool:
        return self.k >= self.vocab

    @property
    def value_dtype(self) -> str:
        return "float32" if self.full else self.dtype     # a full row is exact: float32, in id order

    @property
    def id_dtype(self) -> str | None:
        return None if self.full else "uint16" if self.vocab <= UINT16_VOCAB else "uint32"

    @property
    def tail_dtype(self) -> str | None:
        return None if self.full else "float32" if self.dtype == "float32" else "float16"

    @property
    def bytes_per_position(self) -> int:
        if self.full:
            return 4 * self.vocab
        size = lambda name: np.dtype(STORAGE[name][1]).itemsize  # noqa: E731
        return self.k * (size(self.value_dtype) + size(self.id_dtype)) + len(TAIL_TEMPERATURES) * size(self.tail_dtype)

    def describe(self) -> str:
        if self.full:
            return f"the full distribution ({self.vocab} float32 logits), {self.bytes_per_position} bytes per position"
        return (f"top-{self.k} of {self.vocab} logits ({self.value_dtype} values, {self.id_dtype} ids, {self.tail_dtype} "
                f"tail), {self.bytes_per_position} bytes per position")

    def meta(self) -> dict:
        return {"top_k": self.k, "vocab": self.vocab, "value_dtype": self.value_dtype, "id_dtype": self.id_dtype,
                "tail_dtype": self.tail_dtype, "bytes_per_position": self.bytes_per_position}


def layout(top_k: int, vocab: int, dtype: str = "float16") -> Layout:
    """The layout of rows keeping top_k logits in `dtype`, or the full row (exact, float32) when
    top_k >= vocab or when the top k (values + ids + tail) would take as many bytes as the full row:
    at Qwen2.5's 151,646 ids top-131,072 in float16 is 786,450 bytes a position against the full
    row's 606,584, and the top-k selection itself is a near-full sort, so the full row is smaller,
    faster and exact (never a top-k bigger than the full row)."""
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"teacher cache dtype {dtype!r} is not one of {VALUE_DTYPES}")
    top, full = Layout(min(top_k, vocab), vocab, dtype), Layout(vocab, vocab, dtype)
    return full if top.bytes_per_position >= full.bytes_per_position else top


def bytes_per_position(top_k: int, vocab: int, dtype: str = "float16") -> int:
    return layout(top_k, vocab, dtype).bytes_per_position


def planned_bytes(positions: int, top_k: int, vocab: int, dtype: str = "float16") -> int:
    return positions * bytes_per_position(top_k, vocab, dtype)


@dataclass
class StoredRows:
    """Rows as the cache stores them (what build writes and the fidelity measurement reads back):
    values (N, k) in the layout's value dtype, ids (N, k) int32 or None, tail (N, G) or None."""

    values: torch.Tensor
    ids: torch.Tensor | None
    tail: torch.Tensor | None


def compress(logits: torch.Tensor, lay: Layout) -> StoredRows:
    """(N, V) teacher logits -> the rows the cache stores for them (on logits' device)."""
    logits = logits.float()
    if lay.full:
        return StoredRows(logits, None, None)
    top = logits.topk(lay.k, dim=1)
    row_max = top.values[:, :1]                                                      # (N, 1) m
    rest = logits.scatter(1, top.indices, float("-inf")) - row_max                   # (N, V) z_j - m off K
    tail = torch.stack([torch.logsumexp(rest / t, dim=1) for t in TAIL_TEMPERATURES], 1)   # (N, G)
    return StoredRows((top.values - row_max).to(STORAGE[lay.value_dtype][0]), top.indices.to(torch.int32),
                      tail.to(STORAGE[lay.tail_dtype][0]))


def to_disk(tensor: torch.Tensor, name: str) -> np.ndarray:
    if name == "bfloat16":
        return tensor.view(torch.int16).cpu().numpy().view(np.uint16)
    return tensor.cpu().numpy().astype(STORAGE[name][1], copy=False)


def from_disk(array: np.ndarray, name: str) -> torch.Tensor:
    if name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


@dataclass
class CachedTeacher:
    """Cached teacher outputs for N scored positions: what the losses take instead of (N, V) logits.

    k < V: values are the top-k logits minus the row's largest, ids their token ids, tail the
    shifted log tail mass on the TAIL_TEMPERATURES grid. k = V: values are the (N, V) logits in
    token-id order; ids and tail are None."""

    values: torch.Tensor            # (N, k) float32
    ids: torch.Tensor | None        # (N, k) int64 token ids; None when values is the full row
    tail: torch.Tensor | None       # (N, G) float32 log S(T_g) - m / T_g; None when values is the full row

    @classmethod
    def from_stored(cls, rows: StoredRows) -> "CachedTeacher":
        """Widen stored rows to the loss math's dtypes: float32 values and tail, int64 ids."""
        return cls(rows.values.float(), None if rows.ids is None else rows.ids.long(),
                   None if rows.tail is None else rows.tail.float())

    def __getitem__(self, rows: slice) -> "CachedTeacher":
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return CachedTeacher(self.values[rows], pick(self.ids), pick(self.tail))

    def to(self, device, non_blocking: bool = False) -> "CachedTeacher":
        move = lambda x: None if x is None else x.to(device, non_blocking=non_blocking)  # noqa: E731
        return CachedTeacher(move(self.values), move(self.ids), move(self.tail))

    def log_tail(self, temperature: float) -> torch.Tensor:
        """(N, 1) log S(T) - m / T: linear in 1/T between the grid's neighbours (extended past its ends)."""
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
        if self.ids is None:   # the full row: nothing estimated, the live teacher's formula
            return logq, F.log_softmax(self.values / temperature, dim=-1)
        scaled = self.values / temperature                                         # (N, k)
        vocab, k = logq.shape[-1], scaled.shape[-1]
        log_tail = self.log_tail(temperature)                                      # (N, 1)
        log_z = torch.logsumexp(torch.cat([scaled, log_tail], dim=1), dim=1, keepdim=True)
        logp = (log_tail - math.log(vocab - k) - log_z).expand(-1, vocab).clone()  # each tail token: S / (V - k) / Z
        return logq, logp.scatter_(1, self.ids, scaled - log_z)
