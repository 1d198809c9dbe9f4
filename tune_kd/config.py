"""Typed, frozen experiment configuration and its YAML loader.

`load_config(path, overrides)` turns an experiment YAML into an `ExperimentConfig`. Every problem
in the file is collected and reported at once as a `ConfigError` whose lines read
``file:line: dotted.key: what is wrong (allowed: ...)``, so a user fixes the whole file in one go.

`UserError` is the root of every error a user can cause (bad YAML, bad data line, missing file);
the CLIs print it as one line and exit with code 2.
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


class UserError(Exception):
    """An error the user can fix: printed as one line, exit code 2, no traceback unless --debug."""


class ConfigError(UserError):
    """One or more problems in an experiment config; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) if len(self.problems) == 1 else
                         f"{len(self.problems)} problems in the config:\n  " + "\n  ".join(self.problems))


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


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: a local Hugging Face directory, or a preset/architecture to build."""

    path: Optional[str] = None                     # local HF model dir (safetensors)
    preset: Optional[str] = None                   # one of models.PRESETS, e.g. minimind-student
    arch: Optional[ArchSpec] = None                # explicit architecture; overrides the preset's keys
    trust_remote_code: bool = False                # never on unless the YAML says so


@dataclass(frozen=True)
class DataConfig:
    path: str = "results/demo/data/train.jsonl"
    val_path: Optional[str] = None                 # a separate validation file; else val_fraction
    val_fraction: float = 0.05
    max_seq_len: int = 512
    cache_dir: str = "results/cache"               # tokenized data, shared by runs and trials


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
    temperature: float = 1.0
    kd_loss: Literal["forward_kl"] = "forward_kl"
    seed: int = 0
    num_workers: int = 0
    log_interval: int = 100                        # optimizer steps between log lines
    save_interval: int = 0                         # optimizer steps between resumable checkpoints; 0 = epoch ends only


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "tune-kd"
    tensorboard: bool = True


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    embedded_demo: bool = False                    # build the offline demo (data, tokenizer, teacher) first
    tokenizer: Optional[str] = None                # default: the teacher's directory, else the student's
    teacher: Optional[ModelSpec] = None            # None only for plain SFT (train.alpha = 1)
    student: ModelSpec = field(default_factory=lambda: ModelSpec(preset="minimind-student"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

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
    if t.learning_rate is not None and t.learning_rate <= 0:
        problems.add("train.learning_rate", f"must be > 0, got {t.learning_rate}")
    if t.grad_clip is not None and t.grad_clip < 0:
        problems.add("train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device or ""):
        problems.add("train.device", f"{t.device!r} is not a device (allowed: auto, cpu, cuda, cuda:N, mps)")
    d = cfg.data
    if d.val_path is None and d.val_fraction is not None and not 0.0 < d.val_fraction < 1.0:
        problems.add("data.val_fraction", f"must be in (0, 1) when data.val_path is not set, got {d.val_fraction}")
    if d.max_seq_len is not None and d.max_seq_len < 2:
        problems.add("data.max_seq_len", f"must be >= 2, got {d.max_seq_len}")
    for role in ("teacher", "student"):
        spec = getattr(cfg, role)
        if spec is None:
            continue
        if spec.path is None and spec.preset is None and spec.arch is None:
            problems.add(role, "needs one of path, preset or arch")
        if spec.path is not None and (spec.preset is not None or spec.arch is not None):
            problems.add(f"{role}.path", "a model comes from a path or is built from preset/arch, not both")
    if cfg.teacher is None and t.alpha is not None and t.alpha != 1.0:
        problems.add("teacher", f"is required unless train.alpha is 1 (plain SFT); alpha is {t.alpha}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                raw: dict | None = None) -> ExperimentConfig:
    """Load an experiment YAML (or a raw dict), apply dotted-key overrides, validate everything.

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
    cfg = _build(ExperimentConfig, raw, "", problems)
    validate(cfg, problems)  # on the defaults where a key failed above, so every problem shows at once
    if problems.items:
        raise ConfigError(problems.items)
    return cfg


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw
