"""build_run(cfg) -> Run: everything one distillation run needs, built once, in dependency order.

The loop (train/loop.py), the search's preparation (search/prepare.py: the teacher cache and the
served teacher's rows), the GPU memory probe (search/resources.py) and the tests all build their
run here, so each sees the same student: same seed, same order.

    place       rank, world size and device (model/distributed.py)
    precision   autocast dtype, the teacher's dtype, loss scaling, and why (model/hardware.py)
    data        the shared tokenizer and the tokenized splits (data/tokenized.py)
    teacher     a served one (teacher/served.py) or the local model, and the vocabulary columns
                the divergence compares
    student     built or loaded, checked against the size budget; feature projector; DDP wrapper
    cache       the teacher cache the run reads, built first when missing (teacher/cache_plan.py):
                then the run's teacher reads its rows there (teacher/local.CacheReader)

The run holds one teacher (kd/teacher_rows.Teacher), chosen here; nothing downstream asks its form.
    optimizer   AdamW and the gradient scaler
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from tune_kd.config.experiment import ExperimentConfig
from tune_kd.data.inputs import Tokenizers, load_data, run_tokenizers, teacher_side
from tune_kd.data.tokenized import TokenizedData, padding_id
from tune_kd.kd import features
from tune_kd.kd.scored import ScoredLM
from tune_kd.model import build, student_shape
from tune_kd.model.distributed import setup_distributed
from tune_kd.model.hardware import Precision, resolve_precision
from tune_kd.kd.teacher_rows import Teacher
from tune_kd.teacher import across
from tune_kd.teacher.cache_plan import CacheSource, open_teacher_cache
from tune_kd.teacher.cache_store import TeacherCache
from tune_kd.teacher.local import CacheReader, LiveTeacher
from tune_kd.teacher.served import RemoteTeacher, connect
from tune_kd.train.on_policy import Generation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One run's parts (the models and optimizer are mutable; which ones the run uses is not)."""

    cfg: ExperimentConfig
    rank: int
    world: int
    precision: Precision                  # .device: where this rank trains
    tokenizer: object
    train_data: TokenizedData
    val_data: TokenizedData
    pad_id: int
    lm: torch.nn.Module                   # the student as exported (a Hugging Face causal LM)
    teacher: Teacher | None               # live, cached or served: what the step and evaluation ask
    student: ScoredLM                     # every trained parameter: lm and the feature projector
    trained: torch.nn.Module              # student, wrapped by DDP when world > 1
    need_teacher: bool                    # whether training ever asks the teacher
    generation: Generation | None         # on-policy / seq_kd batches and val_gen_* metrics
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    extra_state: dict = field(default_factory=dict)   # checkpointed, never exported (the projector)
    student_params: int = 0
    embedding_params: int = 0
    tokenizers: Tokenizers | None = None  # the student's tokenizer and, across tokenizers, the teacher's

    @property
    def across(self) -> bool:
        return self.tokenizers is not None and self.tokenizers.across

    @property
    def device(self) -> torch.device:
        return self.precision.device

    def cache_source(self) -> CacheSource:
        """What this run's teacher cache is made from (a local teacher's run, built without its cache:
        the teacher's model, on the teacher's side of the data)."""
        live = self.teacher.inner if self.across else self.teacher   # teacher/across.AcrossTokenizers wraps it
        return cache_source(self.cfg, self.tokenizers, self.train_data, live, self.student)


def generation_setting(cfg: ExperimentConfig) -> str:
    """The setting that makes a run generate, named in its log and error lines."""
    train_cfg = cfg.train
    return ("train.on_policy_fraction" if train_cfg.on_policy_fraction > 0 else "train.seq_kd" if train_cfg.seq_kd
            else "eval.generation_samples")


def generates_in_training(cfg: ExperimentConfig) -> bool:
    return cfg.train.on_policy_fraction > 0 or cfg.train.seq_kd


def reads_cache(cfg: ExperimentConfig, need_teacher: bool, feature_pairs: list) -> bool:
    """Whether training reads the teacher cache: evaluation and on-policy batches keep the live
    teacher (exact val metrics; new sequences), feature distillation needs its hidden states, and
    under seq_kd no batch is the data's, so the cache could serve none."""
    train_cfg = cfg.train
    return need_teacher and not feature_pairs and not train_cfg.seq_kd \
        and (train_cfg.on_policy_fraction < 1 or train_cfg.on_policy_start > 0)


def build_run(cfg: ExperimentConfig, ddp: bool = False, node_teacher: Callable[[], RemoteTeacher] | None = None,
              cache: bool | None = None) -> Run:
    """Everything cfg's run needs, in dependency order (the module docstring lists it).

    ddp: join the torchrun process group (model/distributed.py); node_teacher: this node's served
    teacher, which only the search can reach (teacher/served.connect); cache: None opens the teacher
    cache when this run reads it, True whenever a local teacher's cache applies (the search's
    driver builds it before the trials; the memory probe reads it), False never.
    Raises ShapeRejected for a student shape that is no model, before anything is built."""
    train_cfg = cfg.train
    rank, world, device = setup_distributed(ddp, train_cfg.device)
    precision = resolve_precision(train_cfg.dtype, device)
    if rank == 0:
        log.info("precision: %s (device %s)", precision.reason, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)   # gpu_peak_gib: this run's own peak
    torch.manual_seed(train_cfg.seed)
    tokenizers = run_tokenizers(cfg)
    across.check_settings(cfg, tokenizers.across)
    tokenizer, train_data, val_data = load_data(cfg, tokenizers)
    pad_id = padding_id(tokenizer)
    student_shape.check_student(cfg, tokenizer)   # a searched shape that is no model: before any work
    # a served teacher stands in for a local one: this process never holds the teacher's weights
    # (student.init: teacher reads them once from teacher.path, a tensor at a time)
    remote = connect(cfg, len(tokenizers.of_teacher), node_teacher) if cfg.teacher else None
    lm, teacher_lm = build.make_models(cfg, tokenizer, precision, teacher_here=remote is None,
                                       teacher_tokenizer=tokenizers.teacher)
    student_params, embedding_params = student_shape.parameter_counts(lm)
    student_shape.check_budget(student_params, cfg.student.max_params)   # a student.path student, as loaded
    columns = build.check_models(tokenizer, lm, remote.teacher_rows if remote else teacher_lm, tokenizers.teacher)
    pairs = features.layer_map(train_cfg.feature_layers, lm.config.num_hidden_layers,
                               teacher_lm.config.num_hidden_layers) \
        if train_cfg.feature_weight > 0 and teacher_lm is not None else []
    projector = features.FeatureProjector(len(pairs), lm.config.hidden_size, teacher_lm.config.hidden_size).to(device) \
        if pairs else None
    student = ScoredLM(lm, [p[0] for p in pairs], projector)
    teacher = teacher_for(remote, teacher_lm, [p[1] for p in pairs], precision, columns)
    vocab = across.vocabularies(tokenizer, tokenizers.teacher, cfg.data.cache_dir) if tokenizers.across else None
    trained = student if world == 1 else torch.nn.parallel.DistributedDataParallel(
        student, device_ids=[device] if device.type == "cuda" else None)
    need_teacher = teacher is not None and (train_cfg.alpha < 1.0 or bool(pairs) or generates_in_training(cfg))
    generation = Generation(cfg, tokenizer, pad_id, [lm, teacher], generation_setting(cfg)) \
        if generates_in_training(cfg) or cfg.eval.generation_samples else None
    # opened before any resume: top_k auto measures against the starting student, as every trial does
    wanted = reads_cache(cfg, need_teacher, pairs) if cache is None else cache and teacher is not None and not pairs
    if wanted and remote is not None:   # the cache the search's driver built, if any (its key needs the weights)
        teacher = CacheReader(TeacherCache(remote.cache_dir), remote) if remote.cache_dir else remote
    elif wanted:
        teacher = reading_cache(cache_source(cfg, tokenizers, train_data, teacher, student))
    if vocab is not None:
        teacher = across.AcrossTokenizers(teacher, vocab)
    optimizer = torch.optim.AdamW(student.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                                  fused=device.type == "cuda")
    return Run(cfg, rank, world, precision, tokenizer, train_data, val_data, pad_id, lm, teacher, student,
               trained, need_teacher, generation, optimizer,
               torch.amp.GradScaler(device.type, enabled=precision.grad_scaler),
               {"feature_projector": projector} if projector is not None else {}, student_params, embedding_params,
               tokenizers)


def teacher_for(remote: RemoteTeacher | None, teacher_lm, feature_layers: list[int], precision,
                columns: int | None) -> Teacher | None:
    """The run's teacher before any cache: the served one (told the columns the divergence
    compares), the local model, or none."""
    if remote is not None:
        remote.columns = columns
        return remote
    return LiveTeacher(ScoredLM(teacher_lm, feature_layers), precision, columns) if teacher_lm is not None else None


def cache_source(cfg: ExperimentConfig, tokenizers: Tokenizers, train_data: TokenizedData, teacher: LiveTeacher,
                 student: ScoredLM) -> CacheSource:
    """What the local teacher's cache is made from: the teacher's tokenizer and side of the data."""
    return CacheSource(cfg, tokenizers.of_teacher, teacher_side(train_data), teacher, padding_id(tokenizers.of_teacher),
                       student, across=tokenizers.across)


def reading_cache(source: CacheSource) -> Teacher:
    """A local teacher reading its rows from the teacher cache where one applies (opened, or built
    first when missing), else the teacher itself."""
    rows, why = open_teacher_cache(source)
    if why is not None:
        log.info("teacher cache: %s", why)
    return CacheReader(rows, source.teacher) if rows is not None else source.teacher
