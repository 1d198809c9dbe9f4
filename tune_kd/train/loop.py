"""THE training loop: `train(cfg, report)` distils a teacher into a student, the seed's way.

Read top to bottom: build the run (train/run.py), then per epoch this rank's shard of the batches
in accumulation windows (per micro-batch train/step.backward_step, per window the optimizer step,
the divergence check, the log line and the periodic checkpoint), then at each epoch end evaluate
(train/evaluate.py) and call `report(metrics, save)`, where `save(dir)` writes a resumable
checkpoint of the student. No Ray in here: the loop runs in plain pytest.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.data import tokenized
from tune_kd.kd.teacher_rows import Teacher
from tune_kd.model import checkpoint, compiling, student_shape
from tune_kd.model.checkpoint import Progress
from tune_kd.model.hardware import release_freed_memory
from tune_kd.train import on_policy
from tune_kd.train.evaluate import evaluate
from tune_kd.train.run import Run, build_run, generation_setting
from tune_kd.train.step import MicroStep, backward_step, lr_at, optimizer_step, temperature_at
from tune_kd.train.tracking import start_wandb

log = logging.getLogger(__name__)

Report = Callable[[dict, Callable[[Path], None]], None]
KINDS = ("off_policy", "on_policy")
# Where a run's wall time goes (metrics["phase_seconds"], summed since the run started in this
# process): build the run; wait for batches; the training steps' forward and backward (tally.seconds)
# and their optimizer steps; evaluation; the once-per-run generation speed; report and checkpoints.
PHASES = ("build", "data", "steps", "optimizer", "eval", "gen_speed", "report")


@dataclass
class TrainResult:
    student: torch.nn.Module
    tokenizer: object
    metrics: dict                 # the last epoch's metrics
    history: list[dict]           # every epoch's metrics


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: the run stops instead of burning compute."""


def loss_is_finite(running_loss: torch.Tensor, world: int) -> bool:
    """Whether the running loss sum is finite on every rank (NaN and inf never wash out of a sum).
    Reading it synchronises the device, so on GPU the loop asks only at log and save intervals."""
    flag = torch.isfinite(running_loss).to(torch.float32)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def divergence_check_due(step: int, device: torch.device, train_cfg) -> bool:
    """Whether the loop checks the loss after optimizer step `step`: every step on CPU; on GPU (a
    check is a device sync) every train.log_interval steps and before every train.save_interval
    save, so `last/` never holds a diverged run's weights. Alike on every rank (the check is a
    collective), whether or not this rank saves."""
    return device.type == "cpu" or step % train_cfg.log_interval == 0 \
        or bool(train_cfg.save_interval) and step % train_cfg.save_interval == 0


def gpu_peak_gib(device: torch.device) -> float:
    """The most GPU memory this process has allocated since the run was built (GiB): a trial's real
    need, which search/resources.measure_trial_gpu_memory predicts. NaN off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


@dataclass
class Training:
    """The loop's state around a Run: where training stands and what each step reports to."""

    run: Run
    progress: Progress
    per_rank: int                  # micro-batches per rank per epoch
    total_steps: int
    compiler: compiling.TrialCompile
    wandb_run: object | None
    step_hook: Callable[[int, int, torch.nn.Module], None] | None
    out_dir: Path | None
    started: float = field(default_factory=time.perf_counter)
    steps_this_run: int = 0
    speed: float | None = None     # gen_tokens_per_s, measured once, at the first epoch end
    phases: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))   # PHASES' seconds so far

    def save(self, directory: Path) -> None:
        run = self.run
        checkpoint.save_checkpoint(Path(directory), run.lm, run.tokenizer, run.optimizer, run.scaler, self.progress,
                                   run.extra_state)


@dataclass
class Epoch:
    """What one epoch accumulates on this rank."""

    device: torch.device
    loss: torch.Tensor = field(init=False)          # objective summed over the epoch's optimizer steps
    window_loss: torch.Tensor = field(init=False)   # ... over the current accumulation window
    log_sums: torch.Tensor = field(init=False)      # loss, ce, kd since the last log line
    log_steps: int = 0
    tokens: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    batches: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    data_seconds: float = 0.0                       # waiting for the loader's batches
    optimizer_seconds: float = 0.0                  # window_end: the optimizer step and its bookkeeping

    def __post_init__(self):
        self.loss, self.window_loss = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self.log_sums = torch.zeros(3, device=self.device)


def train(cfg: ExperimentConfig, report: Report | None = None, resume_from: str | Path | None = None,
          out_dir: str | Path | None = None, ddp: bool = False, use_wandb: bool | None = None,
          step_hook: Callable[[int, int, torch.nn.Module], None] | None = None,
          report_on_every_rank: bool = False, node_teacher: Callable[[], Teacher] | None = None) -> TrainResult:
    """Distil cfg.teacher into cfg.student on cfg.data; returns the trained student and its metrics.

    report(metrics, save) is called once per epoch end with every name in results/reading.METRICS;
    save(dir) writes a resumable checkpoint. resume_from continues a run from such a checkpoint
    exactly. metrics["phase_seconds"]: where the run's wall time went so far (PHASES; each report
    counts in the next epoch's figure). out_dir receives a resumable `last/` checkpoint every
    train.save_interval steps (0: never mid-epoch) and at each epoch end. step_hook(epoch, step_in_epoch, student) runs after
    every optimizer step (fault drills use it). report_on_every_rank: call report on every rank (Ray
    Train's report is a barrier), not rank 0 only. node_teacher: this node's served teacher
    (teacher/served.connect). Raises TrainingDiverged when the loss stops being finite: checked
    every step on CPU, every train.log_interval steps and train.save_interval save on GPU (a check
    is a device sync), and before every evaluation.
    """
    # ---- setup: the run, where it resumes, the schedule, tracking, compilation ---------------
    build_started = time.perf_counter()
    run = build_run(cfg, ddp, node_teacher)
    progress = checkpoint.load_checkpoint(resume_from, run.lm, run.optimizer, run.scaler, run.extra_state) \
        if resume_from else Progress()
    per_rank = len(tokenized.epoch_batches(run.train_data, cfg.train.batch_size, cfg.train.seed, 0)) // run.world
    if per_rank < 1:
        raise UserError(f"data: {len(run.train_data)} training conversations make fewer batches than ranks "
                        f"({run.world})")
    total_steps = cfg.train.epochs * math.ceil(per_rank / cfg.train.accumulation_steps)
    wandb_run = start_wandb(cfg) if run.rank == 0 and (cfg.logging.wandb if use_wandb is None else use_wandb) \
        else None
    if run.rank == 0:
        log_start(run, total_steps)
    t = Training(run, progress, per_rank, total_steps, trial_compile(run, total_steps - progress.step, progress.epoch),
                 wandb_run, step_hook, Path(out_dir) if out_dir else None)
    t.phases["build"] = time.perf_counter() - build_started
    # ---- epochs: train, then evaluate, report and checkpoint ---------------------------------
    for epoch in range(progress.epoch, cfg.train.epochs):
        tally = train_epoch(t, epoch)
        metrics = epoch_end(t, epoch, tally)
        if run.rank == 0:
            log.info("epoch %d: %s", epoch + 1, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                         if k != "phase_seconds"))
            if wandb_run:
                wandb_run.log(metrics, step=progress.step)
        report_started = time.perf_counter()
        if report is not None and (run.rank == 0 or report_on_every_rank):
            report(metrics, t.save)
        if run.rank == 0 and t.out_dir:
            t.save(t.out_dir / "last")
        t.phases["report"] += time.perf_counter() - report_started
    if wandb_run:
        wandb_run.finish()
    return TrainResult(student=run.lm, tokenizer=run.tokenizer, metrics=progress.history[-1] if progress.history else {},
                       history=progress.history)


def log_start(run: Run, total_steps: int) -> None:
    cfg = run.cfg
    teacher = f", {run.teacher.describe()}" if run.teacher is not None else ""
    log.info("train: %d conversations, %d val; %d epochs x %d steps; student %.2fM params%s", len(run.train_data),
             len(run.val_data), cfg.train.epochs, total_steps // cfg.train.epochs,
             sum(p.numel() for p in run.lm.parameters()) / 1e6, teacher)


def trial_compile(run: Run, steps_left: int, epoch: int) -> compiling.TrialCompile:
    """torch.compile for this run (model/compiling.py); off when it generates: generate()'s cached
    decoding steps would recompile at every new length."""
    setting, device = run.cfg.train.compile, run.device
    if run.generation is not None and (setting == "on" or setting == "auto" and device.type == "cuda"):
        log.info("compile: off (train.compile %s): this run generates (%s)", setting, generation_setting(run.cfg))
    teacher_lm = run.teacher.lm if run.teacher is not None else None
    key = compiling.shapes_key(run.lm, teacher_lm, run.need_teacher and run.teacher.forward_in_step, device,
                               run.precision.autocast_dtype)
    return compiling.TrialCompile("off" if run.generation is not None else setting, device, (run.lm, teacher_lm),
                                  run.cfg.data.cache_dir, key, steps_left=steps_left, epoch=epoch,
                                  record=run.rank == 0)


def train_epoch(t: Training, epoch: int) -> Epoch:
    """One epoch: this rank's shard of the epoch's batches, in accumulation windows."""
    run, train_cfg, accumulation = t.run, t.run.cfg.train, t.run.cfg.train.accumulation_steps
    all_batches = tokenized.epoch_batches(run.train_data, train_cfg.batch_size, train_cfg.seed, epoch)
    shards = [all_batches[: t.per_rank * run.world][r::run.world] for r in range(run.world)]
    counts = run.train_data.target_counts
    # the assistant tokens of each window over every rank: DDP averages gradients over ranks
    window_tokens = [sum(int(counts[b].sum()) for shard in shards for b in shard[w:w + accumulation])
                     for w in range(0, t.per_rank, accumulation)]
    loader = torch.utils.data.DataLoader(tokenized.BatchList(run.train_data, shards[run.rank][t.progress.batch:],
                                                             run.pad_id),
                                         batch_size=None, num_workers=train_cfg.num_workers,
                                         pin_memory=run.device.type == "cuda")
    tally = Epoch(run.device)
    waiting = time.perf_counter()
    for micro, batch in enumerate(loader, start=t.progress.batch):
        tally.data_seconds += time.perf_counter() - waiting
        last_in_window = (micro + 1) % accumulation == 0 or micro + 1 == t.per_rank
        if micro % accumulation == 0:
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(t.progress.step, t.total_steps, train_cfg.learning_rate, train_cfg.warmup_iters)
            temperature = temperature_at(t.progress.step, t.total_steps, train_cfg)
        batch_started = time.perf_counter()
        warmed_up = on_policy.on_policy_started(t.progress.step, t.total_steps, train_cfg.on_policy_start)
        kind = "on_policy" if on_policy.is_on_policy(train_cfg.on_policy_fraction, train_cfg.seed, epoch, micro,
                                                     warmed_up) else "off_policy"
        step = MicroStep(window_tokens[micro // accumulation] / run.world, temperature,
                         sync=last_in_window or run.world == 1, on_policy=kind == "on_policy")
        batch, step = generated_batch(run, batch, step, epoch, micro) if kind == "on_policy" or train_cfg.seq_kd \
            else (batch, step)
        parts = backward_step(run, batch, step)
        if run.generation is not None and run.device.type == "cuda":
            torch.cuda.synchronize(run.device)   # the per-kind cost below is the batch's, not a queue's
        tally.seconds[kind] += time.perf_counter() - batch_started
        tally.batches[kind] += 1
        tally.log_sums += torch.stack([parts.loss.detach(), parts.ce.detach(), parts.kd.detach()])
        tally.window_loss += parts.loss.detach()
        tally.tokens += batch["num_tokens"]
        if last_in_window:
            window_started = time.perf_counter()
            window_end(t, epoch, micro, tally, temperature)
            tally.optimizer_seconds += time.perf_counter() - window_started
        waiting = time.perf_counter()
    return tally


def generated_batch(run: Run, batch: dict, step: MicroStep, epoch: int, micro: int) -> tuple[dict, MicroStep]:
    """The batch's prompts answered by the student (on-policy) or the teacher (seq_kd), and its step:
    normalised by its own reply tokens, weighted by its data share of the window; never the cache's."""
    counts = run.train_data.target_counts
    data_targets = max(int(counts[batch["indices"]].sum()), 1)
    if step.on_policy:
        seed = on_policy.sampling_seed(run.cfg.train.seed, epoch, micro, run.rank)
        batch, targets = run.generation.on_policy_batch(run.lm, run.train_data, batch["indices"], seed,
                                                        run.precision.autocast)
    else:
        batch, targets = run.generation.teacher_reply_batch(run.teacher.lm, run.train_data, batch["indices"],
                                                            run.precision.autocast)
    return batch, MicroStep(step.normalizer * targets / data_targets, step.temperature, step.sync,
                            read_cache=False, on_policy=step.on_policy)


def window_end(t: Training, epoch: int, micro: int, tally: Epoch, temperature: float) -> None:
    """After a window's last micro-batch: the optimizer step, then the hooks, the divergence check,
    the log line and the periodic checkpoint that are due."""
    run, train_cfg, progress = t.run, t.run.cfg.train, t.progress
    optimizer_step(run.student, run.optimizer, run.scaler, train_cfg.grad_clip)
    if run.device.type == "cpu":
        release_freed_memory()
    t.compiler.after_step(epoch)
    progress.step, progress.batch, tally.steps = progress.step + 1, micro + 1, tally.steps + 1
    t.steps_this_run, tally.log_steps = t.steps_this_run + 1, tally.log_steps + 1
    tally.loss += tally.window_loss
    tally.window_loss.zero_()
    if t.step_hook is not None:
        t.step_hook(epoch + 1, tally.steps, run.lm)
    if divergence_check_due(progress.step, run.device, train_cfg):
        stop_if_diverged(t, tally, epoch)
    if progress.step % train_cfg.log_interval == 0 and run.rank == 0:
        loss, ce, kd = (tally.log_sums / tally.log_steps).tolist()
        lr = run.optimizer.param_groups[0]["lr"]
        remaining = (time.perf_counter() - t.started) / t.steps_this_run * (t.total_steps - progress.step)
        log.info("epoch %d step %d/%d loss %.4f ce %.4f kd %.4f lr %.2e T %.3g tokens/s %.0f eta %.0fs",
                 epoch + 1, progress.step, t.total_steps, loss, ce, kd, lr, temperature,
                 tally.tokens * run.world / (time.perf_counter() - tally.started), remaining)
        if t.wandb_run:
            t.wandb_run.log({"loss": loss, "ce": ce, "kd": kd, "lr": lr}, step=progress.step)
        tally.log_sums.zero_()
        tally.log_steps = 0
    if train_cfg.save_interval and progress.step % train_cfg.save_interval == 0 and t.out_dir and run.rank == 0:
        t.save(t.out_dir / "last")


def stop_if_diverged(t: Training, tally: Epoch, epoch: int) -> None:
    if not loss_is_finite(tally.loss, t.run.world):
        raise TrainingDiverged(f"loss became {tally.loss.item()} at epoch {epoch + 1} step {t.progress.step} "
                               f"(lr {t.run.optimizer.param_groups[0]['lr']:.3g}): lower train.learning_rate, "
                               "tighten train.grad_clip, or use float32")


def epoch_end(t: Training, epoch: int, tally: Epoch) -> dict:
    """The epoch's metrics: training loss and speed, validation (train/evaluate.py), memory, size
    and generation speed; appended to the run's history."""
    run, progress = t.run, t.progress
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    train_seconds = time.perf_counter() - tally.started
    stop_if_diverged(t, tally, epoch)
    progress.epoch, progress.batch = epoch + 1, 0
    train_loss = torch.stack([tally.loss / max(tally.steps, 1)])
    if run.world > 1:
        dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
    metrics = {"epoch": epoch + 1, "train_loss": train_loss.item(), "tokens_per_s": tally.tokens * run.world / train_seconds,
               **{f"{kind}_s_per_batch": tally.seconds[kind] / tally.batches[kind] if tally.batches[kind] else math.nan
                  for kind in KINDS}}
    t.phases["data"] += tally.data_seconds
    t.phases["steps"] += sum(tally.seconds.values())
    t.phases["optimizer"] += tally.optimizer_seconds
    eval_started = time.perf_counter()
    # the unwrapped student: DDP's forward broadcasts buffers, a collective a rank without a batch never joins
    metrics.update(evaluate(run.student, run.teacher, run.val_data, run.pad_id, run.cfg, run.precision,
                            run.rank, run.world, temperature=temperature_at(progress.step, t.total_steps, run.cfg.train),
                            generation=run.generation))
    metrics["gpu_peak_gib"] = gpu_peak_gib(run.device)
    t.phases["eval"] += time.perf_counter() - eval_started
    if t.speed is None:   # once per run: the student's shape, not its weights, sets it
        speed_started = time.perf_counter()
        prompts = on_policy.prompts_and_replies(run.val_data, on_policy.generation_subset(
            run.val_data, student_shape.SPEED_PROMPTS))[0]
        t.speed = student_shape.generation_speed(run.lm, prompts, run.pad_id, run.precision.autocast)
        t.phases["gen_speed"] = time.perf_counter() - speed_started
    metrics.update(student_params=run.student_params, student_embedding_params=run.embedding_params,
                   gen_tokens_per_s=t.speed, phase_seconds=dict(t.phases))
    progress.history.append(metrics)
    return metrics
