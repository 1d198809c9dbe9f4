"""Where trials run and what each holds, checked against the machine or the cluster before any
trial starts.

resources.gpu_per_trial auto: no GPU in Ray -> 0; data-parallel trials -> a whole GPU per worker;
otherwise the largest 1/k of a GPU that one trial's measured peak fits (measure_trial_gpu_memory).
The measurement runs where trials run: in the driver when it has CUDA, else (a CPU-only driver joined
to a cluster with --address) in a Ray task on a GPU node. The teacher cache is built in that same
place, so it is built in the trials' own precision (a CPU driver would build it in fp32 and miss the
key of trials that load the teacher in bf16) and on storage every node sees (data.cache_dir).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket

from tune_kd.config.errors import ConfigError, UserError
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.config.files import DiskFullError

log = logging.getLogger(__name__)


def check_gpus(cfg: ExperimentConfig, available: int, source: str) -> None:
    gpu, workers = cfg.resources.gpu_per_trial, cfg.resources.workers_per_trial
    if gpu != "auto" and gpu * workers > available:
        per = f" x {workers} workers_per_trial" if workers > 1 else ""
        raise ConfigError([f"{source}: resources.gpu_per_trial: {gpu}{per} asked for, but this machine has "
                           f"{available} GPU(s) (lower it, or use auto)"])


def measure_trial_gpu_memory(cfg: ExperimentConfig) -> int:
    """Peak bytes one trial allocates on a GPU (what its gpu_peak_gib metric reports): both models as
    a trial loads them, and two training steps on the training split's longest batch, the second with
    the optimizer's state already held, as in every step after a trial's first. The teacher's outputs
    come from the teacher cache where a trial reads them from it. The step runs eager: a compiled
    one keeps fewer activations, so this bounds it. Memory this process already held is not counted."""
    import gc

    import torch

    from tune_kd.data import tokenized
    from tune_kd.search.prepare import driver_config
    from tune_kd.train.run import build_run
    from tune_kd.train.step import MicroStep, backward_step, optimizer_step

    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run = build_run(driver_config(cfg.replace(train=dataclasses.replace(cfg.train, device="cuda"))), cache=True)
    # alpha may be searched: the step reads (or runs) the teacher whenever there is one
    run = dataclasses.replace(run, need_teacher=run.teacher is not None)
    longest = run.train_data.lengths.argsort()[-cfg.train.batch_size:]
    batch = tokenized.collate(run.train_data, longest, run.pad_id)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    for _ in range(2):
        backward_step(run, batch, MicroStep(scored, cfg.train.temperature))
        optimizer_step(run.student, run.optimizer, run.scaler, cfg.train.grad_clip)
    peak = torch.cuda.max_memory_allocated(device) - held
    del run
    gc.collect()
    torch.cuda.empty_cache()
    return peak


DRIVER_CPU = 0.01   # what the actor of a data-parallel trial holds (Ray needs a non-empty request)


def concurrency(cfg: ExperimentConfig, resources: dict, cpus: float, gpus: float) -> int:
    if cfg.search.max_concurrent != "auto":
        return cfg.search.max_concurrent
    workers = resources.get("workers", 1)   # data-parallel trials hold workers x the per-worker resources
    per_trial = resources["cpu"] * workers + (DRIVER_CPU if workers > 1 else 0.0)
    if per_trial > cpus + 1e-9:
        raise UserError(f"resources: one trial needs {per_trial:g} CPUs ({workers} workers x cpu_per_trial "
                        f"{resources['cpu']:g}{' + its driver' if workers > 1 else ''}) but Ray has {cpus:g}: lower "
                        "cpu_per_trial or workers_per_trial, or give Ray more CPUs (--num-cpus)")
    fits = math.floor(cpus / per_trial + 1e-9)
    if resources["gpu"]:
        fits = min(fits, math.floor(gpus / (resources["gpu"] * workers) + 1e-9))
    return max(1, min(fits, cfg.search.num_samples))


def check_node_fit(cfg: ExperimentConfig, nodes: list[dict], source: str) -> None:
    """A trial (each worker of a data-parallel one) runs on one node: refuse a request no single
    alive node can hold, which Ray would otherwise leave pending forever. nodes: ray.nodes()."""
    alive = [n for n in nodes if n.get("Alive")]
    if not alive:
        return
    r = cfg.resources
    per = "per worker" if r.workers_per_trial > 1 else "per trial"
    for key, resource, wanted in (("cpu_per_trial", "CPU", r.cpu_per_trial), ("gpu_per_trial", "GPU", r.gpu_per_trial)):
        if wanted == "auto":
            continue
        largest = max(alive, key=lambda n: n["Resources"].get(resource, 0))
        has = largest["Resources"].get(resource, 0)
        if wanted > has + 1e-9:
            raise UserError(f"{source}: resources.{key}: {wanted:g} {resource}s {per}, but the largest node "
                            f"({largest.get('NodeManagerAddress', '?')}, node {largest['NodeID'][:8]}) has {has:g}: a "
                            f"trial cannot span nodes, so it would wait forever (lower it, or spread a trial over "
                            "nodes with resources.workers_per_trial)")


def prepare_where_trials_run(cfg: ExperimentConfig, measure: bool) -> dict:
    """Build (or find) the teacher cache and, when asked, measure one trial's GPU peak, in this
    process: {"teacher_cache": folder or None, "why", "served_layout" (the rows a served teacher
    answers in, when one may serve), "teacher_costs" (served.TeacherCosts: teacher_server auto's
    cost rule, when it has a choice to make), "pid", "host", and with measure "peak", "total" (bytes)}, or
    {"error": one line} for a UserError or a missing CUDA device."""
    from tune_kd.search.prepare import prepare_teacher_rows
    from tune_kd.teacher import served

    where = {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        # the rows a served teacher would answer in, decided here with the cache (search/runner.py decides to serve)
        one_at_a_time = cfg.search.max_concurrent == 1 or cfg.search.num_samples == 1
        may_serve = served.decide(cfg, 1 if one_at_a_time else 2, cache_used=False)[0]
        rows = prepare_teacher_rows(cfg, serve=may_serve)
        where.update(teacher_cache=str(rows.cache.directory) if rows.cache is not None else None, why=rows.why,
                     served_layout=rows.served_layout, teacher_costs=rows.costs)
        if measure:
            import torch

            if not torch.cuda.is_available():
                return {**where, "error": "torch there sees no CUDA device"}
            where.update(peak=measure_trial_gpu_memory(cfg), total=torch.cuda.get_device_properties(0).total_memory)
    except DiskFullError as exc:   # the line names its path: no YAML key caused it
        return {**where, "error": str(exc), "disk_full": True}
    except UserError as exc:
        return {**where, "error": str(exc)}
    return where


def prepare_on_a_gpu_node(cfg: ExperimentConfig, measure: bool) -> dict:
    """prepare_where_trials_run in a Ray task that holds one GPU (it waits for a free one)."""
    import ray

    log.info("the driver has no CUDA device: measuring a trial and building the teacher cache on a GPU node")
    task = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(prepare_where_trials_run)
    try:
        return ray.get(task.remote(cfg, measure))
    except ray.exceptions.RayError as exc:
        return {"host": "a GPU node", "error": str(exc).strip().splitlines()[-1]}


def trial_resources(cfg: ExperimentConfig, gpus: int, measured: dict | None = None) -> dict:
    """{"cpu": .., "gpu": .., "workers": ..}: gpu auto resolved (module docstring) from `measured`
    (prepare_where_trials_run's answer); with a measurement, also "gpu_probe_gib", its figure."""
    gpu, probe = cfg.resources.gpu_per_trial, {}
    if gpu == "auto":
        if gpus == 0:
            gpu = 0
        elif cfg.resources.workers_per_trial > 1:
            gpu = 1   # DDP's natural layout: a whole GPU per worker
        else:
            peak, total = measured["peak"], measured["total"]
            per_gpu = max(1, min(8, int(0.85 * total // max(1, int(peak * 1.25)))))  # 25% headroom, 15% spare
            gpu, probe = 1.0 / per_gpu, {"gpu_probe_gib": peak / 2**30}
            log.info("gpu_per_trial auto: one trial peaks at %.2f GiB of %.0f GiB -> %d trials per GPU",
                     peak / 2**30, total / 2**30, per_gpu)
    return {"cpu": cfg.resources.cpu_per_trial, "gpu": gpu, "workers": cfg.resources.workers_per_trial, **probe}


def place_trials(cfg: ExperimentConfig, gpus: int, source: str) -> tuple[dict, dict]:
    """(trial_resources, prepare_where_trials_run's answer) for a Ray that has `gpus` GPUs: the
    teacher cache built and the trial measured where the trials will run (module docstring)."""
    import torch

    gpu = cfg.resources.gpu_per_trial
    on_gpu = gpus > 0 and gpu != 0
    measure = on_gpu and gpu == "auto" and cfg.resources.workers_per_trial == 1
    remote = on_gpu and not torch.cuda.is_available()
    prepared = prepare_on_a_gpu_node(cfg, measure) if remote else prepare_where_trials_run(cfg, measure)
    if "error" in prepared:
        if measure:
            raise UserError(f"{source}: resources.gpu_per_trial: auto could not measure a trial on {prepared['host']} "
                            f"({prepared['error']}): set resources.gpu_per_trial to a number (1 for a whole GPU, "
                            "0.5 to share one by 2)")
        raise DiskFullError(prepared["error"]) if prepared.get("disk_full") else UserError(f"{source}: {prepared['error']}")
    return trial_resources(cfg, gpus, prepared), prepared
