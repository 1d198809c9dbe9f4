"""The `stages:` list of a progressive-distillation YAML, merged into complete experiments at load.

Each stage is the file's sections with the stage's changes: STAGE_MERGED sections merged key by
key, STAGE_REPLACED ones replaced whole; stage k > 0 distils the previous stage's export (a
placeholder teacher path until stages.py runs it). Every stage is validated like a top-level file,
its problems located under stages.<index>. Also the `teacher_cache: auto | on | off` short form,
expanded for the file and for each stage alike.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from tune_kd.config.checks import validate
from tune_kd.config.typed_yaml import Problems, build, deep_copy


def expand_teacher_cache(raw: dict) -> None:
    """`teacher_cache: auto | on | off` (and `teacher_server: ...`) is short for {mode: ...}; YAML 1.1 reads a
    bare on/off as a bool.
    Also reads old key names: `controls.seed_defaults` is `controls.minimind_defaults` (MiniMind's
    defaults arm; "seed" meant MiniMind's script), `controls.seeds_for_best` is `controls.seeds` (it
    re-trained the best config alone; plain SFT is re-trained on the same seeds now)."""
    for section in ("teacher_cache", "teacher_server"):
        value = raw.get(section)
        if isinstance(value, bool):
            raw[section] = {"mode": "on" if value else "off"}
        elif isinstance(value, str):
            raw[section] = {"mode": value}
    for section, renamed in OLD_KEYS.items():
        values = raw.get(section)
        for old, new in renamed.items():
            if isinstance(values, dict) and old in values and new not in values:
                values[new] = values.pop(old)


# section -> {old key: today's key}: YAMLs written before a rename still read
OLD_KEYS = {"controls": {"seed_defaults": "minimind_defaults", "seeds_for_best": "seeds"}}


STAGE_MERGED = ("data", "train", "logging", "metric", "search", "scheduler", "resources", "checkpoint", "controls",
                "teacher_cache", "teacher_server")
STAGE_REPLACED = ("tokenizer", "teacher", "student", "parameters")
PREVIOUS_STAGE_EXPORT = "<the previous stage's exported best student>"


def stage_raws(base: dict, stages: Any, source, lines: dict, problems: Problems, schema: type) -> list[dict]:
    """Each stage's complete raw config (base sections, the stage's merged or replacing them),
    validated like a top-level file (built as `schema`, experiment.ExperimentConfig); stage k > 0 gets
    a placeholder teacher path, set at run time."""
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
        merged = deep_copy(base)
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
                expand_teacher_cache(short)
                value = short[section]
            if section in STAGE_MERGED and isinstance(value, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **value}
            else:
                merged[section] = value
        merged["name"] = name
        if index > 0:
            merged["teacher"] = {"path": PREVIOUS_STAGE_EXPORT}
        prefix = f"{key}."
        stage_problems = Problems(source, {k[len(prefix):]: v for k, v in lines.items() if k.startswith(prefix)})
        expand_teacher_cache(merged)
        stage_cfg = build(schema, merged, "", stage_problems)
        validate(stage_cfg, stage_problems)
        problems.items += [item.replace(": ", f": {prefix}", 1) if source else f"{prefix}{item}"
                           for item in stage_problems.items]
        out.append(merged)
    return out
