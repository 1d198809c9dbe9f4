"""The experiment config's checks across fields, and the `parameters:` block's rules.

validate(cfg, problems) adds every range and combination problem the types alone cannot express
(experiment.load_config calls it on the file and on each stage): the train, data and model settings
(validate_fields, also applied to every value a searched parameter can reach) and the search
sections (validate_search). DISTRIBUTIONS (W&B sweep syntax) and SEARCHABLE say what a
`parameters:` entry may be; space.py translates them into Ray Tune domains.

cfg is an ExperimentConfig; this module reads it without importing config/experiment.py, which imports it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

from tune_kd.config.typed_yaml import Problems, convert

# distribution -> its keys (W&B sweep syntax); min/max are inclusive
DISTRIBUTIONS = {"log_uniform_values": ("min", "max"), "uniform": ("min", "max"), "int_uniform": ("min", "max"),
                 "q_uniform": ("min", "max", "q"), "values": ("values",), "value": ("value",)}
# train.* keys a search may vary; the rest fix the budget (epochs) or the machinery
SEARCHABLE = ("learning_rate", "temperature", "alpha", "weight_decay", "warmup_iters", "batch_size",
              "accumulation_steps", "grad_clip", "kd_loss", "final_temperature", "temperature_schedule",
              "jsd_beta", "skew", "feature_weight", "on_policy_fraction", "on_policy_start", "generation_temperature", "seq_kd")
# the student's shape and start, searchable with the train keys (student_shape.py checks a sampled shape)
STUDENT_ARCH_SEARCHABLE = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                           "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok")
# a size/quality search's second objective (search.objectives) -> its mode: the student's parameter
# count (fewer is better) or its measured greedy decoding speed at batch 1 (faster is better)
MAX_CONTROL_SEEDS = 10   # controls.seeds: 2 x 10 more full-length arms is already more than most searches cost
SIZE_OBJECTIVES = {"student_params": "min", "gen_tokens_per_s": "max"}
STUDENT_SEARCHABLE = tuple(f"student.arch.{k}" for k in STUDENT_ARCH_SEARCHABLE) + ("student.init", "student.init_layers")


def validate(cfg, problems: Problems) -> None:
    """Checks across fields: ranges and combinations that the types alone cannot express."""
    validate_fields(cfg, problems)
    validate_search(cfg, problems)


def validate_fields(cfg, problems: Problems) -> None:
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
    if t.on_policy_start is not None and not 0.0 <= t.on_policy_start < 1.0:
        problems.add("train.on_policy_start", f"must be in [0, 1) (the share of training before on-policy batches "
                     f"begin; 0.5: after half), got {t.on_policy_start}")
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
        for field in STUDENT_ARCH_SEARCHABLE:
            size = getattr(spec.arch, field, None) if spec.arch is not None else None
            if size is not None and size < 1:
                problems.add(f"{role}.arch.{field}", f"must be >= 1, got {size}")
        if spec.max_params is not None and (role == "teacher" or spec.max_params < 1):
            problems.add(f"{role}.max_params", "is the student's size budget (>= 1 parameters)" if role == "student"
                         else "is the student's size budget: move it to the student section")
    validate_student_init(cfg, problems)
    if cfg.teacher is None and (t.on_policy_fraction or t.seq_kd):
        problems.add("train.on_policy_fraction" if t.on_policy_fraction else "train.seq_kd",
                     "on-policy and sequence-level distillation need a teacher")
    if cfg.teacher is None and t.feature_weight:
        problems.add("train.feature_weight", "feature distillation needs a teacher")
    if cfg.teacher is None and t.alpha is not None and t.alpha != 1.0:
        problems.add("teacher", f"is required unless train.alpha is 1 (plain SFT); alpha is {t.alpha}")


def validate_student_init(cfg, problems: Problems) -> None:
    """student.init / init_layers: the student's only, and `teacher` only where it can copy."""
    teacher, student = cfg.teacher, cfg.student
    for key in ("init", "init_layers"):
        if teacher is not None and getattr(teacher, key) is not None:
            problems.add(f"teacher.{key}", "only the student is initialised from another model's weights: move it to "
                         f"student.{key}, or remove it")
    if student.init != "teacher":
        if student.init_layers is not None:
            problems.add("student.init_layers", "is only used with student.init: teacher (which teacher layers the "
                         "student's start from)")
        return
    if student.path is not None:
        problems.add("student.init", "teacher builds the student from student.arch/preset and copies the teacher's "
                     "weights into it, but student.path already has weights: drop student.init or student.path")
    if teacher is None:
        problems.add("student.init", "teacher needs a teacher to copy: add a teacher section, or use "
                     "student.init: random")
    elif teacher.trust_remote_code:
        problems.add("student.init", "teacher copies into a Llama-family student, but teacher.trust_remote_code loads "
                     "custom code whose weights it cannot map: use student.init: random")
    for role, spec in (("student", student), ("teacher", teacher)):
        if spec is not None and spec.arch is not None and spec.arch.num_experts is not None:
            problems.add(f"{role}.arch.num_experts", "student.init: teacher: MoE init is not supported yet (use "
                         "student.init: random, or dense models)")


def validate_objectives(cfg, problems: Problems) -> None:
    """search.objectives: [the metric, one size objective]; within_percent and the size brackets' ratio."""
    s, sizes = cfg.search, " or ".join(SIZE_OBJECTIVES)
    if s.objectives is not None:
        objectives = s.objectives
        if len(objectives) not in (1, 2) or not all(isinstance(o, str) for o in objectives):
            problems.add("search.objectives", f"must be [{cfg.metric.name}] or [{cfg.metric.name}, {sizes}], got "
                                              f"{objectives!r}")
        elif objectives[0] != cfg.metric.name:
            problems.add("search.objectives", f"the first objective must be the metric, {cfg.metric.name}, got "
                                              f"{objectives[0]!r} (set metric.name to change it)")
        elif len(objectives) == 2 and objectives[1] not in SIZE_OBJECTIVES:
            problems.add("search.objectives", f"the second objective must be the student's size, {sizes}, got "
                                              f"{objectives[1]!r}")
        elif len(objectives) == 2 and s.algorithm != "optuna":
            problems.add("search.objectives", "two objectives need search.algorithm: optuna (its multi-objective "
                                              "TPE); random search has no notion of a front")
    if not 0 < s.within_percent < 100:
        problems.add("search.within_percent", f"must be in (0, 100), got {s.within_percent}")
    ratio = cfg.scheduler.size_bracket_ratio
    if ratio != 0 and ratio <= 1:
        problems.add("scheduler.size_bracket_ratio", f"must be > 1 (2: a bracket spans a factor of 2 in size), or 0 "
                                                     f"to compare trials across all sizes, got {ratio}")


def validate_search(cfg, problems: Problems) -> None:
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
    validate_objectives(cfg, problems)
    if s.warm_start and s.algorithm != "optuna":
        problems.add("search.warm_start", f"needs search.algorithm optuna (random search proposes without looking "
                     f"at any trial), got {s.algorithm}")
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
    validate_teacher_server(cfg, problems)
    if not 0 <= cfg.controls.seeds <= MAX_CONTROL_SEEDS:
        problems.add("controls.seeds", f"must be an integer from 0 (no noise measured) to {MAX_CONTROL_SEEDS}, got "
                                       f"{cfg.controls.seeds}: each seed trains two more full-length arms")
    if cfg.checkpoint.keep_per_trial < 1:
        problems.add("checkpoint.keep_per_trial", f"must be >= 1, got {cfg.checkpoint.keep_per_trial}")
    for name, spec in cfg.parameters.items():
        _check_parameter(cfg, str(name), spec, problems)


def local_teacher_reason(cfg) -> str | None:
    """Why a run needs the teacher in its own process (hidden states, or the teacher generating), so
    a served teacher cannot stand in for it; None when scored rows are all it needs."""
    t, searched = cfg.train, cfg.parameters
    if t.feature_weight or "feature_weight" in searched:
        return "feature distillation needs the teacher's hidden states (train.feature_weight)"
    if t.seq_kd or "seq_kd" in searched:
        return "train.seq_kd has the teacher generate replies"
    return None


def validate_teacher_server(cfg, problems: Problems) -> None:
    s = cfg.teacher_server
    local = local_teacher_reason(cfg)
    if local and (s.mode == "on" or s.url):
        key = "teacher_server.url" if s.url else "teacher_server.mode"
        problems.add(key, f"a served teacher answers with scored rows only, but {local}: use teacher_server: off")
    if s.url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", s.url):
        problems.add("teacher_server.url", f"{s.url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000 for "
                     "`vllm serve MODEL --max-logprobs 64`)")
    if s.url is not None and cfg.teacher is not None and cfg.teacher.path is None:
        problems.add("teacher.path", "teacher_server.url needs the teacher's local folder (its tokenizer and config; "
                     "the weights are not loaded)")
    for name, low in (("top_k", 1), ("replicas", 1), ("max_batch_tokens", 1)):
        if getattr(s, name) < low:
            problems.add(f"teacher_server.{name}", f"must be >= {low}, got {getattr(s, name)}")
    if s.max_wait_ms < 0 or s.cpus < 0:
        name = "max_wait_ms" if s.max_wait_ms < 0 else "cpus"
        problems.add(f"teacher_server.{name}", f"must be >= 0, got {getattr(s, name)}")
    if s.gpus != "auto" and (isinstance(s.gpus, bool) or not isinstance(s.gpus, (int, float)) or s.gpus < 0):
        problems.add("teacher_server.gpus", f"must be auto or a number >= 0 (a share of a GPU per copy), got {s.gpus!r}")


def searched_keys(parameters: dict) -> list[str]:
    """The keys a `parameters:` block searches: all but the constants (`{value: x}`)."""
    return [name for name, spec in parameters.items() if "value" not in spec]


def parameter_candidates(spec: dict) -> dict[str, Any]:
    """The extreme or listed values a parameter can take, by the key they come from."""
    if "values" in spec:
        return {f"values[{i}]": v for i, v in enumerate(spec["values"])}
    if "value" in spec:
        return {"value": spec["value"]}
    return {"min": spec.get("min"), "max": spec.get("max")}


def with_searched(cfg, name: str, value):
    """cfg with one searched key set: a train key, or a student.* key (STUDENT_SEARCHABLE)."""
    if not name.startswith("student."):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{name: value}))
    field = name.split(".")[-1]
    student = cfg.student
    if name.startswith("student.arch."):
        arch = student.arch if student.arch is not None else _arch_type(cfg)()
        return dataclasses.replace(cfg, student=dataclasses.replace(student, arch=dataclasses.replace(arch, **{field: value})))
    return dataclasses.replace(cfg, student=dataclasses.replace(student, **{field: value}))


def _arch_type(cfg):
    return typing.get_type_hints(type(cfg.student))["arch"].__args__[0]


def searched_hint(cfg, name: str):
    """The type a searched key's values must have."""
    if not name.startswith("student."):
        return typing.get_type_hints(type(cfg.train))[name]
    field = name.split(".")[-1]
    owner = _arch_type(cfg) if name.startswith("student.arch.") else type(cfg.student)
    hint = typing.get_type_hints(owner)[field]
    options = [a for a in typing.get_args(hint) if a is not type(None)]   # Optional[X] -> X
    return options[0] if len(options) == 1 else hint


def _check_parameter(cfg, name: str, spec: Any, problems: Problems) -> None:
    key = f"parameters.{name}"
    allowed = SEARCHABLE + STUDENT_SEARCHABLE
    if name not in allowed:
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        problems.add(key, f"is not a searchable key; {hint}(allowed: {', '.join(allowed)})")
        return
    if name.startswith("student.") and cfg.student.path is not None:
        problems.add(key, "student.path loads a student of a fixed shape and weights: search the student's shape "
                          "with student.arch (or student.preset) instead")
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
    hint = searched_hint(cfg, name)
    setting = name if name.startswith("student.") else f"train.{name}"
    if hint is int and dist in ("uniform", "log_uniform_values", "q_uniform"):
        problems.add(f"{key}.distribution", f"{setting} is an integer: use int_uniform or values, not {dist}")
        return
    if len(problems.items) > problems_before:
        return  # the range itself is broken; its end points would only repeat that
    # Every value the search can reach must itself be a valid train setting.
    for where, value in parameter_candidates(spec).items():
        local = Problems(None, {})
        converted = convert(value, hint, setting, local)
        if not local.items:
            validate_fields(with_searched(cfg, name, converted), local)
        for item in local.items:
            if item.startswith(f"{setting}:"):
                problems.add(f"{key}.{where}", item.split(": ", 1)[1])
