"""The scored positions and the frozen teacher's output there, shared by the training loop, its
evaluation, the teacher cache's build and top_k auto's measurement.

A causal LM's logit at position t is scored against the label at t + 1, on assistant tokens only
(losses.target_positions); scored.ScoredLM runs a model on those positions only and keeps its
output before the output layer. The teacher runs under inference mode; its logits are made a chunk
of rows at a time, its padding columns past the tokenizer's ids dropped (build.check_vocab).
"""

from __future__ import annotations

import torch

from tune_kd.kd import losses
from tune_kd.kd.scored import Scored, row_chunks


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, T) bool, targets (N,)): the logit at t is scored against labels[t + 1]."""
    shifted_mask, targets = losses.target_positions(labels)
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = shifted_mask
    return positions, targets


def teacher_forward(teacher, input_ids, positions, precision) -> tuple[Scored, list | None]:
    """The teacher's Scored output at the scored positions and its features, run under inference
    mode, handed back as ordinary tensors (autograd may save them: they are the loss's constants)."""
    with torch.inference_mode(), precision.autocast():
        scored, features, _ = teacher(input_ids, positions)
    scored.hidden = scored.hidden.clone()          # (N, H): small, unlike the logits it stands for
    return scored, [f.clone() for f in features] if features else None


def teacher_outputs(teacher, precision):
    """batch -> the teacher's Scored output at the batch's scored positions."""
    def outputs(batch):
        labels = batch["labels"].to(precision.device)
        return teacher_forward(teacher, batch["input_ids"].to(precision.device), scored_positions(labels)[0],
                               precision)[0]
    return outputs


def logit_chunks(scored: Scored, columns: int | None):
    """(lo, hi, logits (hi - lo, columns) fp32) for successive row chunks of a Scored, without grad:
    what the teacher cache compresses and top_k auto compares, never the (N, V) whole."""
    with torch.no_grad():
        for lo, hi in row_chunks(scored.rows, scored.vocab):
            yield lo, hi, scored.logits(lo, hi)[:, :columns]
