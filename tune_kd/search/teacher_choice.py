"""Pricing the ways a search can run its teacher, where the trials run: teacher_server auto's input.

A served teacher saves memory (one copy per node instead of one per trial) but it is one queue for
every trial of the node, its answer is rows (compressed to a layout, copied through Ray's object
store) rather than logits used in place, and on a CPU node it runs on the same cores as the
trials. Whether that is cheaper than a teacher in each trial depends on the teacher, the
vocabulary and how flat the teacher's rows are (top_k auto's k), so it is measured, not assumed:
measure() times one representative training batch the way each option would run it, on the
trials' device with a trial's threads, and teacher/served.py's decide() compares the estimates.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager

import numpy as np
import torch

from tune_kd.teacher.served import TeacherCosts
from tune_kd.teacher.stored_rows import Layout

log = logging.getLogger(__name__)


@contextmanager
def trial_threads(threads: int):
    """torch's intra-op threads as one trial has them (the driver may hold more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def representative_batch(run) -> dict:
    """The first batch of the first epoch, as trials draw it (length-bucketed: a typical, not the
    longest, batch)."""
    from tune_kd.data import tokenized

    cfg = run.cfg
    first = tokenized.epoch_batches(run.train_data, cfg.train.batch_size, cfg.train.seed, 0)[0]
    return tokenized.collate(run.train_data, first, run.pad_id)


def timed(work, repeats: int = 2) -> float:
    """The fastest of `repeats` runs of work() after one warm-up run (allocator and caches warm)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def node_memory(device: torch.device) -> int:
    """The memory a node's trials share: the GPUs' total, or the RAM available now."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory * torch.cuda.device_count()
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def measure(run, layout: Layout) -> TeacherCosts:
    """Time one representative batch (representative_batch) each way the teacher can run for a trial:
    a local teacher's forward and logits as the loss makes them, the served teacher's answer in
    `layout` for one batch and for two at once, and the student's share of a full training step
    (the step with a local teacher, less its teacher). The run is changed (one optimizer step): a
    throwaway, as prepare_teacher_rows builds it."""
    from tune_kd.kd.scoring import logit_chunks, scored_positions, teacher_outputs
    from tune_kd.search.teacher_actor import answer_rows
    from tune_kd.train.step import MicroStep, backward_step, optimizer_step

    cfg = run.cfg
    batch = representative_batch(run)
    ids, scored = batch["input_ids"].numpy(), scored_positions(batch["labels"])[0].numpy()
    pair_ids, pair_scored = np.concatenate([ids, ids]), np.concatenate([scored, scored])
    live = run.teacher                  # the run is built without a cache: teacher/local.LiveTeacher
    teacher = teacher_outputs(live.scored, run.precision)
    # alpha 1 with alpha searched still distils in trials: the step asks the teacher
    run = dataclasses.replace(run, need_teacher=True)

    def local_teacher():
        for _ in logit_chunks(teacher(batch), live.columns):
            pass

    def training_step():
        backward_step(run, batch, MicroStep(int(scored.sum()), cfg.train.temperature, read_cache=False))
        optimizer_step(run.student, run.optimizer, run.scaler, cfg.train.grad_clip)

    with trial_threads(int(cfg.resources.cpu_per_trial) if run.device.type == "cpu" else torch.get_num_threads()):
        local_s = timed(local_teacher)
        one_s = timed(lambda: answer_rows(live.scored, run.precision, live.columns, layout, ids, scored))
        pair_s = timed(lambda: answer_rows(live.scored, run.precision, live.columns, layout, pair_ids, pair_scored),
                       repeats=1)
        step_s = timed(training_step, repeats=1)
    teacher_bytes = sum(p.numel() * p.element_size() for p in live.lm.parameters())
    costs = TeacherCosts(local_forward_s=local_s, served_one_s=one_s, served_pair_s=pair_s,
                         student_s=max(step_s - local_s, 0.0), positions=int(scored.sum()),
                         rows_bytes=int(scored.sum()) * layout.bytes_per_position, teacher_bytes=teacher_bytes,
                         memory_bytes=node_memory(run.device), device=str(run.device))
    log.debug("teacher costs: %s", costs)
    return costs

