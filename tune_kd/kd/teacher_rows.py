"""The teacher's side of the loss, in one type, whichever teacher answered: the teacher protocol.

A teacher comes in several forms (teacher/local.py: the model in this process, or its rows read
from the teacher cache; teacher/served.py: one served per node, or an inference engine), and each
answers a batch the same way. The step and the evaluation hold a `Teacher` and never ask which:

    answer = Teacher.ask(batch, positions, from_data)   # starts the work (a served one: now, elsewhere)
    rows, features = answer.result()                     # rows: BatchRows over the N scored positions

`BatchRows` is read a chunk of rows at a time (rows.chunk(lo, hi) -> TeacherRows), because at a
150k vocabulary a batch's full rows are hundreds of MB: the live teacher's chunk is projected from
its hidden states on demand (LiveRows), the cache's is read from disk, a served answer is already
whole. `TeacherRows` is one chunk: full rows (logits in id order) or the top k (shifted logits,
their ids, and the tail's mass on a temperature grid), plus, when the teacher gave it, each
target's exact log-prob (a served teacher's val_gen_ce). The losses take only this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from tune_kd.kd.scored import Scored, row_chunks

# temperatures at which a top-k row keeps its tail's log mass (log S(T) = logsumexp of the tail at T):
# the losses interpolate between them in 1/T (TeacherRows.log_tail)
TAIL_TEMPERATURES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0)


def at_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / T; at T = 1 the logits themselves: dividing by 1 is a pass over an (n, V)
    chunk forward and another backward for nothing (at V = 151,936 a step makes dozens of them)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


@dataclass
class TeacherRows:
    """The teacher's output at N scored positions, as the losses read it.

    ids None: values are the (N, V) logits in token-id order (the full row; exact). Otherwise values
    are the top-k logits minus the row's largest (N, k), ids their token ids (N, k), tail the log
    tail mass minus m / T_g on the TAIL_TEMPERATURES grid (N, G). target_logprobs: (N,) each scored
    position's next-token log-prob at T = 1, exact, when the teacher gave it (else None)."""

    values: torch.Tensor                        # (N, k) or (N, V) float32
    ids: torch.Tensor | None = None             # (N, k) int64
    tail: torch.Tensor | None = None            # (N, G) float32
    target_logprobs: torch.Tensor | None = None  # (N,) float32

    @classmethod
    def from_stored(cls, stored, target_logprobs: torch.Tensor | None = None) -> "TeacherRows":
        """Rows as stored (teacher/stored_rows.StoredRows: narrow dtypes) widened to the loss math's:
        float32 values and tail, int64 ids."""
        return cls(stored.values.float(), None if stored.ids is None else stored.ids.long(),
                   None if stored.tail is None else stored.tail.float(), target_logprobs)

    spans = staticmethod(row_chunks)     # where the loss's chunks of rows end (BatchRows)

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    def chunk(self, lo: int, hi: int) -> "TeacherRows":
        return self[lo:hi]

    def __getitem__(self, rows: slice) -> "TeacherRows":
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return TeacherRows(self.values[rows], pick(self.ids), pick(self.tail), pick(self.target_logprobs))

    def to(self, device, non_blocking: bool = False) -> "TeacherRows":
        move = lambda x: None if x is None else x.to(device, non_blocking=non_blocking)  # noqa: E731
        return TeacherRows(move(self.values), move(self.ids), move(self.tail), move(self.target_logprobs))

    def log_tail(self, temperature: float) -> torch.Tensor:
        """(N, 1) log S(T) - m / T: linear in 1/T between the grid's neighbours (extended past its ends)."""
        betas = [1.0 / t for t in TAIL_TEMPERATURES]          # descending
        beta = 1.0 / temperature
        upper = next((i for i in range(1, len(betas)) if betas[i] <= beta), len(betas) - 1)
        lo, hi = upper - 1, upper                             # betas[lo] > betas[hi]
        weight = (betas[lo] - beta) / (betas[lo] - betas[hi])
        return (self.tail[:, lo] * (1.0 - weight) + self.tail[:, hi] * weight).unsqueeze(1)

    def log_probs(self, student_logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q, log p) over the vocabulary at temperature T: the student's from its logits, the
        teacher's from these rows (teacher_log_probs over the student's width)."""
        logq = F.log_softmax(at_temperature(student_logits, temperature), dim=-1)     # (N, V)
        return logq, self.teacher_log_probs(logq.shape[-1], temperature)

    def teacher_log_probs(self, vocab: int, temperature: float) -> torch.Tensor:
        """(N, vocab) the teacher's log-probabilities at temperature T: exact for full rows; for top k
        exact on K, the tail's mass spread evenly over the other vocab - k tokens."""
        if self.ids is None:
            return F.log_softmax(at_temperature(self.values, temperature), dim=-1)
        scaled = self.values / temperature                                         # (N, k)
        k = scaled.shape[-1]
        log_tail = self.log_tail(temperature)                                      # (N, 1)
        log_z = torch.logsumexp(torch.cat([scaled, log_tail], dim=1), dim=1, keepdim=True)
        logp = (log_tail - math.log(vocab - k) - log_z).expand(-1, vocab).clone()  # each tail token: S / (V - k) / Z
        return logp.scatter_(1, self.ids, scaled - log_z)

    def target_log_probs(self, targets: torch.Tensor) -> torch.Tensor:
        """(N,) log p(target) at T = 1: the teacher's exact figure when it gave one, else from full rows
        (top-k rows without it cannot say: a target may lie in the tail)."""
        if self.target_logprobs is not None:
            return self.target_logprobs.to(targets.device).float()
        if self.ids is not None:
            raise ValueError("top-k teacher rows carry no exact target log-probs")
        return F.log_softmax(self.values.float(), dim=-1).gather(1, targets[:, None])[:, 0]


class BatchRows(Protocol):
    """A batch's teacher rows over its N scored positions, read a chunk at a time: TeacherRows itself
    (a served answer), LiveRows (the live teacher's), teacher/cache_store.CacheRows (the cache's),
    kd/aligned.AlignedRows (a teacher on another tokenizer). spans(rows, vocab): the (lo, hi) chunks
    the loss walks (scored.row_chunks, or only between aligned groups)."""

    @property
    def rows(self) -> int: ...

    def spans(self, rows: int, vocab: int) -> list[tuple[int, int]]: ...

    def chunk(self, lo: int, hi: int) -> TeacherRows: ...


@dataclass
class LiveRows:
    """The live teacher's rows: its Scored output, projected to logits a chunk at a time without grad
    (its first `columns`: the vocabulary the divergence compares, build.check_vocab)."""

    scored: Scored
    columns: int | None = None
    spans = staticmethod(row_chunks)

    @property
    def rows(self) -> int:
        return self.scored.rows

    def chunk(self, lo: int, hi: int) -> TeacherRows:
        with torch.no_grad():
            return TeacherRows(self.scored.logits(lo, hi)[:, :self.columns])


def rows_of(teacher, columns: int | None = None):
    """The BatchRows of a teacher's output as tests and benches hand it: (N, V) logits or a Scored
    become rows of the same numbers; anything else already is BatchRows."""
    if isinstance(teacher, torch.Tensor):
        return TeacherRows(teacher[:, :columns].float())
    if isinstance(teacher, Scored):
        return LiveRows(teacher, columns)
    return teacher


def target_log_probs(rows: BatchRows, targets: torch.Tensor) -> torch.Tensor:
    """(N,) the teacher's log-prob of each scored position's target at T = 1, a chunk at a time."""
    return torch.cat([rows.chunk(lo, hi).target_log_probs(targets[lo:hi])
                      for lo, hi in row_chunks(rows.rows, 1 << 12)]) if rows.rows else targets.new_zeros(0).float()


class Answer(Protocol):
    """A teacher's answer on its way: result() -> (BatchRows, the teacher's features or None)."""

    def result(self) -> tuple[BatchRows, list | None]: ...


@dataclass
class Ready:
    """An answer already in hand (the cache's rows)."""

    rows: BatchRows
    features: list | None = None

    def result(self) -> tuple[BatchRows, list | None]:
        return self.rows, self.features


class Teacher(Protocol):
    """The teacher as training and evaluation see it (teacher/local.py, teacher/served.py).

    ask(batch, positions, from_data): the teacher's rows at the batch's scored positions (B, T)
    bool; from_data: the batch is the training split's own (batch["indices"] index it), which a
    teacher cache can answer; generated and validation batches are not. `lm`: the teacher's weights
    when this process holds them (seq_kd generates with them), else None; `config`: what the loop
    reads of a model's config (max_position_embeddings); `columns`: the vocabulary columns the
    divergence compares (build.check_vocab; None: all); `forward_in_step`: whether the training
    split's batches run the teacher's layers in this process (the compile record's key);
    `same_tokens`: whether it scores the student's own token sequences (False for a teacher on
    another tokenizer, teacher/across.py: generated replies have no teacher tokens); describe():
    how it runs, for the log."""

    lm: torch.nn.Module | None
    columns: int | None
    forward_in_step: bool
    same_tokens: bool

    @property
    def config(self): ...

    def ask(self, batch: dict, positions: torch.Tensor, from_data: bool = False) -> Answer: ...

    def describe(self) -> str: ...
