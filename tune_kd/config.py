"""Typed, frozen experiment configuration and its YAML loader.

`load_config(path, overrides)` turns an experiment YAML into an `ExperimentConfig`. Every problem
in the file is collected and reported at once as a `ConfigError` whose lines read
``file:line: dotted.key: what is wrong (allowed: ...)``, so a user fixes the whole file in one go.

The errors themselves live in errors.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from tune_kd.errors import ConfigError, UserError  # noqa: F401  (UserError: re-exported for old imports)

# ----------------------------------------------------------------------------------------------
# The schema. Field defaults are the defaults a YAML gets when it leaves a key out.
# ----------------------------------------------------------------------------------------------

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ArchSpec:
    """A Llama-family architecture for a model built from scratch; vocab comes from the tokenizer.

    Keys left out come from the model's preset, else from models.DEFAULT_ARCH.
    """

    hidden_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None      # None: same as num_attention_heads
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
    preset: Optional[str] = None                   # one of models.PRESETS, e.g. minimind-student
    arch: Optional[ArchSpec] = None                # explicit architecture; overrides the preset's keys
    trust_remote_code: bool = False                # never on unless the YAML says so
    allow_pickle_weights: bool = False             # .bin/.pt weights: refused unless the YAML says so


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
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"] = "forward_kl"
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
    num_samples: int = 16
    max_concurrent: Any = "auto"                       # auto: as many trials as the resources fit, or an int
    seed: int = 0
    evaluate_train_first: bool = True                  # the YAML's fixed train settings are trial 1
    max_failures: int = 2                              # retries of a crashing trial from its last checkpoint
    startup_trials: Any = "auto"                       # random proposals before TPE models: auto (from num_samples) or an int


@dataclass(frozen=True)
class SchedulerConfig:
    type: Literal["asha", "none"] = "asha"
    grace_period: int = 1                              # epochs every trial gets before it can be stopped
    reduction_factor: int = 2


@dataclass(frozen=True)
class ResourcesConfig:
    cpu_per_trial: float = 1.0                         # per worker when workers_per_trial > 1
    gpu_per_trial: Any = "auto"                        # auto: a share that fits one trial's measured memory; 0 without GPUs
    workers_per_trial: int = 1                         # > 1: data-parallel trials through Ray Train's TorchTrainer


@dataclass(frozen=True)
class CheckpointConfig:
    keep_per_trial: int = 1                            # best checkpoints kept per trial, by the metric


@dataclass(frozen=True)
class TeacherCacheConfig:
    """The teacher-output cache (teacher_cache.py). In YAML also `teacher_cache: auto | on | off`."""
    mode: Literal["auto", "on", "off"] = "auto"        # auto: on when it can serve the run and fits max_gb
    top_k: Any = "auto"                                # teacher logits kept per position (plus the tail's mass):
                                                       # an int, or auto: the smallest k measured within 1%
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"   # the kept logits' storage dtype
    max_gb: float = 20.0                               # auto: the largest cache it builds


@dataclass(frozen=True)
class ControlsConfig:
    """Reference runs after the search, same epochs and seed as its trials (controls.py)."""
    plain_sft: bool = True                             # the best trial's settings with alpha = 1: no teacher
    seed_defaults: bool = True                         # MiniMind's defaults: lr 5e-6, alpha 0, T 1
    seeds_for_best: int = 0                            # re-train the best config with N more seeds
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

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 5e-4 as a float (YAML 1.1 would make it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _key_lines(node: yaml.Node, prefix: str = "", out: dict | None = None) -> dict[str, int]:
    """Map every dotted key of a composed YAML document to its 1-based line number."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            out[dotted] = key_node.start_mark.line + 1
            _key_lines(value_node, dotted + ".", out)
    elif isinstance(node, yaml.SequenceNode):   # list items as stages.0.train..., for stages
        for index, item in enumerate(node.value):
            out[f"{prefix}{index}"] = item.start_mark.line + 1
            _key_lines(item, f"{prefix}{index}.", out)
    return out


class _Problems:
    """Accumulates problems, each located by dotted key (and file:line when known)."""

    def __init__(self, source: str | None, lines: dict[str, int]):
        self.source, self.lines, self.items = source, lines, []

    def add(self, key: str, message: str) -> None:
        where = ""
        if self.source:
            line = self.lines.get(key) or self.lines.get(key.rsplit(".", 1)[0])
            where = f"{self.source}:{line}: " if line else f"{self.source}: "
        self.items.append(f"{where}{key or '<top level>'}: {message}")


def _type_name(tp: Any) -> str:
    if tp in (int, float, str, bool):
        return tp.__name__
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, problems: _Problems) -> Any:
    """Check `value` against type hint `tp`; return the converted value (or None after a problem)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, options[0], key, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            problems.add(key, f"{value!r} is not allowed (allowed: {', '.join(map(str, allowed))})")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.add(key, f"expected a mapping, got {type(value).__name__}")
            return {}
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.add(key, f"expected a number, got {value!r}")
            return None
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(key, f"expected an integer, got {value!r}")
            return None
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.add(key, f"expected true or false, got {value!r}")
            return None
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.add(key, f"expected a string, got {value!r}")
            return None
        return value
    return value


def _build(cls: type, raw: Any, prefix: str, problems: _Problems) -> Any:
    """Build dataclass `cls` from mapping `raw`, reporting unknown keys with a suggestion."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(prefix, f"expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.add(dotted, f"unknown key; {hint}(allowed: {', '.join(names)})")
            continue
        converted = _convert(value, hints[key], dotted, problems)
        if converted is not None or value is None:
            kwargs[key] = converted
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a None where a value is required
        problems.add(prefix, str(exc))
        return cls()


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {dotted}: '{part}' is not a mapping"])
    node[last] = value


def validate(cfg: ExperimentConfig, problems: _Problems) -> None:
    """Checks across fields: ranges and combinations that the types alone cannot express."""
    validate_fields(cfg, problems)
    validate_search(cfg, problems)


def validate_fields(cfg: ExperimentConfig, problems: _Problems) -> None:
    """Ranges of the train/data/model settings (also applied to every searched value)."""
    t = cfg.train
    positive_ints = {"epochs": t.epochs, "batch_size": t.batch_size,
                     "accumulation_steps": t.accumulation_steps, "log_interval": t.log_interval}
    for name, value in positive_ints.items():
        if value is not None and value < 1:
            problems.add(f"train.{name}", f"must be >= 1, got {value}")
    for name in ("warmup_iters", "save_interval", "num_workers"):
        if getattr(t, name) is not None and getattr(t, name) < 0:
            problems.add(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    if t.alpha is not None and not 0.0 <= t.alpha <= 1.0:
        problems.add("train.alpha", f"must be in [0, 1] (the CE weight), got {t.alpha}")
    if t.temperature is not None and t.temperature <= 0:
        problems.add("train.temperature", f"must be > 0, got {t.temperature}")
    if t.final_temperature is not None and t.final_temperature <= 0:
        problems.add("train.final_temperature", f"must be > 0, got {t.final_temperature}")
    if (t.temperature_schedule in ("linear", "cosine") and t.final_temperature is None
            and "final_temperature" not in cfg.parameters):
        problems.add("train.final_temperature", f"is required by temperature_schedule: {t.temperature_schedule} "
                     "(where the temperature ends)")
    if t.feature_weight is not None and t.feature_weight < 0:
        problems.add("train.feature_weight", f"must be >= 0 (0 turns feature distillation off), got {t.feature_weight}")
    if t.feature_layers is not None and not (
            isinstance(t.feature_layers, list) and t.feature_layers
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in t.feature_layers)):
        problems.add("train.feature_layers", "expected a list of [student layer, teacher layer] integer pairs, "
                     "e.g. [[1, 2], [2, 4]]")
    for name in ("jsd_beta", "skew", "on_policy_fraction"):
        if getattr(t, name) is not None and not 0.0 <= getattr(t, name) <= 1.0:
            problems.add(f"train.{name}", f"must be in [0, 1], got {getattr(t, name)}")
    if t.generation_temperature is not None and t.generation_temperature < 0:
        problems.add("train.generation_temperature", f"must be >= 0 (0: greedy), got {t.generation_temperature}")
    if t.max_new_tokens is not None and t.max_new_tokens < 1:
        problems.add("train.max_new_tokens", f"must be >= 1, got {t.max_new_tokens}")
    if cfg.eval.generation_samples < 0:
        problems.add("eval.generation_samples", f"must be >= 0 (0: no generation metrics), got {cfg.eval.generation_samples}")
    if cfg.metric.name.startswith("val_gen_") and cfg.eval.generation_samples < 1:
        problems.add("eval.generation_samples", f"must be >= 1 when metric.name is {cfg.metric.name} (how many "
                     "validation prompts the student answers each epoch), e.g. 200")
    if cfg.teacher is None and cfg.metric.name == "val_gen_ce":
        problems.add("metric.name", "val_gen_ce is the teacher's CE on the student's replies: it needs a teacher")
    if t.learning_rate is not None and t.learning_rate <= 0:
        problems.add("train.learning_rate", f"must be > 0, got {t.learning_rate}")
    if t.grad_clip is not None and t.grad_clip < 0:
        problems.add("train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device or ""):
        problems.add("train.device", f"{t.device!r} is not a device (allowed: auto, cpu, cuda, cuda:N, mps)")
    d = cfg.data
    if d.val_path is None and d.val_fraction is not None and not 0.0 < d.val_fraction < 1.0:
        problems.add("data.val_fraction", f"must be in (0, 1) when data.val_path is not set, got {d.val_fraction}")
    if d.max_train_examples is not None and d.max_train_examples < 1:
        problems.add("data.max_train_examples", f"must be >= 1 (or left out for all), got {d.max_train_examples}")
    if d.max_seq_len is not None and d.max_seq_len < 2:
        problems.add("data.max_seq_len", f"must be >= 2, got {d.max_seq_len}")
    if d.workers < 0:
        problems.add("data.workers", f"must be >= 0 (0: one per CPU core), got {d.workers}")
    for role in ("teacher", "student"):
        spec = getattr(cfg, role)
        if spec is None:
            continue
        if spec.path is None and spec.preset is None and spec.arch is None:
            problems.add(role, "needs one of path, preset or arch")
        if spec.path is not None and (spec.preset is not None or spec.arch is not None):
            problems.add(f"{role}.path", "a model comes from a path or is built from preset/arch, not both")
    if cfg.teacher is None and (t.on_policy_fraction or t.seq_kd):
        problems.add("train.on_policy_fraction" if t.on_policy_fraction else "train.seq_kd",
                     "on-policy and sequence-level distillation need a teacher")
    if cfg.teacher is None and t.feature_weight:
        problems.add("train.feature_weight", "feature distillation needs a teacher")
    if cfg.teacher is None and t.alpha is not None and t.alpha != 1.0:
        problems.add("teacher", f"is required unless train.alpha is 1 (plain SFT); alpha is {t.alpha}")


def validate_search(cfg: ExperimentConfig, problems: _Problems) -> None:
    """The search sections: sample counts, scheduler against the epoch budget, resources."""
    s, sch, r = cfg.search, cfg.scheduler, cfg.resources
    if s.num_samples < 1:
        problems.add("search.num_samples", f"must be >= 1, got {s.num_samples}")
    if s.max_concurrent != "auto" and (isinstance(s.max_concurrent, bool) or not isinstance(s.max_concurrent, int)
                                       or s.max_concurrent < 1):
        problems.add("search.max_concurrent", f"must be auto or an integer >= 1, got {s.max_concurrent!r}")
    if s.max_failures < 0:
        problems.add("search.max_failures", f"must be >= 0, got {s.max_failures}")
    if s.startup_trials != "auto" and (isinstance(s.startup_trials, bool) or not isinstance(s.startup_trials, int)
                                       or s.startup_trials < 1):
        problems.add("search.startup_trials", f"must be auto or an integer >= 1, got {s.startup_trials!r}")
    if sch.type == "asha":
        if sch.grace_period < 1:
            problems.add("scheduler.grace_period", f"must be >= 1 epoch, got {sch.grace_period}")
        elif sch.grace_period > cfg.train.epochs:
            problems.add("scheduler.grace_period", f"{sch.grace_period} is past train.epochs ({cfg.train.epochs}): "
                         "no trial could ever be stopped early (lower it or raise train.epochs)")
        if sch.reduction_factor < 2:
            problems.add("scheduler.reduction_factor", f"must be >= 2, got {sch.reduction_factor}")
    if r.workers_per_trial < 1:
        problems.add("resources.workers_per_trial", f"must be >= 1, got {r.workers_per_trial}")
    if r.cpu_per_trial <= 0:
        problems.add("resources.cpu_per_trial", f"must be > 0, got {r.cpu_per_trial}")
    gpu = r.gpu_per_trial
    if gpu != "auto" and (isinstance(gpu, bool) or not isinstance(gpu, (int, float)) or gpu < 0):
        problems.add("resources.gpu_per_trial", f"must be auto or a number >= 0 (0.25 shares a GPU by 4), got {gpu!r}")
    elif isinstance(gpu, (int, float)) and gpu > 1 and gpu != int(gpu):
        problems.add("resources.gpu_per_trial", f"above 1 it must be a whole number of GPUs, got {gpu}")
    elif isinstance(gpu, (int, float)) and 0 < gpu < 1 and r.workers_per_trial > 1:
        # Ray would pack two ranks of one trial onto one GPU, and NCCL refuses a communicator like that
        problems.add("resources.gpu_per_trial", f"{gpu} with workers_per_trial {r.workers_per_trial} can put two ranks "
                     "of one data-parallel trial on one GPU, which NCCL refuses: use 1 (a GPU per worker), or "
                     "workers_per_trial: 1 to share GPUs between trials")
    cache = cfg.teacher_cache
    if cache.top_k != "auto" and (isinstance(cache.top_k, bool) or not isinstance(cache.top_k, int)
                                  or cache.top_k < 1):
        problems.add("teacher_cache.top_k", f"must be auto or an integer >= 1, got {cache.top_k!r}")
    if cache.max_gb <= 0:
        problems.add("teacher_cache.max_gb", f"must be > 0, got {cache.max_gb}")
    if cache.mode == "on" and (cfg.train.feature_weight or "feature_weight" in cfg.parameters):
        problems.add("teacher_cache.mode", "on cannot serve feature distillation (the cache holds logits, not hidden "
                                           "states): use auto or off, or set train.feature_weight to 0")
    if cfg.controls.seeds_for_best < 0:
        problems.add("controls.seeds_for_best", f"must be >= 0, got {cfg.controls.seeds_for_best}")
    if cfg.checkpoint.keep_per_trial < 1:
        problems.add("checkpoint.keep_per_trial", f"must be >= 1, got {cfg.checkpoint.keep_per_trial}")
    for name, spec in cfg.parameters.items():
        _check_parameter(cfg, str(name), spec, problems)


# distribution -> its keys (W&B sweep syntax); min/max are inclusive
DISTRIBUTIONS = {"log_uniform_values": ("min", "max"), "uniform": ("min", "max"), "int_uniform": ("min", "max"),
                 "q_uniform": ("min", "max", "q"), "values": ("values",), "value": ("value",)}
# train.* keys a search may vary; the rest fix the budget (epochs) or the machinery
SEARCHABLE = ("learning_rate", "temperature", "alpha", "weight_decay", "warmup_iters", "batch_size",
              "accumulation_steps", "grad_clip", "kd_loss", "final_temperature", "temperature_schedule",
              "jsd_beta", "skew", "feature_weight", "on_policy_fraction", "generation_temperature", "seq_kd")


def parameter_candidates(spec: dict) -> dict[str, Any]:
    """The extreme or listed values a parameter can take, by the key they come from."""
    if "values" in spec:
        return {f"values[{i}]": v for i, v in enumerate(spec["values"])}
    if "value" in spec:
        return {"value": spec["value"]}
    return {"min": spec.get("min"), "max": spec.get("max")}


def _check_parameter(cfg: ExperimentConfig, name: str, spec: Any, problems: _Problems) -> None:
    key = f"parameters.{name}"
    if name not in SEARCHABLE:
        close = difflib.get_close_matches(name, SEARCHABLE, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        problems.add(key, f"is not a searchable train key; {hint}(allowed: {', '.join(SEARCHABLE)})")
        return
    if not isinstance(spec, dict):
        problems.add(key, "expected a mapping like {distribution: uniform, min: 0.0, max: 1.0}")
        return
    dist = spec.get("distribution", "values" if "values" in spec else "value" if "value" in spec else None)
    if dist not in DISTRIBUTIONS:
        problems.add(f"{key}.distribution", f"{dist!r} is not a distribution (allowed: {', '.join(DISTRIBUTIONS)})")
        return
    wanted = DISTRIBUTIONS[dist]
    problems_before = len(problems.items)
    for extra in sorted(set(spec) - set(wanted) - {"distribution"}):
        problems.add(f"{key}.{extra}", f"is not a key of {dist} (allowed: {', '.join(wanted)})")
    for missing in [k for k in wanted if k not in spec]:
        problems.add(f"{key}.{missing}", f"is required by {dist}")
    if any(k not in spec for k in wanted):
        return
    if dist == "values" and (not isinstance(spec["values"], list) or not spec["values"]):
        problems.add(f"{key}.values", "must be a non-empty list")
        return
    if "min" in wanted:
        lo, hi = spec["min"], spec["max"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
        if not numbers:
            problems.add(key, f"min and max must be numbers, got {lo!r} and {hi!r}")
            return
        if lo >= hi:
            problems.add(f"{key}.min", f"min ({lo}) must be below max ({hi})")
        if dist == "log_uniform_values" and lo <= 0:
            problems.add(f"{key}.min", f"a log range must stay above 0, got min {lo}")
        if dist == "int_uniform" and not (isinstance(lo, int) and isinstance(hi, int)):
            problems.add(key, f"int_uniform needs integer min and max, got {lo!r} and {hi!r}")
        if dist == "q_uniform" and not (isinstance(spec["q"], (int, float)) and spec["q"] > 0):
            problems.add(f"{key}.q", f"must be a number > 0, got {spec['q']!r}")
    hint = typing.get_type_hints(TrainConfig)[name]
    if hint is int and dist in ("uniform", "log_uniform_values", "q_uniform"):
        problems.add(f"{key}.distribution", f"train.{name} is an integer: use int_uniform or values, not {dist}")
        return
    if len(problems.items) > problems_before:
        return  # the range itself is broken; its end points would only repeat that
    # Every value the search can reach must itself be a valid train setting.
    for where, value in parameter_candidates(spec).items():
        local = _Problems(None, {})
        converted = _convert(value, hint, f"train.{name}", local)
        if not local.items:
            trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{name: converted}))
            validate_fields(trial, local)
        for item in local.items:
            if item.startswith(f"train.{name}:"):
                problems.add(f"{key}.{where}", item.split(": ", 1)[1])


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
            node = yaml.compose(text, Loader=_Loader)
            raw = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
        lines = _key_lines(node) if node is not None else {}
    raw = {} if raw is None else raw
    problems = _Problems(source, lines)
    if not isinstance(raw, dict):
        problems.add("", f"the file must be a mapping of sections, got {type(raw).__name__}")
        raise ConfigError(problems.items)
    raw = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    stages = raw.pop("stages", None)
    _expand_teacher_cache(raw)
    cfg = _build(ExperimentConfig, raw, "", problems)
    validate(cfg, problems)  # on the defaults where a key failed above, so every problem shows at once
    if stages is not None:
        cfg = dataclasses.replace(cfg, stages=_stage_raws(raw, stages, source, lines, problems))
    if problems.items:
        raise ConfigError(problems.items)
    if cfg.data.cache_dir is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(Path(storage or "results") / "cache")))
    return cfg


def _expand_teacher_cache(raw: dict) -> None:
    """`teacher_cache: auto | on | off` is short for {mode: ...}; YAML 1.1 reads a bare on/off as a bool."""
    value = raw.get("teacher_cache")
    if isinstance(value, bool):
        raw["teacher_cache"] = {"mode": "on" if value else "off"}
    elif isinstance(value, str):
        raw["teacher_cache"] = {"mode": value}


STAGE_MERGED = ("data", "train", "logging", "metric", "search", "scheduler", "resources", "checkpoint", "controls",
                "teacher_cache")
STAGE_REPLACED = ("tokenizer", "teacher", "student", "parameters")
PREVIOUS_STAGE_EXPORT = "<the previous stage's exported best student>"


def _stage_raws(base: dict, stages: Any, source, lines: dict, problems: _Problems) -> list[dict]:
    """Each stage's complete raw config (base sections, the stage's merged or replacing them),
    validated like a top-level file; stage k > 0 gets a placeholder teacher path, set at run time."""
    if not isinstance(stages, list) or not stages:
        problems.add("stages", "expected a non-empty list of stages, e.g. [{name: medium, student: {...}}, ...]")
        return []
    out, names = [], set()
    for index, stage in enumerate(stages):
        key = f"stages.{index}"
        if not isinstance(stage, dict):
            problems.add(key, "expected a mapping with a name and the sections it changes")
            continue
        name = stage.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in names:
            problems.add(f"{key}.name", f"needs a unique name of letters, digits, '.', '_', '-', got {name!r}")
        names.add(name)
        merged = _deep_copy(base)
        for section, value in stage.items():
            if section == "name":
                continue
            if section not in STAGE_MERGED + STAGE_REPLACED:
                close = difflib.get_close_matches(section, STAGE_MERGED + STAGE_REPLACED, n=1)
                problems.add(f"{key}.{section}", "is not a section a stage can change"
                             + (f"; did you mean '{close[0]}'?" if close else ""))
                continue
            if section == "teacher" and index > 0:
                problems.add(f"{key}.teacher", "only the first stage names a teacher: each later stage distils the "
                                               "previous stage's best student")
                continue
            if section == "teacher_cache":   # the short form, merged like the long one
                short = {section: value}
                _expand_teacher_cache(short)
                value = short[section]
            if section in STAGE_MERGED and isinstance(value, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **value}
            else:
                merged[section] = value
        merged["name"] = name
        if index > 0:
            merged["teacher"] = {"path": PREVIOUS_STAGE_EXPORT}
        prefix = f"{key}."
        stage_problems = _Problems(source, {k[len(prefix):]: v for k, v in lines.items() if k.startswith(prefix)})
        _expand_teacher_cache(merged)
        stage_cfg = _build(ExperimentConfig, merged, "", stage_problems)
        validate(stage_cfg, stage_problems)
        problems.items += [item.replace(": ", f": {prefix}", 1) if source else f"{prefix}{item}"
                           for item in stage_problems.items]
        out.append(merged)
    return out


def absolute_paths(cfg: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """The config with every relative path made absolute against `base` (default: the current
    directory), so trials that run in other working directories read the same files."""
    base = Path.cwd() if base is None else Path(base)
    fix = lambda p: None if p is None else str((base / p).resolve()) if not Path(p).is_absolute() else p  # noqa: E731
    models = {role: dataclasses.replace(spec, path=fix(spec.path)) if spec is not None else None
              for role, spec in (("teacher", cfg.teacher), ("student", cfg.student))}
    data = dataclasses.replace(cfg.data, path=fix(cfg.data.path), val_path=fix(cfg.data.val_path),
                               cache_dir=fix(cfg.data.cache_dir))
    return dataclasses.replace(cfg, tokenizer=fix(cfg.tokenizer), data=data, **models)


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw
