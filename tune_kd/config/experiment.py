"""Typed, frozen experiment configuration and its YAML loader.

`load_config(path, overrides)` turns an experiment YAML into an `ExperimentConfig`. Every problem
in the file is collected and reported at once as a `ConfigError` whose lines read
``file:line: dotted.key: what is wrong (allowed: ...)``, so a user fixes the whole file in one go.

The machinery lives beside it: typed_yaml.py (YAML -> the dataclasses below, by their types),
config/checks.py (checks across fields, the `parameters:` rules), config/stages.py (merging
`stages:`); the errors themselves in errors.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from tune_kd.config.checks import validate
from tune_kd.config.errors import ConfigError
from tune_kd.config.stages import expand_teacher_cache, stage_raws
from tune_kd.config.typed_yaml import Loader, Problems, build, deep_copy, key_lines, set_dotted

# ----------------------------------------------------------------------------------------------
# The schema. Field defaults are the defaults a YAML gets when it leaves a key out.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """A Llama-family architecture for a model built from scratch; vocab comes from the tokenizer.

    Keys left out come from the model's preset, else from build.DEFAULT_ARCH.
    """

    hidden_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None      # None: same as num_attention_heads
    head_dim: Optional[int] = None                 # per attention head; None: hidden_size / num_attention_heads
                                                   # (set apart, as Gemma and Qwen3 do, heads and width vary alone)
    intermediate_size: Optional[int] = None        # None: the seed's rule, 8/3 * hidden rounded up to 64
    max_position_embeddings: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None
    num_experts: Optional[int] = None              # MoE (the seed's use_moe): experts per layer; None: dense
    num_experts_per_tok: Optional[int] = None      # MoE: experts each token is routed to (default 2)
    router_aux_loss_coef: Optional[float] = None   # MoE: load-balancing loss weight (default 0.01)


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: a local Hugging Face directory, or a preset/architecture to build."""

    path: Optional[str] = None                     # local HF model dir (safetensors)
    preset: Optional[str] = None                   # one of build.PRESETS, e.g. minimind-student
    arch: Optional[ArchSpec] = None                # explicit architecture; overrides the preset's keys
    trust_remote_code: bool = False                # never on unless the YAML says so
    allow_pickle_weights: bool = False             # .bin/.pt weights: refused unless the YAML says so
    init: Optional[Literal["random", "teacher"]] = None   # student only; None/random: random weights; teacher:
                                                   # copied from the teacher's, narrowed (student_init.py)
    init_layers: Optional[Literal["every_kth", "first", "last"]] = None   # init teacher: which teacher layers
                                                   # the student's start from (None: every_kth)
    max_params: Optional[int] = None               # student only: a shape with more parameters is rejected before
                                                   # it trains (a searched shape: the trial reports REJECTED)
    tokenizer: Optional[str] = None                # this model's own tokenizer dir (default: its path's, else the
                                                   # teacher's); a student's that differs: distil across tokenizers


@dataclass(frozen=True)
class DataConfig:
    path: str = "results/demo/data/train.jsonl"
    val_path: Optional[str] = None                 # a separate validation file; else val_fraction
    val_fraction: float = 0.05
    max_seq_len: int = 512
    cache_dir: Optional[str] = None                # tokenized data and teacher outputs, shared by runs and
                                                   # trials; default <storage>/cache (results/cache), where every node sees it
    max_train_examples: Optional[int] = None       # train on a fixed random subset of this size
    format: Literal["auto", "conversations", "messages", "sharegpt"] = "auto"   # record layout (chat_formats.py)
    workers: int = 0                               # ingestion processes; 0: one per CPU core (1 for small files)
    system_turns: Literal["keep", "fold", "drop"] = "keep"   # fold: into the next user turn (templates without a
                                                   # system role, Gemma's); drop: removed (chat_formats.system_turns)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    batch_size: int = 32
    accumulation_steps: int = 1
    grad_clip: float = 1.0
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = "auto"                           # auto | cpu | cuda | cuda:N
    warmup_iters: int = 0
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    alpha: float = 0.5                             # CE weight: 1 = plain SFT, 0 = pure distillation
    temperature: float = 1.0                       # the KD temperature (at the start, with a schedule)
    temperature_schedule: Literal["constant", "linear", "cosine"] = "constant"
    final_temperature: Optional[float] = None      # where a linear/cosine schedule ends (required by them)
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd",  # across tokenizers also (kd/aligned.py):
                     "uld", "gold_hybrid", "pkl", "hkl"] = "forward_kl"
    jsd_beta: float = 0.5                          # jsd: teacher's weight in the mixture (0: forward KL, 1: reverse)
    skew: float = 0.1                              # skew_kl: KL(p || skew p + (1 - skew) q)
    feature_weight: float = 0.0                    # feature distillation's weight (0: off)
    feature_loss: Literal["mse", "cosine"] = "mse"
    feature_layers: Optional[list] = None          # [[student layer, teacher layer], ...]; default evenly spaced
    compile: Literal["auto", "on", "off"] = "auto"   # torch.compile; auto: on CUDA when it pays back (compiling.py)
    seed: int = 0
    num_workers: int = 0
    log_interval: int = 100                        # optimizer steps between log lines
    save_interval: int = 0                         # optimizer steps between resumable checkpoints; 0 = epoch ends only
    on_policy_fraction: float = 0.0                # share of batches the student answers itself (on_policy.py); 0: off
    on_policy_start: float = 0.0                   # share of training (optimizer steps) before the first on-policy
                                                   # batch: an off-policy warm-up (0.5: the second half may answer)
    generation_temperature: float = 1.0            # sampling temperature of on-policy replies (0: greedy)
    max_new_tokens: int = 64                       # longest generated reply (on-policy, seq_kd, val_gen_*)
    seq_kd: bool = False                           # off-policy batches learn the teacher's greedy replies, not the data's


@dataclass(frozen=True)
class EvalConfig:
    generation_samples: int = 0                    # validation prompts answered greedily per epoch for val_gen_*; 0: off


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "tune-kd"
    tensorboard: bool = True


@dataclass(frozen=True)
class MetricConfig:
    name: Literal["val_ce", "val_kl", "val_loss", "val_acc", "val_gen_acc", "val_gen_ce", "train_loss"] = "val_ce"
    goal: Literal["minimize", "maximize"] = "minimize"

    @property
    def mode(self) -> str:
        return "min" if self.goal == "minimize" else "max"


@dataclass(frozen=True)
class SearchConfig:
    algorithm: Literal["optuna", "random"] = "optuna"  # random: Ray's random sampling (a baseline)
    num_samples: int = 24                              # the replay's choice (docs/search.md, "Does the search search well?")
    max_concurrent: int | Literal["auto"] = "auto"     # auto: as many trials as the resources fit, or an int
    seed: int = 0
    evaluate_train_first: bool = True                  # the YAML's fixed train settings are trial 1
    max_failures: int = 2                              # retries of a crashing trial from its last checkpoint
    startup_trials: int | Literal["auto"] = "auto"     # random proposals before the sampler models: auto (from
                                                       # num_samples) or an int
    sampler: Literal["auto", "tpe", "gp"] = "auto"     # optuna's sampler: auto (samplers.sampler_choice: by the space),
                                                       # tpe, or gp (Gaussian process)
    warm_start: Optional[str] = None                   # results/<name> of an earlier search: its trials are given to
                                                       # the sampler first (search/warm_start.py)
    objectives: Optional[list] = None                  # [metric, student_params | gen_tokens_per_s]: a size/quality
                                                       # search (front.py); None: the metric alone
    within_percent: float = 5.0                        # two objectives: the report names the smallest student within
                                                       # this many percent of the best metric

    @property
    def size_objective(self) -> str | None:
        """The second of `objectives`, the student's size; None for a search of the metric alone."""
        return self.objectives[1] if self.objectives and len(self.objectives) > 1 else None


@dataclass(frozen=True)
class SchedulerConfig:
    type: Literal["asha", "none"] = "asha"
    grace_period: int = 1                              # epochs every trial gets before it can be stopped
    reduction_factor: int = 2
    size_bracket_ratio: float = 2.0                    # two objectives: ASHA compares a trial only with trials in its
                                                       # log-spaced size cell [r^k, r^(k+1)) (0: across all sizes)


@dataclass(frozen=True)
class ResourcesConfig:
    cpu_per_trial: float = 1.0                         # per worker when workers_per_trial > 1
    gpu_per_trial: int | float | Literal["auto"] = "auto"   # auto: a share that fits one trial's measured memory;
                                                            # 0 without GPUs
    workers_per_trial: int = 1                         # > 1: data-parallel trials through Ray Train's TorchTrainer


@dataclass(frozen=True)
class CheckpointConfig:
    keep_per_trial: int = 1                            # best checkpoints kept per trial, by the metric


@dataclass(frozen=True)
class TeacherCacheConfig:
    """The teacher-output cache (teacher/cache_store.py). In YAML also `teacher_cache: auto | on | off`."""
    mode: Literal["auto", "on", "off"] = "auto"        # auto: on when it can serve the run and fits max_gb
    top_k: int | Literal["auto"] = "auto"              # teacher logits kept per position (plus the tail's mass):
                                                       # an int, or auto: the smallest k measured within 1%
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"   # the kept logits' storage dtype
    max_gb: float = 20.0                               # auto: the largest cache it builds


@dataclass(frozen=True)
class TeacherServerConfig:
    """One teacher per node served to every trial there (teacher/served.py). In YAML also
    `teacher_server: auto | on | off`."""
    mode: Literal["auto", "on", "off"] = "auto"        # auto: when > 1 trial per node would run the teacher live
    url: Optional[str] = None                          # an OpenAI-compatible completions endpoint with prompt
                                                       # log-probs (vLLM) serves the teacher instead
    model: Optional[str] = None                        # url: the served model's name (default: the first listed)
    top_k: int = 20                                    # url: prompt log-probs asked per position (vLLM --max-logprobs)
    replicas: int = 1                                  # teacher copies per node (trials spread over them)
    gpus: float | Literal["auto"] = "auto"             # each copy's GPU share; auto: a whole GPU, 0 without GPUs
    cpus: float = 0.0                                  # CPUs each copy holds in Ray (its work replaces the trials')
    max_wait_ms: float = 10.0                          # how long the first request waits for others to batch with
    max_batch_tokens: int = 65536                      # tokens (padded) in one teacher forward


@dataclass(frozen=True)
class ControlsConfig:
    """Reference runs after the search, same epochs and seed as its trials (controls.py)."""
    plain_sft: bool = True                             # the best trial's settings with alpha = 1: no teacher
    minimind_defaults: bool = True                     # MiniMind's defaults: lr 5e-6, alpha 0, T 1 (old key: seed_defaults)
    seeds: int = 2                                     # the verdict's noise: the best config and plain SFT each
                                                       # re-trained on N more seeds (old key: seeds_for_best)
    best_off_policy: bool = True                       # the best config with on_policy_fraction 0 (when it used on-policy)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    embedded_demo: bool = False                    # build the offline demo (data, tokenizer, teacher) first
    tokenizer: Optional[str] = None                # default: the teacher's directory, else the student's
    teacher: Optional[ModelSpec] = None            # None only for plain SFT (train.alpha = 1)
    student: ModelSpec = field(default_factory=lambda: ModelSpec(preset="minimind-student"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parameters: dict = field(default_factory=dict)     # searched train.* keys (space.py)
    metric: MetricConfig = field(default_factory=MetricConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    controls: ControlsConfig = field(default_factory=ControlsConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    teacher_server: TeacherServerConfig = field(default_factory=TeacherServerConfig)
    # Progressive distillation (seed 10.4): each stage is a full experiment (these sections with the
    # stage's own overrides merged in), validated at load; stage k's teacher is stage k-1's export.
    stages: list = field(default_factory=list)

    def replace(self, **sections: Any) -> "ExperimentConfig":
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# YAML -> dataclasses, collecting every problem.
# ----------------------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                raw: dict | None = None, storage: str | Path | None = None) -> ExperimentConfig:
    """Load an experiment YAML (or a raw dict), apply dotted-key overrides, validate everything.
    storage: the results root (a search's --storage, default results); data.cache_dir defaults to
    <storage>/cache, so on a cluster every node finds the caches the driver built.

    Raises ConfigError listing every problem at once, each with file:line and dotted key.
    """
    source, lines = None, {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"{path}: no such config file (give the path of an experiment YAML)"])
        text = path.read_text(encoding="utf-8")
        source = str(path)
        try:
            node = yaml.compose(text, Loader=Loader)
            raw = yaml.load(text, Loader=Loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
        lines = key_lines(node) if node is not None else {}
    raw = {} if raw is None else raw
    problems = Problems(source, lines)
    if not isinstance(raw, dict):
        problems.add("", f"the file must be a mapping of sections, got {type(raw).__name__}")
        raise ConfigError(problems.items)
    raw = deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    stages = raw.pop("stages", None)
    expand_teacher_cache(raw)
    cfg = build(ExperimentConfig, raw, "", problems)
    validate(cfg, problems)  # on the defaults where a key failed above, so every problem shows at once
    if stages is not None:
        cfg = dataclasses.replace(cfg, stages=stage_raws(raw, stages, source, lines, problems, ExperimentConfig))
    if problems.items:
        raise ConfigError(problems.items)
    if cfg.data.cache_dir is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(Path(storage or "results") / "cache")))
    return cfg


def absolute_paths(cfg: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """The config with every relative path made absolute against `base` (default: the current
    directory), so trials that run in other working directories read the same files."""
    base = Path.cwd() if base is None else Path(base)
    fix = lambda p: None if p is None else str((base / p).resolve()) if not Path(p).is_absolute() else p  # noqa: E731
    models = {role: dataclasses.replace(spec, path=fix(spec.path), tokenizer=fix(spec.tokenizer)) if spec is not None
              else None
              for role, spec in (("teacher", cfg.teacher), ("student", cfg.student))}
    data = dataclasses.replace(cfg.data, path=fix(cfg.data.path), val_path=fix(cfg.data.val_path),
                               cache_dir=fix(cfg.data.cache_dir))
    search = dataclasses.replace(cfg.search, warm_start=fix(cfg.search.warm_start))
    return dataclasses.replace(cfg, tokenizer=fix(cfg.tokenizer), data=data, search=search, **models)


