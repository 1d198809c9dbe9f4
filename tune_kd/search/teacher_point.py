"""The teacher's own point: its validation metrics measured as a student's are, on every search
with a teacher directory (results/<name>/teacher_point.json): the verdict names it (arms.judge), the
report draws it next to the trials, the control arms and a size/quality front.

runner.py runs measure_teacher once, after the trials and the control arms, in a Ray task with one
trial's resources where trials have GPUs or Ray has several nodes (else in the driver's own process,
which saves starting a worker that imports torch and the models: the trials are over by then): the teacher is evaluated by the loop's own `evaluate` as if it were the student (no
teacher beside it), so val_ce, val_acc and val_gen_acc mean what a trial's do (val_loss is val_ce at
alpha 1); val_kl and val_gen_ce compare a student with the teacher and are null here. A search with
a size objective (search.objectives) also gets its parameter count and greedy decoding speed, from
student_shape as every trial's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from tune_kd.config.experiment import ExperimentConfig
from tune_kd.config.files import atomic_write_text
from tune_kd.data import inputs, tokenized
from tune_kd.kd.scored import ScoredLM
from tune_kd.model import build, hardware, student_shape
from tune_kd.model.distributed import setup_distributed
from tune_kd.results.reading import TEACHER_POINT_FILE
from tune_kd.train import on_policy
from tune_kd.train.evaluate import evaluate

log = logging.getLogger(__name__)
SIZE_KEYS = ("student_params", "gen_tokens_per_s")
TIMEOUT_S = 1800   # a task that cannot be placed (no free GPU) must not hold the search's end for ever



def measure_teacher(cfg: ExperimentConfig) -> dict:
    """{val_ce, val_acc, ..., student_params, student_embedding_params, seconds, and with a size
    objective gen_tokens_per_s} of cfg's teacher on cfg's validation split, in cfg.train's precision
    on cfg.train.device. Across tokenizers on the teacher's own tokens, its per-token CE left NaN
    (another tokenization's tokens: no comparison with the student's)."""
    started = time.perf_counter()
    _, _, device = setup_distributed(False, cfg.train.device)
    precision = hardware.resolve_precision(cfg.train.dtype, device)
    tokenizers = inputs.run_tokenizers(cfg)
    _, _, val_data = inputs.load_data(cfg, tokenizers)
    tokenizer, val_data = tokenizers.of_teacher, inputs.teacher_side(val_data)   # the teacher reads its own tokens
    pad_id = tokenized.padding_id(tokenizer)
    teacher_lm = build.make_teacher(cfg.teacher, tokenizer, precision)
    as_student = ScoredLM(teacher_lm)
    alone = cfg.replace(train=dataclasses.replace(cfg.train, alpha=1.0, on_policy_fraction=0.0, seq_kd=False))
    generation = on_policy.Generation(alone, tokenizer, pad_id, [teacher_lm, None], "eval.generation_samples") \
        if cfg.eval.generation_samples else None
    metrics = evaluate(as_student, None, val_data, pad_id, alone, precision, generation=generation)
    if tokenizers.across:   # a token's CE is not comparable across tokenizations; a whole reply's accuracy is
        metrics.update({name: float("nan") for name in ("val_ce", "val_kl", "val_loss", "val_gen_ce")})
    params, embedding = student_shape.parameter_counts(teacher_lm)
    point = {**metrics, "student_params": params, "student_embedding_params": embedding}
    if cfg.search.size_objective == "gen_tokens_per_s":   # only the speed objective pays for timing generation
        subset = on_policy.generation_subset(val_data, student_shape.SPEED_PROMPTS)
        with torch.no_grad():
            point["gen_tokens_per_s"] = student_shape.generation_speed(
                teacher_lm, on_policy.prompts_and_replies(val_data, subset)[0], pad_id, precision.autocast)
    return {**point, "seconds": round(time.perf_counter() - started, 1)}


def write_teacher_point(cfg: ExperimentConfig, experiment_dir: Path, per_trial: dict) -> dict | None:
    """measure_teacher in a Ray task with one trial's CPUs and at least a whole GPU where trials have
    GPUs (the trials are over: a fractional share may not hold the teacher), written to
    teacher_point.json and its line printed; None without a teacher directory to load. A teacher that
    cannot be measured (out of memory, ...) costs the search nothing: its reason is written instead,
    logged, and the report says the point is missing."""
    import ray

    if cfg.teacher is None or cfg.teacher.path is None:
        return None
    gpus = max(1.0, per_trial["gpu"]) if per_trial["gpu"] else 0
    in_driver = not gpus and len([n for n in ray.nodes() if n.get("Alive")]) == 1
    pending = None
    try:
        if in_driver:
            point = measure_teacher(cfg)
        else:
            pending = ray.remote(num_cpus=per_trial["cpu"], num_gpus=gpus)(measure_teacher).remote(cfg)
            point = ray.get(pending, timeout=TIMEOUT_S)
    except Exception as exc:   # noqa: BLE001  (a RayTaskError wraps whatever the task raised; or the timeout)
        if pending is not None:
            ray.cancel(pending, force=True)
        reason = str(exc).strip().splitlines()[-1]
        log.warning("WARNING: the teacher's own point was not measured: %s", reason)
        write_point(experiment_dir, {"error": reason})
        return None
    point = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in point.items()}
    write_point(experiment_dir, point)
    shown = [cfg.metric.name, *(k for k in ("val_acc", "val_gen_acc") if k != cfg.metric.name)]
    if cfg.search.size_objective:
        shown.append(cfg.search.size_objective)
    values = ", ".join(f"{k} {point[k]:,.6g}" if k in SIZE_KEYS else f"{k} {point[k]:.4f}"
                       for k in shown if point.get(k) is not None)
    print(f"teacher (evaluated on the validation set as a student is, {point['seconds']:.0f} s): {values}")
    return point


def write_point(experiment_dir: Path, point: dict) -> None:
    """teacher_point.json, whole or absent."""
    atomic_write_text(Path(experiment_dir) / TEACHER_POINT_FILE, json.dumps(point, indent=1))
