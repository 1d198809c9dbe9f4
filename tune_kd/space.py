"""The YAML `parameters:` block -> Ray Tune search domains, and a sampled point -> a trial's config.

The syntax is W&B sweeps': each searched train key maps to one distribution,

    learning_rate: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-3}
    temperature:   {distribution: uniform, min: 1.0, max: 5.0}
    batch_size:    {distribution: int_uniform, min: 16, max: 64}      # inclusive
    grad_clip:     {distribution: q_uniform, min: 0.5, max: 2.0, q: 0.5}
    kd_loss:       {values: [forward_kl]}                             # categorical
    warmup_iters:  {value: 20}                                        # constant

Validation (ranges, types, every reachable value being a valid setting) lives in config_checks.py,
with the table of distributions and their keys (DISTRIBUTIONS), so a bad file fails before Ray
starts; this module only translates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tune_kd.config import ExperimentConfig
from tune_kd.config_checks import DISTRIBUTIONS


# config_checks.DISTRIBUTIONS' names (the one table of distributions and their keys) -> the Ray Tune
# domain of a spec with those keys
_DOMAINS = {
    "log_uniform_values": lambda tune, spec: tune.loguniform(spec["min"], spec["max"]),
    "uniform": lambda tune, spec: tune.uniform(spec["min"], spec["max"]),
    "int_uniform": lambda tune, spec: tune.randint(spec["min"], spec["max"] + 1),   # W&B's max is inclusive, randint's not
    "q_uniform": lambda tune, spec: tune.quniform(spec["min"], spec["max"], spec["q"]),
    "values": lambda tune, spec: tune.choice(spec["values"]),
    "value": lambda tune, spec: spec["value"],
}
assert _DOMAINS.keys() == DISTRIBUTIONS.keys(), "space.py translates every distribution config_checks accepts"


def tune_domains(cfg: ExperimentConfig) -> dict[str, Any]:
    """param_space for ray.tune.Tuner: name -> domain (or a constant for `value`)."""
    from ray import tune

    return {name: _DOMAINS[spec.get("distribution", "values" if "values" in spec else "value")](tune, spec)
            for name, spec in cfg.parameters.items()}


def fixed_point(cfg: ExperimentConfig) -> dict[str, Any]:
    """The YAML's own train settings for every searched key (evaluated first, as a baseline)."""
    point = {}
    for name, spec in cfg.parameters.items():
        value = getattr(cfg.train, name)
        if "values" in spec and value not in spec["values"]:
            value = spec["values"][0]
        elif "min" in spec:
            value = min(max(value, spec["min"]), spec["max"])
        elif "value" in spec:
            continue
        point[name] = value
    return point


CONTROL_KEY = "control"   # a control arm's Tune config: {"control": {"arm": name, train key: value, ...}}


def apply_point(cfg: ExperimentConfig, point: dict[str, Any]) -> ExperimentConfig:
    """The trial's config: the sampled values replace the matching train settings. A control
    arm's config (controls.py) carries its point under CONTROL_KEY, with the arm's name."""
    if CONTROL_KEY in point:
        point = {k: v for k, v in point[CONTROL_KEY].items() if k != "arm"}
    train_keys = {f.name for f in dataclasses.fields(cfg.train)}
    unknown = set(point) - train_keys
    if unknown:
        raise KeyError(f"sampled keys {sorted(unknown)} are not train settings")
    typed = {k: int(v) if isinstance(getattr(cfg.train, k), int) and not isinstance(getattr(cfg.train, k), bool)
             else v for k, v in point.items()}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **typed))
