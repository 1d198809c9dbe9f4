"""Whether and how a run reads the teacher cache, and the way to it.

decide() applies the rule (cache_store.py's format; cache_fidelity.py's measurement for top_k
auto): the cache serves runs that need only the teacher's logits, with a fixed k or the smallest k
of the ladder within AUTO_TOLERANCE, when it fits teacher_cache.max_gb and the disk.
plan_teacher_cache gathers a run's inputs for it (a CacheSource), open_teacher_cache opens the
planned cache (building it first when missing); the search's driver opens it before any trial
starts (search/prepare.prepare_teacher_rows), from the student every trial starts from.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.data import tokenized
from tune_kd.kd.losses import kd_options
from tune_kd.kd.scoring import teacher_outputs
from tune_kd.model import build
from tune_kd.teacher import cache_fidelity, cache_inputs, cache_store
from tune_kd.teacher.cache_fidelity import EXACT, Ladder
from tune_kd.teacher.stored_rows import Layout, bytes_per_position, layout

log = logging.getLogger(__name__)

AUTO_TOLERANCE = 0.01       # top_k auto: the largest relative loss and gradient error it accepts
ACROSS_TOP_K = 1024         # top_k auto across tokenizers: no student of the teacher's vocabulary to measure against


@dataclass
class CachePlan:
    """decide's answer: whether this run reads a teacher cache, why (one log line), in which layout."""

    use: bool
    why: str
    layout: Layout | None = None
    auto: dict | None = None            # top_k auto: what it measured and chose (recorded in meta.json)


def decide(cfg, positions: int, vocab: int, free_bytes: int, measure: Callable[[], Ladder] | None = None,
           built: Callable[[Layout], bool] | None = None, across: bool = False) -> CachePlan:
    """Whether and how a run of cfg, whose training split has `positions` scored tokens, uses the cache.

    It applies when the run needs the teacher's logits only (not its hidden states: feature
    distillation runs it live). k is teacher_cache.top_k, or with top_k auto the smallest k of
    auto_ladder whose measured loss and gradient errors (measure(), called only here) are within
    AUTO_TOLERANCE; then the cache must fit teacher_cache.max_gb (auto; `on` ignores it) and 90%
    of the free disk, else the run reads the live teacher (`on`: a UserError). Nothing a trial can
    vary changes the token sequences (max_seq_len and the data are not searchable), so one cache
    serves every trial. built(layout): whether that cache is complete on disk already (then the
    free space does not matter: nothing more is written). across: the teacher is on another tokenizer
    than the student (its rows at its own positions): top_k auto keeps ACROSS_TOP_K unmeasured."""
    c = cfg.teacher_cache
    if c.mode == "off":
        return CachePlan(False, "off (teacher_cache: off)")
    if cfg.teacher_server.url:
        return CachePlan(False, "not used: teacher_server.url serves the teacher (its weights are not here to build "
                                "a cache from)")
    if cfg.teacher is None or (cfg.train.alpha >= 1.0 and "alpha" not in cfg.parameters):
        return CachePlan(False, "not used: training never runs the teacher (no teacher, or alpha 1)")
    if cfg.train.feature_weight > 0 or "feature_weight" in cfg.parameters:
        return CachePlan(False, "not used: feature distillation needs the teacher's hidden states, so the teacher "
                                "runs live")
    if c.top_k == "auto" and across:
        lay = layout(ACROSS_TOP_K, vocab, c.dtype)
        too_big = _too_big(cfg, positions * lay.bytes_per_position, free_bytes, lambda: built is not None and built(lay))
        if too_big:
            return CachePlan(False, f"not used: {too_big} (raise it, or set teacher_cache: on)")
        why = "whole: exact" if lay.full else (
            "the student, on another vocabulary, cannot measure the error: each merged distribution misses at most "
            "the tail's mass beyond the top k, spread evenly")
        return CachePlan(True, f"{c.mode}, top_k auto across tokenizers: {lay.describe()}, "
                               f"{positions * lay.bytes_per_position / 2**20:.1f} MB (the teacher's rows at its own "
                               f"positions; {why})", lay)
    if c.top_k == "auto":
        if measure is None:
            raise ValueError("teacher_cache.top_k auto needs a measure() of the candidate ks")
        return _auto_plan(cfg, positions, vocab, free_bytes, measure(), built)
    lay = layout(c.top_k, vocab, c.dtype)
    too_big = _too_big(cfg, positions * lay.bytes_per_position, free_bytes, lambda: built is not None and built(lay))
    if too_big:
        return CachePlan(False, f"not used: {too_big} (raise it, or set teacher_cache: on)")
    return CachePlan(True, f"{c.mode}: {lay.describe()}, {positions * lay.bytes_per_position / 2**20:.1f} MB", lay)


def _gib(size: float) -> str:
    return f"{size / 2**30:.3g} GiB"


def _too_big(cfg, size: int, free_bytes: int, on_disk: Callable[[], bool]) -> str | None:
    """Why a cache of `size` bytes cannot be built (None when it can); `on` raises on the disk.
    on_disk(): whether it is built already (asked only when the free space would refuse it)."""
    c = cfg.teacher_cache
    if c.mode == "auto" and size > c.max_gb * 2**30:
        return f"it would take {_gib(size)}, above teacher_cache.max_gb {c.max_gb:g}"
    if size > 0.9 * free_bytes and not on_disk():
        if c.mode == "on":
            raise UserError(f"teacher_cache: on needs {_gib(size)} but {cfg.data.cache_dir} has {_gib(free_bytes)} "
                            "free (free space, lower teacher_cache.top_k, or use auto)")
        return f"it would take {_gib(size)}, more than 90% of the {_gib(free_bytes)} free"
    return None


def auto_k(ladder: Ladder, vocab: int) -> int:
    """top_k auto's choice: the smallest measured k within AUTO_TOLERANCE (k = vocab, the full row,
    always qualifies)."""
    errors = {**ladder.errors, vocab: EXACT}
    return min(k for k, e in errors.items() if e.within(AUTO_TOLERANCE))


def _auto_plan(cfg, positions: int, vocab: int, free_bytes: int, ladder: Ladder,
               built: Callable[[Layout], bool] | None) -> CachePlan:
    """top_k auto: the smallest k within AUTO_TOLERANCE, when it fits; else the live teacher, with the figures."""
    c = cfg.teacher_cache
    errors = {**ladder.errors, vocab: EXACT}
    chosen = auto_k(ladder, vocab)
    lay = layout(chosen, vocab, c.dtype)
    size = positions * lay.bytes_per_position
    on_what = (f"worst over T {', '.join(f'{t:g}' for t in ladder.temperatures)} and {', '.join(ladder.kd_losses)} "
               f"on {ladder.conversations} conversations")
    record = {"tolerance": AUTO_TOLERANCE, "chosen_k": chosen, "chosen": asdict(errors[chosen]), **ladder.to_json()}
    too_big = _too_big(cfg, size, free_bytes, lambda: built is not None and built(lay))
    if too_big is None:
        smaller = max((k for k in errors if k < chosen), default=None)
        beaten = f"; top-{smaller}: {errors[smaller].describe()}" if smaller else ""
        bigger = f"top-{chosen} would take more bytes than the full row, so " if lay.full and chosen < vocab else ""
        return CachePlan(True, f"{c.mode}, top_k auto: {bigger}{lay.describe()}, {size / 2**20:.1f} MB; measured "
                               f"{errors[chosen].describe()}, {on_what}{beaten}", lay, record)
    limit = min(0.9 * free_bytes, c.max_gb * 2**30)
    ladder_ks = cache_fidelity.auto_ladder(vocab)[:-1]
    fitting = max((k for k in ladder_ks if positions * bytes_per_position(k, vocab, c.dtype) <= limit), default=None)
    # the bisection measured only some ks: the fitting one's figure when it has it, else the nearest measured above
    above = min((k for k in errors if fitting is not None and k > fitting), default=None)
    measured = (f"measured {errors[fitting].describe()}" if fitting in errors else
                f"not measured (top-{above}: {errors[above].describe()})" if above in ladder.errors else "not measured")
    best_fitting = f"; the largest k within it, top-{fitting}, {measured}" if fitting else ""
    return CachePlan(False, f"not used: top_k auto needs top-{chosen} to stay within {100 * AUTO_TOLERANCE:g}% "
                            f"({errors[chosen].describe()}, {on_what}), but {too_big}{best_fitting} (raise "
                            f"teacher_cache.max_gb, or set teacher_cache.top_k)", None, record)


@dataclass(frozen=True)
class CacheSource:
    """What a run's teacher cache is made from and measured against: its config, tokenizer and
    training split, the local teacher (teacher/local.LiveTeacher: the model, its precision and the
    vocabulary columns compared), the padding id, and the student (a ScoredLM) the run starts from,
    before any training or resume, against which top_k auto measures the cache's error."""

    cfg: ExperimentConfig
    tokenizer: object
    train_data: object                  # data/tokenized.TokenizedData
    teacher: object                     # teacher/local.LiveTeacher
    pad_id: int
    student: object                     # kd/scored.ScoredLM
    across: bool = False                # the teacher's tokenizer is not the student's (tokenizer, train_data:
                                        # the teacher's)

    @property
    def positions(self) -> int:
        return int(self.train_data.target_counts.sum())


@dataclass(frozen=True)
class Measurer:
    """make_measurer's answer: the vocabulary compared, inputs() -> the cache's CacheInputs (hashed
    once: a big teacher takes a while), measure() -> top_k auto's Ladder."""

    vocab: int
    inputs: Callable[[], cache_inputs.CacheInputs]
    measure: Callable[[], Ladder]
    across: bool = False


def plan_teacher_cache(source: CacheSource, measurer: Measurer | None = None) -> tuple[CachePlan, Measurer]:
    """(decide's plan for this run, the measurer it used). measurer: make_measurer(source), when the
    caller made it already."""
    measurer = measurer or make_measurer(source)
    cfg = source.cfg
    plan = decide(cfg, source.positions, measurer.vocab, shutil.disk_usage(cfg.data.cache_dir).free, measurer.measure,
                  lambda lay: cache_store.is_built(cfg.data.cache_dir, measurer.inputs(), lay, source.positions),
                  source.across)
    return plan, measurer


def make_measurer(source: CacheSource) -> Measurer:
    """The cache's inputs and top_k auto's measurement for this run (Measurer)."""
    cfg, teacher, student = source.cfg, source.teacher, source.student
    vocab = teacher.columns if teacher.columns is not None else build.vocab_rows(teacher.lm)
    Path(cfg.data.cache_dir).mkdir(parents=True, exist_ok=True)
    inputs = functools.cache(lambda: cache_inputs.CacheInputs(
        cache_inputs.model_fingerprint(teacher.lm), tokenized.tokenizer_fingerprint(source.tokenizer),
        cache_inputs.data_fingerprint(source.train_data), cfg.data.max_seq_len, teacher.columns, vocab))

    def measure_auto_k():
        divergences = {name: kd_options(dataclasses.replace(cfg.train, kd_loss=name))
                       for name in cache_fidelity.kd_losses_to_check(cfg)}
        was_training = student.training
        student.eval()   # the student's logits as a pure function of its weights (no dropout)
        try:
            return cache_fidelity.auto_ladder_for_run(
                cfg, cfg.data.cache_dir, inputs(), cache_inputs.model_fingerprint(student.lm), source.train_data,
                source.pad_id, teacher_outputs(teacher.scored, teacher.precision),
                teacher_outputs(student, teacher.precision), divergences, AUTO_TOLERANCE)
        finally:
            student.train(was_training)
    return Measurer(vocab, inputs, measure_auto_k, source.across)


def open_teacher_cache(source: CacheSource, measurer: Measurer | None = None, verify: bool = False):
    """(the teacher cache this run reads, built first when missing, or None when it does not
    apply; why, as plan_teacher_cache says it, for the caller's log line). measurer: as
    plan_teacher_cache takes it; verify: check a cache found on disk against its checksums
    (cache_store.open_or_build)."""
    plan, measurer = plan_teacher_cache(source, measurer)
    if not plan.use:
        return None, plan.why
    teacher = source.teacher
    return cache_store.open_or_build(source.cfg.data.cache_dir, measurer.inputs(),
                                     teacher_outputs(teacher.scored, teacher.precision), source.train_data,
                                     source.pad_id, plan.layout, {"auto": plan.auto} if plan.auto else None, verify), \
        plan.why


def served_layout(cfg: ExperimentConfig, cache, measurer: Measurer) -> Layout:
    """The rows a served teacher answers in: the teacher cache's when the trials read one (so
    on-policy and cached batches see the same teacher), else teacher_cache.top_k, or with top_k auto
    the k the cache's measurement picks (Measurer.measure(), remembered on disk per inputs)."""
    c, vocab = cfg.teacher_cache, measurer.vocab
    if cache is not None:
        return layout(cache.meta["top_k"], vocab, c.dtype)
    if c.top_k != "auto":
        return layout(c.top_k, vocab, c.dtype)
    if measurer.across:
        return layout(ACROSS_TOP_K, vocab, c.dtype)
    return layout(auto_k(measurer.measure(), vocab), vocab, c.dtype)
