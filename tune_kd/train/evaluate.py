"""Validation: the metrics every epoch reports, over the whole validation split.

val_ce and val_kl are at T = 1, so they compare across trials with different T and alpha; val_loss
is the trial's own objective; val_acc the share of conversations whose every assistant token is
the argmax (what greedy decoding answers exactly); val_gen_* from the student's greedy replies.
Across tokenizers (teacher/across.py) val_kl is the KL in the teacher's vocabulary per aligned group
(kd/aligned.py: P-KL at T = 1), and val_gen_ce is NaN (the student's replies have no teacher tokens).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tune_kd.config.experiment import ExperimentConfig
from tune_kd.data import tokenized
from tune_kd.kd import losses
from tune_kd.kd.losses import kd_options
from tune_kd.kd.scored import row_chunks
from tune_kd.kd.scoring import scored_positions
from tune_kd.kd.teacher_rows import Teacher, target_log_probs
from tune_kd.train import on_policy, step


@torch.no_grad()
def evaluate(student, teacher: Teacher | None, val_data, pad_id, cfg: ExperimentConfig, precision,
             rank: int = 0, world: int = 1, temperature: float | None = None,
             generation: on_policy.Generation | None = None) -> dict:
    """Validation metrics over the whole split (sharded across ranks and summed).

    val_ce and val_kl are at T = 1, so they compare across trials with different T and alpha;
    val_loss is the trial's own objective; val_acc is the share of conversations whose every
    assistant token is the argmax, i.e. what greedy decoding would answer exactly. With
    eval.generation_samples (and `generation`), val_gen_acc and val_gen_ce from the student's greedy
    replies to that many validation prompts (on_policy.py); NaN otherwise. Logits are made a chunk
    of rows at a time, as in training.
    """
    train_cfg = cfg.train
    temperature = train_cfg.temperature if temperature is None else temperature   # val_loss at the current T
    divergence, options = losses.DIVERGENCES[train_cfg.kd_loss], kd_options(train_cfg)
    student.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=precision.device)  # ce, kl@1, kd@T, tokens, right, rows
    batches = tokenized.epoch_batches(val_data, train_cfg.batch_size, train_cfg.seed, epoch=0, shuffle=False)[rank::world]
    for indices in batches:
        batch = tokenized.collate(val_data, indices, pad_id)
        s_out, t_out, targets, positions, _ = step.forward_pair(student, teacher, batch, precision)
        rows = positions.nonzero()[:, 0]
        wrong = torch.zeros(positions.shape[0], device=precision.device)
        for lo, hi in (t_out.spans if t_out is not None else row_chunks)(s_out.rows, s_out.vocab):
            s_logits = s_out.logits(lo, hi)                                                   # (n, V)
            sums[0] += losses.ce_sum(s_logits, targets[lo:hi])
            wrong.index_add_(0, rows[lo:hi], (s_logits.argmax(-1) != targets[lo:hi]).float())
            if t_out is not None:
                t_rows, s_logits = t_out.chunk(lo, hi), s_logits[:, :teacher.columns]
                sums[1] += losses.forward_kl_sum(s_logits, t_rows, 1.0)
                sums[2] += divergence(s_logits, t_rows, temperature, **options)
        sums[3] += targets.numel()
        sums[4] += ((wrong == 0) & positions.any(1)).sum()
        sums[5] += positions.any(1).sum()
    gen_sums = torch.zeros(4, dtype=torch.float64, device=precision.device)
    if generation is not None and cfg.eval.generation_samples:
        subset = on_policy.generation_subset(val_data, cfg.eval.generation_samples)[rank::world]
        gen_sums = on_policy.generation_sums(student.lm, generation, val_data, subset, train_cfg.batch_size,
                                             teacher_ce_of(teacher, precision.device), precision.autocast,
                                             precision.device)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(gen_sums)
    student.train()
    ce, kl, kd_t, tokens, right, rows = sums.tolist()
    tokens = max(tokens, 1.0)
    has_teacher = teacher is not None
    return {"val_ce": ce / tokens, "val_kl": kl / tokens if has_teacher else float("nan"),
            "val_loss": (train_cfg.alpha * ce
                         + (1 - train_cfg.alpha) * losses.kd_scale(train_cfg.kd_loss, temperature) * kd_t) / tokens,
            "val_acc": right / max(rows, 1.0),
            **on_policy.generation_metrics(gen_sums, has_teacher and teacher.same_tokens)}


def teacher_ce_of(teacher: Teacher | None, device: torch.device):
    """batch -> the teacher's CE sum on the batch's labelled tokens (val_gen_ce); None without a
    teacher. Exact whatever the teacher's form: a served teacher sends each target's log-prob."""
    if teacher is None or not teacher.same_tokens:
        return None

    def ce(batch) -> float:
        positions, targets = scored_positions(batch["labels"].to(device))
        rows, _ = teacher.ask(batch, positions).result()
        return -float(target_log_probs(rows, targets).double().sum())
    return ce
