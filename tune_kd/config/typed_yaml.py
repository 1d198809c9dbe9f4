"""YAML -> typed, frozen dataclasses, collecting every problem instead of stopping at the first.

Knows nothing of the experiment schema (config/experiment.py): a YAML loader that reads 5e-4 as a float and
the line of every dotted key (key_lines, key_location), Problems (each located as file:line: dotted.key), and
build/convert, which check a mapping against a dataclass's type hints (int, float, bool, str,
Literal, Optional, unions tried member by member, nested dataclasses, dict) and name unknown keys
with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tune_kd.config.errors import ConfigError


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads 5e-4 as a float (YAML 1.1 would make it a string)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def key_lines(node: yaml.Node, prefix: str = "", out: dict | None = None) -> dict[str, int]:
    """Map every dotted key of a composed YAML document to its 1-based line number."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            out[dotted] = key_node.start_mark.line + 1
            key_lines(value_node, dotted + ".", out)
    elif isinstance(node, yaml.SequenceNode):   # list items as stages.0.train..., for stages
        for index, item in enumerate(node.value):
            out[f"{prefix}{index}"] = item.start_mark.line + 1
            key_lines(item, f"{prefix}{index}.", out)
    return out


def key_location(path: str | Path | None, key: str) -> str:
    """`file:line` of dotted `key` in the YAML file at `path` (of its nearest enclosing key when the file
    leaves the key to its default; just the file when neither is there), for an error that names a
    key but is found after loading, when the config no longer carries lines (data.max_seq_len against
    the data). "" without a path (a config built from a dict)."""
    if path is None:
        return ""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return str(path)
    lines = key_lines(node) if node is not None else {}
    while key and key not in lines:
        key = key.rpartition(".")[0]
    return f"{path}:{lines[key]}" if key else str(path)


class Problems:
    """Accumulates problems, each located by dotted key (and file:line when known)."""

    def __init__(self, source: str | None, lines: dict[str, int]):
        self.source, self.lines, self.items = source, lines, []

    def add(self, key: str, message: str) -> None:
        where = ""
        if self.source:
            line = self.lines.get(key) or self.lines.get(key.rsplit(".", 1)[0])
            where = f"{self.source}:{line}: " if line else f"{self.source}: "
        self.items.append(f"{where}{key or '<top level>'}: {message}")


def convert(value: Any, tp: Any, key: str, problems: Problems) -> Any:
    """Check `value` against type hint `tp`; return the converted value (or None after a problem)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(options) == 1:
            return convert(value, options[0], key, problems)
        for option in options:   # the first member the value fits, in the order written
            trial = Problems(None, {})
            converted = convert(value, option, key, trial)
            if not trial.items:
                return converted
        # Fits none: kept as written, for the field's own check (validate), which says what the
        # field takes in its words and range, e.g. "must be auto or an integer >= 1".
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            problems.add(key, f"{value!r} is not allowed (allowed: {', '.join(map(str, allowed))})")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, problems)
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


def build(cls: type, raw: Any, prefix: str, problems: Problems) -> Any:
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
        converted = convert(value, hints[key], dotted, problems)
        if converted is not None or value is None:
            kwargs[key] = converted
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a None where a value is required
        problems.add(prefix, str(exc))
        return cls()


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {dotted}: '{part}' is not a mapping"])
    node[last] = value


def deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [deep_copy(v) for v in raw]
    return raw
