"""Distillation losses: pure functions, fp32 math, assistant tokens only.

The objective is the seed's

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with alpha the CE weight (alpha = 1: plain SFT, alpha = 0: pure distillation). train.kd_loss swaps
the KL for another divergence D of KD_LOSSES (p = teacher, q = student, both at temperature T):
forward_kl (the seed's), reverse_kl, jsd (train.jsd_beta), skew_kl (train.skew), tvd. Each is 0 for
identical inputs and non-negative. In general the objective is alpha * CE + (1 - alpha) * T^k * D.

The factor T^k (KD_TEMPERATURE_POWER, kd_scale) keeps the KD gradient's scale from drifting with T,
so that searching T does not also search the KD weight. The gradient of D(p_T, q_T) w.r.t. a student
logit is (1/T) sum_i dD/dq_i * q_i (delta_ij - q_j). As T grows, p and q approach uniform and differ
by O(1/T). For the KL family (forward, reverse, jsd, skew: smooth divergences, locally a chi-square
in p - q) dD/dq is O(1/T) too, so the gradient shrinks as 1/T^2 and k = 2 (Hinton et al.; the
seed's T^2). TVD = 0.5 sum |p - q| has dD/dq_i = +-1/2 however close p and q are, so its gradient
shrinks as 1/T only and k = 1: under T^2 its gradient would grow with T (about 4x from T 2 to 8).

Every function here returns a *sum* over the selected positions; the caller divides by the number
of assistant tokens in the whole gradient-accumulation window. That makes accumulation_steps = k
with batch B/k produce exactly the gradient of one batch B (the seed divides per micro-batch, which
weights short micro-batches' tokens more), and a window without assistant tokens gives 0, not NaN.

distillation_loss never holds (N, V) logits: it takes a model's scored.Scored output (hidden rows
and output layer), makes the logits scored.CHUNK_ELEMENTS at a time, and takes each chunk's
gradient at once (_FusedObjective), so peak memory follows the chunk, not tokens x vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tune_kd.data.tokenized import IGNORE_INDEX
from tune_kd.kd.aligned import ACROSS_LOSSES
from tune_kd.kd.cross_vocab import CROSS_VOCAB_TEMPERATURE_POWER
from tune_kd.kd.scored import Scored, chunk_rows, pad_rows, row_chunks
from tune_kd.kd.teacher_rows import rows_of


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


def _log_probs(student_logits, teacher, temperature):
    """fp32 log-probabilities of both at temperature T, (log q_student, log p_teacher), over the
    vocabulary: the teacher's rows (a teacher_rows.TeacherRows, or (N, V) logits) rebuild them."""
    return rows_of(teacher).log_probs(student_logits, temperature)


def _kl_rows(logp_from: torch.Tensor, logp_to: torch.Tensor) -> torch.Tensor:
    """Summed KL(from || to) over rows, both given as log-probabilities."""
    return F.kl_div(logp_to, logp_from, log_target=True, reduction="sum")


def _log_mixture(logp_a: torch.Tensor, logp_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space."""
    return torch.logaddexp(logp_a + math.log(weight_a), logp_b + math.log1p(-weight_a))


def forward_kl_sum(student_logits, teacher_logits, temperature, **_):
    """KL(p || q): the seed's term; mass-covering (the student must cover every teacher mode)."""
    logq, logp = _log_probs(student_logits, teacher_logits, temperature)
    return _kl_rows(logp, logq)


def reverse_kl_sum(student_logits, teacher_logits, temperature, **_):
    """KL(q || p): mode-seeking (the student may drop teacher modes it cannot fit)."""
    logq, logp = _log_probs(student_logits, teacher_logits, temperature)
    return _kl_rows(logq, logp)


def jsd_sum(student_logits, teacher_logits, temperature, beta=0.5, **_):
    """Generalised Jensen-Shannon divergence, scaled so that it is continuous in beta with the two
    KL directions at its ends:

        JSD_beta(p, q) = [beta * KL(p || m) + (1 - beta) * KL(q || m)] / (beta * (1 - beta)),
        m = beta * p + (1 - beta) * q,

    JSD_0 = KL(p || q) (forward, the limit beta -> 0), JSD_1 = KL(q || p) (reverse); at beta = 0.5
    it is 4x the usual JSD. beta weighs the teacher as in TRL's GKD generalized JSD, which is the
    bracket without the division (so a TRL beta carries over; the term is 1 / (beta (1 - beta)) x TRL's)."""
    logq, logp = _log_probs(student_logits, teacher_logits, temperature)
    if beta <= 0.0:
        return _kl_rows(logp, logq)
    if beta >= 1.0:
        return _kl_rows(logq, logp)
    logm = _log_mixture(logp, logq, beta)
    return (beta * _kl_rows(logp, logm) + (1 - beta) * _kl_rows(logq, logm)) / (beta * (1 - beta))


def skew_kl_sum(student_logits, teacher_logits, temperature, skew=0.1, **_):
    """Skew KL: KL(p || skew * p + (1 - skew) * q); skew 0 is the forward KL, and a skew > 0
    bounds the term where the student puts almost no mass (DistiLLM)."""
    logq, logp = _log_probs(student_logits, teacher_logits, temperature)
    if skew <= 0.0:
        return _kl_rows(logp, logq)
    return _kl_rows(logp, _log_mixture(logp, logq, skew))


def tvd_sum(student_logits, teacher_logits, temperature, **_):
    """Total variation distance, 0.5 * sum |p - q| per row: bounded in [0, 1]."""
    logq, logp = _log_probs(student_logits, teacher_logits, temperature)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum()


# name -> summed divergence(student (N, V), teacher (N, V), T, beta=..., skew=...); p is the
# teacher's distribution at temperature T, q the student's.
KD_LOSSES = {"forward_kl": forward_kl_sum, "reverse_kl": reverse_kl_sum, "jsd": jsd_sum, "skew_kl": skew_kl_sum,
             "tvd": tvd_sum}

# every train.kd_loss: across tokenizers (kd/aligned.py) KD_LOSSES compare each aligned group's merged
# distributions in the teacher's vocabulary through X-Token's projection, and ACROSS_LOSSES (uld,
# gold_hybrid, pkl, hkl) compare merged rows; those four need a teacher on another tokenizer
DIVERGENCES = {**KD_LOSSES, **ACROSS_LOSSES}

def kd_options(train) -> dict:
    """The chosen divergence's own settings (KD_LOSSES' keyword arguments), from a TrainConfig."""
    return {"jsd": {"beta": train.jsd_beta}, "gold_hybrid": {"beta": train.jsd_beta},
            "skew_kl": {"skew": train.skew}}.get(train.kd_loss, {})


# name -> k of the objective's T^k factor: the power of 1/T at which the divergence's gradient
# w.r.t. the student's logits shrinks at large T (the module docstring derives it)
KD_TEMPERATURE_POWER = {"forward_kl": 2, "reverse_kl": 2, "jsd": 2, "skew_kl": 2, "tvd": 1,
                        **CROSS_VOCAB_TEMPERATURE_POWER}


def kd_scale(kd_loss: str, temperature: float) -> float:
    """The divergence's factor in the objective, T^k: T^2 for the KL family, T for tvd."""
    return temperature ** KD_TEMPERATURE_POWER[kd_loss]


@dataclass(frozen=True)
class Objective:
    """What one micro-batch optimises: alpha * CE + (1 - alpha) * T^k * D, D = DIVERGENCES[kd_loss]
    over the first `columns` vocabulary columns (None: all; build.check_vocab)."""

    alpha: float
    temperature: float
    kd_loss: str = "forward_kl"
    kd_options: dict | None = None
    columns: int | None = None

    @property
    def kd_weight(self) -> float:
        return (1.0 - self.alpha) * kd_scale(self.kd_loss, self.temperature)

    def sums(self, student_logits: torch.Tensor, teacher, targets: torch.Tensor) -> torch.Tensor:
        """[objective, CE, D] summed over a chunk's rows: student_logits (n, V) fp32, the teacher's
        rows (a teacher_rows.TeacherRows chunk, `columns` wide; None: CE only), targets (n,)."""
        if self.alpha == 0.0 and teacher is not None:   # CE is only reported: no backward through it
            with torch.no_grad():
                ce = ce_sum(student_logits, targets)
        else:
            ce = ce_sum(student_logits, targets)
        if teacher is None:
            return torch.stack([self.alpha * ce, ce, torch.zeros_like(ce)])
        kd = DIVERGENCES[self.kd_loss](student_logits[:, :self.columns], teacher, self.temperature,
                                     **(self.kd_options or {}))
        objective = self.kd_weight * kd if self.alpha == 0.0 else self.alpha * ce + self.kd_weight * kd
        return torch.stack([objective, ce, kd])


def _sums_and_grads(student: Scored, teacher, targets: torch.Tensor, objective: Objective, need_grad: bool):
    """Walk the rows in chunks: ([objective, CE, D] sums, and with need_grad the objective's gradients
    w.r.t. the student's hidden rows, output weight and bias). Each chunk's logits exist only while
    it is processed; its gradient is taken at once (local autograd from the logits on), so nothing
    (N, V) is kept for backward and no chunk is recomputed."""
    hidden = student.hidden.detach()
    # the output layer in the compute dtype once, not once per chunk (a (V, H) copy each time)
    cast = (lambda t: t) if student.compute_dtype is None else (lambda t: t.to(student.compute_dtype))  # noqa: E731
    weight = None if student.weight is None else cast(student.weight.detach())
    bias = None if student.bias is None else cast(student.bias.detach())
    sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
    grads = None
    if need_grad:   # fp32 sums for the output layer: the chunks' contributions add up without rounding drift
        trained = lambda t: t is not None and t.requires_grad  # noqa: E731
        grads = [torch.zeros_like(hidden), torch.zeros_like(student.weight, dtype=torch.float32)
                 if trained(student.weight) else None,
                 torch.zeros_like(student.bias, dtype=torch.float32) if trained(student.bias) else None]
    # the teacher's rows say where a chunk may end (across tokenizers only between groups)
    for lo, hi in (teacher.spans if teacher is not None else row_chunks)(student.rows, student.vocab):
        rows = hidden[lo:hi]
        raw = student.project(rows, weight, bias)                                          # (n, V)
        teacher_rows = None if teacher is None else teacher.chunk(lo, hi)
        if not need_grad:
            sums += objective.sums(student.finish(raw), teacher_rows, targets[lo:hi])
            continue
        raw = raw.detach().requires_grad_(True)
        with torch.enable_grad():
            chunk = objective.sums(student.finish(raw), teacher_rows, targets[lo:hi])
            (logit_grad,) = torch.autograd.grad(chunk[0], raw)                              # (n, V)
        sums += chunk.detach()
        if weight is None:
            grads[0][lo:hi] = logit_grad
            continue
        height = chunk_rows(student.vocab)     # every chunk's matmuls in one shape (scored.pad_rows)
        padded = pad_rows(logit_grad, height)
        grads[0][lo:hi] = (padded @ weight.to(logit_grad.dtype))[:hi - lo].to(hidden.dtype)  # (n, H)
        if grads[1] is not None and logit_grad.dtype == torch.float32:
            grads[1].addmm_(logit_grad.t(), rows.float())
        elif grads[1] is not None:   # autocast: the matmul in its dtype, as autograd's own backward would
            grads[1] += (padded.t() @ pad_rows(rows.to(logit_grad.dtype), height)).float()
        if grads[2] is not None:
            grads[2] += logit_grad.float().sum(0)
        del raw, chunk, logit_grad, padded, teacher_rows   # before the next chunk's are made, not after
    return sums, grads


class _FusedObjective(torch.autograd.Function):
    """[objective, CE, D] sums of a Scored student; backward hands out the gradients the forward
    already took (scaled by the incoming one). Only the objective is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, student, teacher, targets, objective):
        sums, grads = _sums_and_grads(student, teacher, targets, objective, need_grad=True)
        ctx.grads = grads
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        objective_sum, ce, kd = sums.unbind()
        ctx.mark_non_differentiable(ce, kd)
        return objective_sum, ce, kd

    @staticmethod
    def backward(ctx, grad_objective, _grad_ce, _grad_kd):
        scaled = [None if g is None else (g * grad_objective).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*scaled, None, None, None, None)


@dataclass
class LossParts:
    """Each a 0-dim tensor already divided by the window's assistant-token count."""

    loss: torch.Tensor     # the objective that is back-propagated
    ce: torch.Tensor       # CE at T = 1
    kd: torch.Tensor       # divergence at temperature T, without its T^k factor (kd_scale)
    feature: torch.Tensor | None = None   # feature distillation's term, when on (loop adds it)


def distillation_loss(student, teacher, targets: torch.Tensor, alpha: float, temperature: float,
                      normalizer: float | torch.Tensor, kd_loss: str = "forward_kl", kd_options: dict | None = None,
                      columns: int | None = None) -> LossParts:
    """alpha * CE + (1 - alpha) * T^k * KD on the selected assistant positions (T^k: kd_scale).

    student: a scored.Scored (hidden rows + output layer: logits made a chunk at a time) or (N, V)
    logits; teacher: its rows over the N positions (teacher_rows.BatchRows: live, cached or served,
    read a chunk at a time; a Scored or (N, V) logits are taken as the live teacher's), or None
    when alpha = 1 (no teacher needed);
    targets: (N,); normalizer: assistant tokens in the whole accumulation window (>= 1 used);
    kd_options: the divergence's own settings (beta for jsd, skew for skew_kl); columns: the
    vocabulary columns the divergence compares (build.check_vocab), CE keeps every student row.
    """
    student = student if isinstance(student, Scored) else Scored.of_logits(student)
    teacher = None if alpha == 1.0 or teacher is None else rows_of(teacher, columns)
    objective = Objective(alpha, temperature, kd_loss, kd_options, columns)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (student.hidden, student.weight, student.bias))
    if need_grad:
        total, ce, kd = _FusedObjective.apply(student.hidden, student.weight, student.bias, student, teacher, targets,
                                              objective)
    else:
        total, ce, kd = _sums_and_grads(student, teacher, targets, objective, need_grad=False)[0].unbind()
    normalizer = torch.clamp(torch.as_tensor(normalizer, dtype=torch.float32, device=total.device), min=1.0)
    return LossParts(loss=total / normalizer, ce=ce / normalizer, kd=kd / normalizer)
