"""The teacher's rows as stored: top-k shifted logits, their ids and the tail's mass, or full rows
(the layout); read back they are the losses' kd/teacher_rows.TeacherRows (StoredRows.widened)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tune_kd.kd.teacher_rows import TAIL_TEMPERATURES, TeacherRows

log = logging.getLogger(__name__)


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

    def widened(self, target_logprobs: torch.Tensor | None = None) -> TeacherRows:
        """These rows as the losses read them (float32 values and tail, int64 ids)."""
        return TeacherRows.from_stored(self, target_logprobs)


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
