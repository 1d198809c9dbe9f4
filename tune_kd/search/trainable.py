"""The Ray adapter: a sampled config -> loop.train, with a report() that calls tune.report.

Each epoch end reports every metric of reading.METRICS plus a checkpoint of the student (a Hugging
Face directory that is also resumable). A retried or restored trial continues from
tune.get_checkpoint(). The trial reads the teacher and the tokenized data from the disk caches the
driver built; only the small config travels through Ray. With resources.workers_per_trial > 1 the
trial instead drives a Ray Train TorchTrainer (run_data_parallel). The fault-tolerance tests' drills
(fault_drills.py) hook in at each report and step; they do nothing unless $TUNE_KD_FAULT_FILE is set.

The search reuses a trial's Ray actor (its worker process, with torch and transformers imported)
for the next trial (runner.build_tuner: reuse_actors): everything a trial trains with is built
inside the trial function from its own config and seed, and start_in_process puts back the little
a process keeps between trials. Each report carries `trial_started_at` (wall clock, when the
trial function began) and `trial_in_process` (1 for a fresh worker, 2 for the next trial it runs, ...).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

from tune_kd.config.experiment import ExperimentConfig
from tune_kd.model.student_shape import ShapeRejected
from tune_kd.search import space, teacher_actor
from tune_kd.search.fault_drills import fault_step_hook, fire, take_fault
from tune_kd.search.trial_logs import keep_earlier_attempts
from tune_kd.train import loop


def report_with_checkpoint(send, checkpoint_cls, row: dict, save, where: str = "") -> None:
    """One epoch's report through `send` (tune.report or ray.train.report) with a checkpoint that
    `save` writes into a temporary folder (the fault drills fire here when planned)."""
    kind = take_fault(row["epoch"], None)
    drill = fire(kind, f"at the epoch {row['epoch']} report{where}") if kind else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="tune_kd-ckpt-") as tmp, drill:
        save(Path(tmp))
        send(row, checkpoint=checkpoint_cls.from_directory(tmp))


_trials_in_process = itertools.count(1)   # this worker's trials so far: > 1 on a reused actor


def start_in_process() -> int:
    """Ready this worker for a trial; returns which trial of the process it is (1: a fresh worker).
    A reused worker gets back what a fresh one starts with: the last trial's objects freed and
    dynamo's compiled code dropped (a later torch.compile starts from inductor's disk cache, as in
    a new process). Everything else a trial builds itself from its config and seed (loop.train)."""
    number = next(_trials_in_process)
    if number > 1:
        from tune_kd.model.hardware import release_freed_memory

        gc.collect()
        if "torch._dynamo" in sys.modules:   # imported only once something compiled
            sys.modules["torch._dynamo"].reset()
        release_freed_memory()
    return number


def train_from(checkpoint, cfg: ExperimentConfig, **options) -> None:
    """loop.train from the start, or resumed from a Ray checkpoint (load_checkpoint reads all it
    needs before training starts, so the local copy may go away afterwards)."""
    if checkpoint is None:
        loop.train(cfg, **options)
        return
    with checkpoint.as_directory() as resume_dir:
        loop.train(cfg, resume_from=resume_dir, **options)


def make_trainable(base: ExperimentConfig, experiment_dir: Path | None = None):
    """A function trainable for ray.tune that trains `base` with each trial's sampled values.
    experiment_dir: the experiment's folder on storage (data-parallel trials keep their Ray Train
    run in its trial_<id>/train).

    A diverged trial (loss NaN/inf) reports once more, with the worst metric value and a `diverged`
    reason, and ends: ASHA and the searcher see a bad trial, and retrying would only diverge again.
    A sampled student shape that is no model (student_shape.py) reports so, as `rejected`."""

    def distill_trial(point: dict) -> None:
        started_at = time.time()   # the bench's trial start: Tune scheduling it -> here (spawn, imports)
        import ray
        from ray import tune

        from tune_kd.model.hardware import setup_logging

        in_process = start_in_process()
        setup_logging()
        # an earlier attempt's logs (a resumed or retried trial) get numbered names; storage: a filesystem path
        storage = tune.get_context().get_storage()
        keep_earlier_attempts(Path(storage.trial_fs_path), Path(storage.trial_working_directory))
        cfg = space.apply_point(base, point)
        reached = {"epoch": 0}
        node_id = ray.get_runtime_context().get_node_id()

        def report(metrics: dict, save) -> None:
            # node_id: which Ray node ran this epoch (result.json's node_ip is shared by nodes on one host)
            report_with_checkpoint(tune.report, tune.Checkpoint, {**metrics, "node_id": node_id, "trial_started_at":
                                                                  started_at, "trial_in_process": in_process}, save)
            reached["epoch"] = metrics["epoch"]

        if cfg.resources.workers_per_trial > 1:
            run_data_parallel(cfg, node_id, Path(experiment_dir) / f"trial_{tune.get_context().get_trial_id()}")
            return
        try:
            train_from(tune.get_checkpoint(), cfg, report=report, use_wandb=False, step_hook=fault_step_hook(""),
                       node_teacher=lambda: teacher_actor.node_teacher(cfg, tune.get_context().get_trial_id()))
        except (loop.TrainingDiverged, ShapeRejected) as exc:
            # the searcher sees a bad trial (the worst value) and learns from it; a retry would end alike
            logging.getLogger(__name__).error("trial stopped: %s", exc)
            worst = math.inf if cfg.metric.mode == "min" else -math.inf
            why = "rejected" if isinstance(exc, ShapeRejected) else "diverged"
            tune.report({"epoch": reached["epoch"] + 1, cfg.metric.name: worst, why: str(exc)})

    return distill_trial


def run_data_parallel(cfg: ExperimentConfig, node_id: str, trial_dir: Path) -> None:
    """The trial as data-parallel training on resources.workers_per_trial Ray Train workers
    (TorchTrainer, gloo on CPU, NCCL on GPU). Every worker runs loop.train with DDP; rank 0 writes
    the checkpoint, every rank calls ray.train.report (a barrier), and Ray's TuneReportCallback
    forwards rank 0's metrics to this trial, with the checkpoint's path as `checkpoint_path`.
    The Train run lives in the trial folder (train/); a retried trial reuses it, so Ray Train hands
    the workers the latest checkpoint and training resumes there."""
    from ray import train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    r = cfg.resources
    gpu = float(r.gpu_per_trial)   # the driver resolved auto (resources.trial_resources)
    trainer = TorchTrainer(
        functools.partial(data_parallel_worker, cfg, node_id),
        scaling_config=train.ScalingConfig(num_workers=r.workers_per_trial, use_gpu=gpu > 0,
                                           resources_per_worker={"CPU": r.cpu_per_trial, **({"GPU": gpu} if gpu else {})}),
        run_config=train.RunConfig(name="train", storage_path=str(trial_dir),
                                   callbacks=[TuneReportCallback()],
                                   checkpoint_config=train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_per_trial,
                                                                            checkpoint_score_attribute=cfg.metric.name,
                                                                            checkpoint_score_order=cfg.metric.mode)))
    trainer.fit()


def data_parallel_worker(cfg: ExperimentConfig, node_id: str) -> None:
    """One Ray Train worker: loop.train under DDP (Ray Train already set up the process group)."""
    import torch.distributed as dist
    from ray import train

    from tune_kd.model.hardware import setup_logging

    setup_logging()
    rank = train.get_context().get_world_rank()

    def report(metrics: dict, save) -> None:
        row = {**metrics, "node_id": node_id, "workers": dist.get_world_size()}
        if rank != 0:
            train.report(row, checkpoint=None)   # a barrier: every rank reports, rank 0 with the checkpoint
            return
        report_with_checkpoint(train.report, train.Checkpoint, row, save, " (rank 0)")

    train_from(train.get_checkpoint(), cfg, report=report, ddp=True, use_wandb=False, report_on_every_rank=True,
               step_hook=fault_step_hook(" (rank 0)") if rank == 0 else None)
