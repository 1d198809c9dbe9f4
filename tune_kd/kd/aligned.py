"""The teacher's rows as the loss reads them when teacher and student use different tokenizers.

The two models then score different positions: the student its tokens of a reply, the teacher its
own. data/cross_tokens.py aligns them into *groups* (a run of student tokens and a run of teacher
tokens that spell the same bytes of the reply), numbered in reply order on both sides. AlignedRows
is the BatchRows of such a teacher (teacher/across.py builds it): the teacher's rows at its own
positions, each side's group per row, and the vocabulary correspondence (kd/cross_vocab.VocabMatch).

It is read a chunk of the *student's* rows at a time, as every teacher's rows are, but its spans
only cut between groups, so a chunk holds whole groups on both sides (AlignedChunk). A chunk
merges each group's rows into one distribution per side by the chain rule (cross_vocab.merge_groups)
and hands them to the divergences:

    uld, gold_hybrid, pkl, hkl   the cross-vocabulary losses of kd/cross_vocab.py, on merged rows
    forward_kl, reverse_kl, ...  the one-vocabulary divergences, in the teacher's vocabulary: the
                                 student's merged distribution projected through X-Token's W and
                                 both renormalised per group (AlignedChunk.log_probs); forward_kl
                                 there is P-KL, and val_kl across tokenizers is that at T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tune_kd.kd import cross_vocab
from tune_kd.kd.cross_vocab import VocabMatch
from tune_kd.kd.scored import chunk_rows
from tune_kd.kd.teacher_rows import BatchRows, TeacherRows, at_temperature


@dataclass
class AlignedChunk:
    """Whole groups of a chunk of student rows, both sides. Group ids are local (0..G-1, -1: a row
    in no group); targets are the tokens each row predicts (the chain rule's scalar factors)."""

    teacher: TeacherRows                 # (n_t, teacher columns) the teacher's rows of these groups
    student_targets: torch.Tensor        # (n_s,) int64
    student_groups: torch.Tensor         # (n_s,) int64
    teacher_targets: torch.Tensor        # (n_t,) int64
    teacher_groups: torch.Tensor         # (n_t,) int64
    groups: int                          # G
    vocab: VocabMatch

    def merged(self, student_logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(student (G, Vs), teacher (G, Vt)) merged log-probabilities of each group at temperature T
        (unnormalised: a group's row sums to its earlier tokens' probability)."""
        logq = F.log_softmax(at_temperature(student_logits, temperature), dim=-1)
        logp = self.teacher.teacher_log_probs(self.vocab.teacher_size if self.teacher.ids is not None
                                              else self.teacher.values.shape[1], temperature)
        if self.groups == 0:   # empty, still a function of the student's logits (its gradient is taken)
            return logq[:0], logp[:0]
        return (cross_vocab.merge_groups(logq, self.student_targets, self.student_groups, self.groups),
                cross_vocab.merge_groups(logp, self.teacher_targets, self.teacher_groups, self.groups))

    def log_probs(self, student_logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q, log p) per group over the teacher's vocabulary at temperature T: the student's merged
        distribution carried there by W (cross_vocab's projection), both renormalised; a teacher token
        no student token reaches gets the floor cross_vocab.EPS."""
        student, teacher = self.merged(student_logits, temperature)
        width = teacher.shape[1]
        q = cross_vocab.project((student - student.amax(-1, keepdim=True).detach()).exp(), self.vocab.to(student.device),
                                width)
        logq = torch.log((q / q.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)).clamp_min(cross_vocab.EPS))
        return logq, torch.log_softmax(teacher, dim=-1)


@dataclass
class AlignedRows:
    """A batch's teacher rows across tokenizers (a kd/teacher_rows.BatchRows over the student's N_s
    scored rows). Group ids are unique in the batch and ascend in row order on both sides."""

    teacher: BatchRows                   # the teacher's rows at its own N_t scored positions
    student_targets: torch.Tensor        # (N_s,)
    student_groups: torch.Tensor         # (N_s,) int64, -1: a row in no group
    teacher_targets: torch.Tensor        # (N_t,)
    teacher_groups: torch.Tensor         # (N_t,)
    vocab: VocabMatch

    @property
    def rows(self) -> int:
        return self.student_groups.shape[0]

    def spans(self, rows: int, vocab: int) -> list[tuple[int, int]]:
        """(lo, hi) student-row chunks of about chunk_rows(the wider vocabulary) rows, each cut only
        where no group continues across it."""
        groups = self.student_groups.cpu().numpy()
        cut = np.ones(rows + 1, dtype=bool)
        cut[1:rows] = (groups[1:] != groups[:-1]) | (groups[1:] < 0)
        step = chunk_rows(max(vocab, self.vocab.teacher_size))
        spans, lo = [], 0
        while lo < rows:
            hi = min(rows, lo + step)
            while not cut[hi]:
                hi += 1
            spans.append((lo, hi))
            lo = hi
        return spans

    def chunk(self, lo: int, hi: int) -> AlignedChunk:
        """The whole groups of student rows lo:hi (spans' cuts) with the teacher's rows of the same groups."""
        student = self.student_groups[lo:hi]
        present = student[student >= 0]
        first, last = (int(present.min()), int(present.max())) if present.numel() else (0, -1)
        inside = ((self.teacher_groups >= first) & (self.teacher_groups <= last)).nonzero()[:, 0]
        t_lo, t_hi = (int(inside.min()), int(inside.max()) + 1) if inside.numel() else (0, 0)
        local = lambda g: torch.where(g >= 0, g - first, -1)  # noqa: E731
        return AlignedChunk(self.teacher.chunk(t_lo, t_hi), self.student_targets[lo:hi], local(student),
                            self.teacher_targets[t_lo:t_hi], local(self.teacher_groups[t_lo:t_hi]),
                            last - first + 1, self.vocab)


def _merged_loss(name: str):
    """losses.DIVERGENCES' face of a cross-vocabulary loss: (student_logits, AlignedChunk, T, beta=...) -> sum."""
    loss = cross_vocab.CROSS_VOCAB_LOSSES[name]

    def summed(student_logits, teacher: AlignedChunk, temperature, beta: float = 0.5, **_):
        if teacher.groups == 0:
            return student_logits.float().sum() * 0.0
        return loss(*teacher.merged(student_logits, temperature), vocab=teacher.vocab.to(student_logits.device),
                    beta=beta)
    summed.__doc__ = f"{name} over a chunk's groups (kd/cross_vocab.py's {loss.__name__})."
    return summed


# name -> summed loss(student logits (n, Vs), AlignedChunk, T, beta=...): the divergences only a
# teacher on another tokenizer has (kd/losses.DIVERGENCES lists them beside the one-vocabulary ones)
ACROSS_LOSSES = {name: _merged_loss(name) for name in cross_vocab.CROSS_VOCAB_LOSSES}
