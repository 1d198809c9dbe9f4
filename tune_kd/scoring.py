"""The scored positions and the frozen teacher's logits there, shared by the training loop, its
evaluation, the teacher cache's build and top_k auto's measurement.

A causal LM's logit at position t is scored against the label at t + 1, on assistant tokens only
(losses.target_positions); models.SelectedLogits computes logits at those positions only. The
teacher runs under inference mode, its extra (padding) vocabulary columns dropped.
"""

from __future__ import annotations

import torch

from tune_kd import losses


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, T) bool, targets (N,)): the logit at t is scored against labels[t + 1]."""
    shifted_mask, targets = losses.target_positions(labels)
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = shifted_mask
    return positions, targets


def teacher_forward(teacher, input_ids, positions, precision, teacher_cols):
    """The teacher's logits (N, V) at the scored positions (its extra vocab columns dropped) and
    its features, under inference mode."""
    with torch.inference_mode(), precision.autocast():
        logits, features, _ = teacher(input_ids, positions)
    return (logits[:, :teacher_cols] if teacher_cols is not None else logits), features


def teacher_rows(teacher, precision, teacher_cols):
    """batch -> the teacher's logits at its scored positions, what the teacher cache stores."""
    def rows(batch):
        labels = batch["labels"].to(precision.device)
        return teacher_forward(teacher, batch["input_ids"].to(precision.device), scored_positions(labels)[0],
                               precision, teacher_cols)[0]
    return rows
