"""The YAML `parameters:` block -> Ray Tune search domains, and a sampled point -> a trial's config.

The syntax is W&B sweeps': each searched train key maps to one distribution,

    learning_rate: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-3}
    temperature:   {distribution: uniform, min: 1.0, max: 5.0}
    batch_size:    {distribution: int_uniform, min: 16, max: 64}      # inclusive
    grad_clip:     {distribution: q_uniform, min: 0.5, max: 2.0, q: 0.5}
    kd_loss:       {values: [forward_kl]}                             # categorical
    warmup_iters:  {value: 20}                                        # constant

Validation (ranges, types, every reachable value being a valid setting) lives in config/checks.py,
with the table of distributions and their keys (DISTRIBUTIONS), so a bad file fails before Ray
starts; this module only translates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tune_kd.config.checks import DISTRIBUTIONS, with_searched
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.results.arms import CONTROL_KEY

# checks.DISTRIBUTIONS' names (the one table of distributions and their keys) -> the Ray Tune
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
        value = yaml_value(cfg, name)
        if "values" in spec and value not in spec["values"]:
            value = spec["values"][0]
        elif "min" in spec:
            value = min(max(value, spec["min"]), spec["max"])
        elif "value" in spec:
            continue
        point[name] = value
    return point


def smallest_point(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """fixed_point with every searched student.arch key at its smallest value: the smallest student the
    space holds, trained with the YAML's settings; None when the shape is not searched."""
    shape = {name: spec for name, spec in cfg.parameters.items()
             if name.startswith("student.arch.") and "value" not in spec}
    if not shape:
        return None
    point = {**fixed_point(cfg), **{name: min(spec["values"]) if "values" in spec else spec["min"]
                                    for name, spec in shape.items()}}
    from tune_kd.config.errors import UserError
    from tune_kd.model.build import architecture
    from tune_kd.model.student_shape import shape_problem

    try:   # each key at its minimum need not make a model together (heads 6 over kv heads 4): then none
        return None if shape_problem(architecture(apply_point(cfg, point).student, "student")) else point
    except UserError:
        return None


def yaml_value(cfg: ExperimentConfig, name: str):
    """The YAML's own setting of a searchable key: train.<name>, or the student's shape and start
    (student.arch.<key> as the student is built: its preset's or the default's when left out)."""
    if not name.startswith("student."):
        return getattr(cfg.train, name)
    if name.startswith("student.arch."):
        from tune_kd.model.build import architecture

        return architecture(cfg.student, "student").get(name.split(".")[-1])
    value = getattr(cfg.student, name.split(".")[-1])
    return value if value is not None else {"student.init": "random", "student.init_layers": "every_kth"}[name]



def apply_point(cfg: ExperimentConfig, point: dict[str, Any]) -> ExperimentConfig:
    """The trial's config: the sampled values replace the matching train settings. A control
    arm's config (controls.py) carries its point under CONTROL_KEY, with the arm's name."""
    if CONTROL_KEY in point:
        point = {k: v for k, v in point[CONTROL_KEY].items() if k != "arm"}
    train_keys = {f.name for f in dataclasses.fields(cfg.train)}
    unknown = {k for k in point if k not in train_keys and not k.startswith("student.")}
    if unknown:
        raise KeyError(f"sampled keys {sorted(unknown)} are not train settings")
    typed = {k: int(v) if isinstance(getattr(cfg.train, k), int) and not isinstance(getattr(cfg.train, k), bool)
             else v for k, v in point.items() if k in train_keys}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **typed))
    for name, value in point.items():   # the student's shape and start (numbers from Tune may be numpy's)
        if name.startswith("student."):
            cfg = with_searched(cfg, name, int(value) if name.startswith("student.arch.") else value)
    return cfg
