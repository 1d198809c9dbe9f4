"""Distillation losses: pure functions, fp32 math, assistant tokens only.

The objective is the seed's

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with alpha the CE weight (alpha = 1: plain SFT, alpha = 0: pure distillation). The T^2 factor keeps
the KD gradient's scale independent of T (Hinton et al.).

Every function here returns a *sum* over the selected positions; the caller divides by the number
of assistant tokens in the whole gradient-accumulation window. That makes accumulation_steps = k
with batch B/k produce exactly the gradient of one batch B (the seed divides per micro-batch, which
weights short micro-batches' tokens more), and a window without assistant tokens gives 0, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tune_kd.data import IGNORE_INDEX


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the model is scored: logits at position t predict labels[t + 1].

    labels: (B, T) with IGNORE_INDEX off assistant tokens.
    Returns (mask (B, T-1) bool over logit positions, targets (N,) of the selected labels).
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def ce_sum(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy. student_logits: (N, V) any dtype; targets: (N,)."""
    return F.cross_entropy(student_logits.float(), targets, reduction="sum")


def forward_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed KL(softmax(teacher/T) || softmax(student/T)) over rows: the seed's distillation term.

    student_logits, teacher_logits: (N, V). Without the T^2 factor (the objective applies it).
    """
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")


# A plain dict, name -> summed divergence(student (N, V), teacher (N, V), T).
KD_LOSSES = {"forward_kl": forward_kl_sum}


# Rows per chunk of the (N, V) loss math: the fp32 log-probabilities of one chunk exist at a time
# (recomputed in backward), so memory stays flat however many assistant tokens a batch holds.
CHUNK_ROWS = 2048


def chunked_sum(fn, *rows: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """sum(fn(chunk...)) over row chunks of equally long tensors, checkpointed so the fp32
    intermediates of a chunk are freed after its forward and recomputed during backward."""
    n = rows[0].shape[0]
    if n <= chunk_rows:
        return fn(*rows)
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), device=rows[0].device)
    for lo in range(0, n, chunk_rows):
        total = total + checkpoint(fn, *(r[lo:lo + chunk_rows] for r in rows), use_reentrant=False)
    return total


@dataclass
class LossParts:
    """Each a 0-dim tensor already divided by the window's assistant-token count."""

    loss: torch.Tensor     # the objective that is back-propagated
    ce: torch.Tensor       # CE at T = 1
    kd: torch.Tensor       # divergence at temperature T, without the T^2 factor


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                      alpha: float, temperature: float, normalizer: float | torch.Tensor,
                      kd_loss: str = "forward_kl", chunk_rows: int = CHUNK_ROWS) -> LossParts:
    """alpha * CE + (1 - alpha) * T^2 * KD on the selected assistant positions.

    student_logits: (N, V); teacher_logits: (N, V) or None when alpha = 1 (no teacher needed);
    targets: (N,); normalizer: assistant tokens in the whole accumulation window (>= 1 used);
    chunk_rows: rows per checkpointed chunk of the fp32 math (the result does not depend on it).
    """
    normalizer = torch.clamp(torch.as_tensor(normalizer, dtype=torch.float32, device=student_logits.device), min=1.0)
    ce = chunked_sum(ce_sum, student_logits, targets, chunk_rows=chunk_rows) / normalizer
    if teacher_logits is None or alpha == 1.0:
        kd = torch.zeros((), device=student_logits.device)
        return LossParts(loss=alpha * ce, ce=ce, kd=kd)
    divergence = KD_LOSSES[kd_loss]
    kd = chunked_sum(lambda s, t: divergence(s, t, temperature), student_logits, teacher_logits,
                     chunk_rows=chunk_rows) / normalizer
    loss = alpha * ce + (1.0 - alpha) * temperature ** 2 * kd
    return LossParts(loss=loss, ce=ce, kd=kd)
