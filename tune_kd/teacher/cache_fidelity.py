"""How close a teacher cache is to the live teacher: what teacher_cache.top_k auto measures before
it picks k, and what bench/teacher_cache_fidelity.py tabulates.

For a cache layout (k, stored dtype; stored_rows.Layout), a divergence of losses.KD_LOSSES and a
temperature T, on the same student logits:

    loss error      |KD_cache - KD_live| / KD_live                   (KD summed over the sample)
    gradient error  ||g_cache - g_live|| / ||g_live||                (g: d KD / d student logits)

and optionally the gradient error w.r.t. the student's parameters. The cached teacher is rebuilt
exactly as a trial reads it (stored_rows.compress, then StoredRows.widened: the stored
dtype's rounding included), but in memory, without writing a cache. Each error is reported at its
worst over the temperatures and divergences (Fidelity); top_k auto's Ladder holds one per k of
auto_ladder, and cache_plan.decide picks from it.

Both sums decompose over rows, so the sample is processed batch by batch with flat memory. The
parameter gradient is linear in the logit gradient (g_params = J^T g_logits), so its error needs
one vector-Jacobian product per (layout, divergence, T) on the batch's retained graph, not a new
forward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from tune_kd.config.checks import parameter_candidates
from tune_kd.data import tokenized
from tune_kd.kd.losses import KD_LOSSES
from tune_kd.kd.scored import Scored, row_chunks
from tune_kd.teacher import cache_store
from tune_kd.teacher.cache_inputs import CacheInputs, digest
from tune_kd.teacher.cache_store import FORMAT
from tune_kd.teacher.stored_rows import Layout, compress, layout

log = logging.getLogger(__name__)

SAMPLE_CONVERSATIONS = 128   # top_k auto measures on at most this many training conversations ...
SAMPLE_SEED = 0              # ... drawn with this seed, the same for every run on the same data
SAMPLE_BATCH = 32            # conversations per forward while measuring
# ... and at most this many scored positions x vocabulary columns: 128 demo conversations at
# MiniMind's 6,400 ids, ~440 positions at Qwen2.5's 151,646 (what keeps choosing k to seconds there)
SAMPLE_ELEMENTS = 1 << 26
MEASURE_CHUNK_ELEMENTS = 1 << 22   # logits per chunk while measuring (it holds ~10 such intermediates)
TEMPERATURE_POINTS = 5       # temperatures measured across the run's range (both ends included)


# ----------------------------------------------------------------------------------------------
# What is measured: a layout's errors, and the ladder of ks top_k auto chooses from
# ----------------------------------------------------------------------------------------------

AUTO_SMALLEST_K = 8         # the ladder auto measures: 8, 16, 32, ... below the vocabulary, then all of it


def auto_ladder(vocab: int) -> list[int]:
    """The ks top_k auto considers, ascending; the last is the vocabulary (the full row: exact)."""
    ladder, k = [], AUTO_SMALLEST_K
    while k < vocab:
        ladder.append(k)
        k *= 2
    return ladder + [vocab]


@dataclass(frozen=True)
class Fidelity:
    """How far a cache layout is from the live teacher on a sample: the worst relative error over
    the temperatures (and divergences) measured, and the T where each was worst."""

    loss: float                         # |KD_cache - KD_live| / KD_live
    grad: float                         # ||g_cache - g_live|| / ||g_live||, g w.r.t. the student's logits
    loss_at: float | None               # None: exact, nothing measured
    grad_at: float | None
    param_grad: float | None = None     # the same w.r.t. the student's parameters (the bench measures it)
    param_grad_at: float | None = None

    def within(self, tolerance: float) -> bool:
        return self.loss <= tolerance and self.grad <= tolerance

    def describe(self) -> str:
        if self.loss_at is None:
            return "exact (the full row)"
        return f"loss error {100 * self.loss:.2f}% (T {self.loss_at:g}), gradient {100 * self.grad:.2f}% (T {self.grad_at:g})"


EXACT = Fidelity(0.0, 0.0, None, None)   # k = vocab: the full row, nothing estimated


@dataclass
class Ladder:
    """top_k auto's measurement: the Fidelity of each k of auto_ladder below the vocabulary, in
    the run's value dtype, and what it was measured on."""

    errors: dict[int, Fidelity]
    temperatures: list[float]
    kd_losses: list[str]
    conversations: int
    positions: int
    seconds: float = 0.0                # how long the measurement took

    def to_json(self) -> dict:
        return {**asdict(self), "errors": {str(k): asdict(e) for k, e in self.errors.items()}}

    @classmethod
    def from_json(cls, raw: dict) -> "Ladder":
        return cls(**{**raw, "errors": {int(k): Fidelity(**e) for k, e in raw["errors"].items()}})


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------

def temperatures_to_check(cfg) -> list[float]:
    """The temperatures a run of cfg trains at, as TEMPERATURE_POINTS evenly spaced values over its
    range: the searched `temperature` (and `final_temperature` when a schedule moves T) parameters'
    extremes, else the train section's values."""
    t = cfg.train
    values = _candidates(cfg, "temperature", t.temperature)
    schedules = set(_candidates(cfg, "temperature_schedule", t.temperature_schedule))
    if schedules - {"constant"}:
        values += _candidates(cfg, "final_temperature", t.final_temperature)
    values = [float(v) for v in values if v is not None]
    lo, hi = min(values), max(values)
    if hi == lo:
        return [lo]
    return [float(v) for v in np.linspace(lo, hi, TEMPERATURE_POINTS)]


def kd_losses_to_check(cfg) -> list[str]:
    """train.kd_loss, or every divergence the search may pick."""
    return sorted(set(_candidates(cfg, "kd_loss", cfg.train.kd_loss)))


def _candidates(cfg, name: str, fixed) -> list:
    """A train key's possible values: the searched parameter's extremes or values, else its fixed value."""
    spec = cfg.parameters.get(name)
    return list(parameter_candidates(spec).values()) if spec is not None else [fixed]


def sample_batches(train_data, pad_id: int, conversations: int = SAMPLE_CONVERSATIONS,
                   batch: int = SAMPLE_BATCH, vocab: int | None = None) -> list[dict]:
    """A fixed, seeded sample of the training conversations, collated in batches (tokenized.collate):
    at most `conversations`, and with `vocab`, only as many (drawn first, at least one) as keep the
    sample's scored positions x vocab within SAMPLE_ELEMENTS."""
    count = min(conversations, len(train_data))
    chosen = np.random.default_rng(SAMPLE_SEED).choice(len(train_data), size=count, replace=False)
    if vocab is not None:
        within = np.cumsum(train_data.target_counts[chosen]) * vocab <= SAMPLE_ELEMENTS
        chosen = chosen[:max(1, int(within.sum()))]
    chosen = np.sort(chosen)
    return [tokenized.collate(train_data, chosen[lo:lo + batch], pad_id) for lo in range(0, len(chosen), batch)]


class FidelityMeter:
    """Accumulates, batch by batch, the cache's KD sums and gradients against the live teacher's for
    every layout, divergence (name -> its options, e.g. {"beta": 0.5} for jsd) and temperature.

    parameters: the student's parameters, to also measure the gradient error w.r.t. them; add()
    then needs student logits that still carry their graph (grad enabled)."""

    def __init__(self, layouts: Iterable[Layout], temperatures: Iterable[float], divergences: dict[str, dict],
                 parameters: list[torch.Tensor] | None = None):
        self.layouts, self.temperatures, self.divergences = list(layouts), list(temperatures), dict(divergences)
        self.parameters = [p for p in parameters or [] if p.requires_grad]
        self.conversations = self.positions = 0
        # (divergence, T) -> live KD sum, ||g||^2; (layout, divergence, T) -> cached KD sum, ||g_cache - g_live||^2
        self.live: dict[tuple, list[float]] = {}
        self.cached: dict[tuple, list[float]] = {}
        self.live_param_grad: dict[tuple, torch.Tensor] = {}       # (divergence, T) -> J^T g_live
        self.param_grad_error: dict[tuple, torch.Tensor] = {}      # (layout, divergence, T) -> J^T (g_cache - g_live)

    def add(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, conversations: int = 0) -> None:
        """One batch: student_logits (N, V) and the live teacher's teacher_logits (N, V) at the same
        scored positions."""
        self.conversations += conversations
        self.positions += student_logits.shape[0]
        teacher_logits = teacher_logits.to(torch.float32, copy=True)   # out of inference mode: autograd may save it
        rebuilt = {lay: compress(teacher_logits, lay).widened() for lay in self.layouts}
        for name, options in self.divergences.items():
            for temperature in self.temperatures:
                live_kd, live_grad = _kd_and_grad(student_logits, teacher_logits, name, options, temperature)
                _accumulate(self.live, (name, temperature), live_kd, live_grad.square().sum())
                if self.parameters:
                    _add_vector(self.live_param_grad, (name, temperature), self._pull_back(student_logits, live_grad))
                for lay, cached in rebuilt.items():
                    kd, grad = _kd_and_grad(student_logits, cached, name, options, temperature)
                    difference = grad - live_grad
                    _accumulate(self.cached, (lay, name, temperature), kd, difference.square().sum())
                    if self.parameters:
                        _add_vector(self.param_grad_error, (lay, name, temperature),
                                    self._pull_back(student_logits, difference))

    def _pull_back(self, student_logits: torch.Tensor, logit_grad: torch.Tensor) -> torch.Tensor:
        """J^T logit_grad: the parameter gradient a logit gradient implies, flattened."""
        grads = torch.autograd.grad(student_logits, self.parameters, grad_outputs=logit_grad.to(student_logits.dtype),
                                    retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                          for p, g in zip(self.parameters, grads)])

    def results(self) -> dict[Layout, Fidelity]:
        """Each layout's worst relative errors over the divergences and temperatures."""
        out = {}
        for lay in self.layouts:
            loss, grad, param = {}, {}, {}
            for (name, temperature), (live_kd, live_sq) in self.live.items():
                kd, diff_sq = self.cached[(lay, name, temperature)]
                loss[(name, temperature)] = abs(kd - live_kd) / max(abs(live_kd), 1e-30)
                grad[(name, temperature)] = (diff_sq / max(live_sq, 1e-30)) ** 0.5
                if self.parameters:
                    live_norm = float(self.live_param_grad[(name, temperature)].norm())
                    param[(name, temperature)] = float(self.param_grad_error[(lay, name, temperature)].norm()) \
                        / max(live_norm, 1e-30)
            worst = lambda errors: max(errors, key=errors.get)  # noqa: E731
            at_param = worst(param) if param else None
            out[lay] = Fidelity(loss[worst(loss)], grad[worst(grad)], worst(loss)[1], worst(grad)[1],
                                param[at_param] if param else None, at_param[1] if param else None)
        return out


def _kd_and_grad(student_logits, teacher, name: str, options: dict, temperature: float):
    """(KD sum as a float, its gradient (N, V) w.r.t. the student logits) for a live or cached teacher."""
    with torch.enable_grad():
        leaf = student_logits.detach().to(torch.float32, copy=True).requires_grad_(True)   # copy: may be an inference tensor
        kd = KD_LOSSES[name](leaf, teacher, temperature, **options)
        (grad,) = torch.autograd.grad(kd, leaf)
    return float(kd.detach()), grad


def _accumulate(sums: dict, key, *values) -> None:
    sums[key] = [a + float(b) for a, b in zip(sums.get(key, [0.0] * len(values)), values)]


def _add_vector(sums: dict, key, vector: torch.Tensor) -> None:
    sums[key] = vector if key not in sums else sums[key] + vector


@dataclass
class SampleOutputs:
    """Both models' outputs on one sampled batch: their hidden rows (small), logits made per chunk."""

    student: Scored
    teacher: Scored
    conversations: int


def sample_outputs(batches: list[dict], teacher_outputs: Callable[[dict], Scored],
                   student_outputs: Callable[[dict], Scored]) -> list[SampleOutputs]:
    """Run both models once over the sample; every layout measured later reuses these outputs."""
    return [SampleOutputs(student_outputs(batch), teacher_outputs(batch), len(batch["indices"])) for batch in batches]


def measure_layouts(outputs: list[SampleOutputs], layouts: list[Layout], temperatures: list[float],
                    divergences: dict[str, dict], columns: int | None) -> dict[Layout, Fidelity]:
    """Each layout's Fidelity against the live teacher on the sampled outputs, w.r.t. the student's
    logits over the distilled `columns`, a chunk of rows at a time."""
    meter = FidelityMeter(layouts, temperatures, divergences)
    for sample in outputs:
        vocab = max(sample.student.vocab, sample.teacher.vocab)
        for lo, hi in row_chunks(sample.student.rows, vocab, MEASURE_CHUNK_ELEMENTS):
            with torch.no_grad():
                student, teacher = (s.logits(lo, hi)[:, :columns] for s in (sample.student, sample.teacher))
            meter.add(student, teacher, conversations=sample.conversations if lo == 0 else 0)
    return meter.results()


def measure_ladder(outputs: list[SampleOutputs], ks: list[int], vocab: int, dtype: str, temperatures: list[float],
                   divergences: dict[str, dict], columns: int | None, tolerance: float) -> Ladder:
    """top_k auto's measurement: the smallest k of `ks` (ascending) whose errors are within
    `tolerance`, by bisection. The error falls as k grows (more of the row is kept exactly, less
    tail is estimated), so the search measures about log2(len(ks)) layouts, not all of them; the
    Ladder holds those it measured, the chosen k's lower neighbour among them."""
    errors, lo, hi = {}, 0, len(ks)
    while lo < hi:
        mid = (lo + hi) // 2
        lay = layout(ks[mid], vocab, dtype)
        errors[ks[mid]] = measure_layouts(outputs, [lay], temperatures, divergences, columns)[lay]
        lo, hi = (lo, mid) if errors[ks[mid]].within(tolerance) else (mid + 1, hi)
    positions = sum(sample.student.rows for sample in outputs)
    return Ladder(dict(sorted(errors.items())), list(temperatures), list(divergences),
                  sum(sample.conversations for sample in outputs), positions)


def auto_ladder_for_run(cfg, cache_dir, inputs: CacheInputs, student_hash: str, train_data, pad_id: int,
                        teacher_outputs: Callable[[dict], Scored], student_outputs: Callable[[dict], Scored],
                        divergences: dict[str, dict], tolerance: float) -> Ladder:
    """top_k auto's measurement for a run of cfg, against the student the trials start from
    (student_hash: its model_fingerprint), over cfg's temperatures and divergences (name -> options).

    Remembered under cache_dir/teacher/auto-<hash of everything it depends on>.json: the search's
    driver measures, every trial (and every rank) reads the same figures, so all pick the same k."""
    temperatures = temperatures_to_check(cfg)
    ks = auto_ladder(inputs.vocab)[:-1]                       # the full row is exact: nothing to measure
    settings = {"format": FORMAT, **asdict(inputs), "student": student_hash, "dtype": cfg.teacher_cache.dtype,
                "temperatures": temperatures, "divergences": divergences, "ladder": ks, "tolerance": tolerance,
                "sample": [SAMPLE_CONVERSATIONS, SAMPLE_ELEMENTS, SAMPLE_SEED]}

    def measure() -> dict:
        started = time.perf_counter()
        outputs = sample_outputs(sample_batches(train_data, pad_id, vocab=inputs.vocab), teacher_outputs,
                                 student_outputs)
        ladder = measure_ladder(outputs, ks, inputs.vocab, cfg.teacher_cache.dtype, temperatures, divergences,
                                inputs.columns, tolerance)
        ladder.seconds = time.perf_counter() - started
        log.info("teacher cache: top_k auto measured k in %s on %d conversations (%d positions) in %.1f s",
                 list(ladder.errors), ladder.conversations, ladder.positions, ladder.seconds)
        return {"settings": settings, **ladder.to_json()}

    remembered = cache_store.remembered(Path(cache_dir) / "teacher" / f"auto-{digest(settings)}.json",
                                          measure, building="the top_k auto measurement")
    return Ladder.from_json({k: v for k, v in remembered.items() if k != "settings"})
