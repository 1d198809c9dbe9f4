"""One optimizer step's pieces: the schedules, both models' forward, the objective and its backward.

Per micro-batch (backward_step): both models on the scored positions (the teacher through its one
protocol, kd/teacher_rows.Teacher: live, served, its rows read from the teacher cache, or on another
tokenizer), alpha*CE + (1-alpha)*T^2*KL (another train.kd_loss D: T^k*D, losses.kd_scale) divided
by the assistant-token count of the whole accumulation window, backward.
Per window (optimizer_step): unscale, clip, step, zero_grad(set_to_none=True). The learning rate
follows linear warmup then the seed's cosine lr/10 + 0.5*lr*(1 + cos(pi*step/total)).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from tune_kd.kd import features, losses
from tune_kd.kd.losses import kd_options
from tune_kd.kd.scoring import scored_positions
from tune_kd.kd.teacher_rows import Teacher
from tune_kd.train.run import Run


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then the seed's cosine from lr*1.1 down to lr/10."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr / 10 + 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def temperature_at(step: int, total: int, train_cfg) -> float:
    """The KD temperature at optimizer step `step` of `total` (seed 10.2): train.temperature, or with
    a linear / cosine schedule from train.temperature to train.final_temperature over training."""
    if train_cfg.temperature_schedule == "constant" or train_cfg.final_temperature is None:
        return train_cfg.temperature
    done = min(1.0, step / max(1, total - 1))
    remaining = 1.0 - done if train_cfg.temperature_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return train_cfg.final_temperature + (train_cfg.temperature - train_cfg.final_temperature) * remaining


def forward_pair(student, teacher: Teacher | None, batch, precision, from_data: bool = False):
    """The student's output (with grad) and the teacher's rows on the scored positions: the
    student's a scored.Scored whose logits are made a chunk at a time; the teacher's its answer
    (kd/teacher_rows.Teacher.ask: live, cached or served, the same BatchRows to the loss; None
    without a teacher); plus extras: "features" (student's, teacher's) under feature distillation,
    "router_aux" for a mixture-of-experts student in training (each None otherwise). from_data:
    the batch is the training split's own, which a teacher cache can answer."""
    input_ids = batch["input_ids"].to(precision.device, non_blocking=True)
    labels = batch["labels"].to(precision.device, non_blocking=True)
    positions, targets = scored_positions(labels)
    # asked first: a served teacher works on this batch while the student runs its forward here
    answer = teacher.ask(batch, positions, from_data) if teacher is not None else None
    with precision.autocast():
        student_out, student_features, router_aux = student(input_ids, positions)        # N rows
    teacher_out, teacher_features = answer.result() if answer is not None else (None, None)
    extras = {"features": (student_features, teacher_features) if student_features and teacher_features else None,
              "router_aux": router_aux}
    return student_out, teacher_out, targets, positions, extras


@dataclass(frozen=True)
class MicroStep:
    """What one micro-batch's objective depends on besides the run and the batch."""

    normalizer: float              # assistant tokens of the whole accumulation window (this rank's share)
    temperature: float             # this step's (temperature_at)
    sync: bool = True              # False: skip DDP's all-reduce (every micro-batch of a window but the last)
    read_cache: bool = True        # False: a generated batch, which the teacher cache cannot answer
    on_policy: bool = False        # the replies are the student's own samples: the loss is T^k * D alone


def backward_step(run: Run, batch: dict, step: MicroStep) -> losses.LossParts:
    """One micro-batch: forward both models on the scored positions, the objective, backward.

    On an on-policy batch alpha is 0 (alpha is CE's weight, and a sampled token is no label). The
    divergence compares the teacher's `columns` vocabulary columns (build.check_vocab)."""
    train_cfg = run.cfg.train
    teacher = run.teacher if run.need_teacher else None
    s_out, t_out, targets, _, extras = forward_pair(run.trained, teacher, batch, run.precision, step.read_cache)
    parts = losses.distillation_loss(s_out, t_out, targets, 0.0 if step.on_policy else train_cfg.alpha,
                                     step.temperature, step.normalizer, train_cfg.kd_loss, kd_options(train_cfg),
                                     teacher.columns if teacher is not None else None)
    if extras["features"] is not None:
        parts.feature = features.feature_loss_sum(*extras["features"], train_cfg.feature_loss) \
            / max(float(step.normalizer), 1.0)
        parts.loss = parts.loss + train_cfg.feature_weight * parts.feature
    if extras["router_aux"] is not None:
        # The seed adds the router's load-balancing loss to CE (so it weighs alpha); a per-batch mean,
        # weighted by this micro-batch's share of the window's tokens so accumulation stays exact.
        share = targets.numel() / max(float(step.normalizer), 1.0)
        parts.loss = parts.loss + train_cfg.alpha * extras["router_aux"] * share
    student = run.trained
    with (contextlib.nullcontext() if step.sync or not hasattr(student, "no_sync") else student.no_sync()):
        run.scaler.scale(parts.loss).backward()
    return parts


def optimizer_step(lm, optimizer, scaler, grad_clip: float) -> None:
    """Unscale (fp16), clip, step, zero_grad(set_to_none=True)."""
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(lm.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
