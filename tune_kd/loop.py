"""THE training loop: `train(cfg, report)` distils a teacher into a student, the seed's way.

Per optimizer step: set the learning rate (linear warmup, then the seed's cosine
lr/10 + 0.5*lr*(1 + cos(pi*step/total))), run `accumulation_steps` micro-batches (student under
autocast, teacher frozen under inference_mode), back-propagate alpha*CE + (1-alpha)*T^2*KL (another
train.kd_loss D: T^k*D, losses.kd_scale) divided by the assistant-token count of the whole window,
clip, step, zero_grad(set_to_none=True). At each epoch end: evaluate on the validation split and
call `report(metrics, save)`, where `save(dir)` writes a resumable checkpoint of the student. No Ray
in here: the loop runs in plain pytest.

What the loop sets up comes from below it: the rank and device (distributed.py), the tokenizer and
splits (data.load_data), the models on their scored positions (scored.ScoredLM, scoring.py),
the teacher cache (cache_plan.open_teacher_cache) and the W&B run (tracking.start_wandb).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from tune_kd import checkpoint, compiling, data, features, losses, models, on_policy, student_shape
from tune_kd.cache_plan import open_teacher_cache, prepare_teacher_cache  # noqa: F401  (prepare_: for prepare.py)
from tune_kd.checkpoint import Progress
from tune_kd.config import ExperimentConfig
from tune_kd.data import load_data, padding_id, shared_tokenizer  # noqa: F401  (shared_tokenizer: for prepare.py)
from tune_kd.distributed import setup_distributed
from tune_kd.errors import UserError
from tune_kd.losses import kd_options
from tune_kd.scored import ScoredLM, row_chunks
from tune_kd.scoring import scored_positions, teacher_ce, teacher_forward
from tune_kd.teacher_cache import TeacherCache
from tune_kd.teacher_server import RemoteTeacher, connect
from tune_kd.tracking import start_wandb

log = logging.getLogger(__name__)

Report = Callable[[dict, Callable[[Path], None]], None]
from tune_kd.results import METRICS  # noqa: E402,F401  (the metric names every epoch reports)


@dataclass
class TrainResult:
    student: torch.nn.Module
    tokenizer: object
    metrics: dict                 # the last epoch's metrics
    history: list[dict]           # every epoch's metrics


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then the seed's cosine from lr*1.1 down to lr/10."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr / 10 + 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def temperature_at(step: int, total: int, train_cfg) -> float:
    """The KD temperature at optimizer step `step` of `total` (seed 10.2): train.temperature, or with
    a linear / cosine schedule from train.temperature to train.final_temperature over training."""
    if train_cfg.temperature_schedule == "constant" or train_cfg.final_temperature is None:
        return train_cfg.temperature
    done = min(1.0, step / max(1, total - 1))
    remaining = 1.0 - done if train_cfg.temperature_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return train_cfg.final_temperature + (train_cfg.temperature - train_cfg.final_temperature) * remaining


def forward_pair(student, teacher, batch, precision, need_teacher: bool, cache=None):
    """The student's output (with grad) and the teacher's on the scored positions: the student's a
    scored.Scored whose logits are made a chunk at a time; the teacher's a Scored too (a local
    ScoredLM, inference mode), the rows of the teacher cache when one is given (a CacheRows, read
    per chunk), or a served teacher's rows (teacher a teacher_server.RemoteTeacher); plus extras:
    "features" (student's, teacher's) under feature distillation, "router_aux" for a
    mixture-of-experts student in training (each None otherwise)."""
    input_ids = batch["input_ids"].to(precision.device, non_blocking=True)
    labels = batch["labels"].to(precision.device, non_blocking=True)
    positions, targets = scored_positions(labels)
    # a served teacher works on this batch while the student runs its forward here
    pending = teacher.request(batch["input_ids"], positions) \
        if need_teacher and cache is None and isinstance(teacher, RemoteTeacher) else None
    with precision.autocast():
        student_out, student_features, router_aux = student(input_ids, positions)        # N rows
    teacher_out = teacher_features = None
    if need_teacher and cache is not None:
        teacher_out = cache.rows(batch["indices"]).to(precision.device, non_blocking=True)   # CacheRows, read per chunk
    elif pending is not None:
        teacher_out = pending.result()[0].to(precision.device)
    elif need_teacher:
        teacher_out, teacher_features = teacher_forward(teacher, input_ids, positions, precision)
    extras = {"features": (student_features, teacher_features) if student_features and teacher_features else None,
              "router_aux": router_aux}
    return student_out, teacher_out, targets, positions, extras


def backward_step(student, teacher, batch, cfg: ExperimentConfig, precision, columns, need_teacher: bool,
                  normalizer: float, scaler, sync: bool = True, temperature: float | None = None,
                  cache=None, on_policy_batch: bool = False) -> losses.LossParts:
    """One micro-batch: forward both models on the scored positions, the objective, backward.

    columns: the vocabulary columns the divergence compares (models.check_vocab); normalizer:
    assistant tokens of the whole accumulation window; sync=False skips DDP's gradient all-reduce
    (every micro-batch of a window but the last); temperature: this step's (temperature_at),
    train.temperature when None; cache: a teacher_cache.TeacherCache to read the teacher's outputs
    from instead of running it; on_policy_batch: the replies are the student's own samples
    (on_policy.py), so the loss is the divergence alone, T^k * D (alpha is CE's weight, and a
    sampled token is no label).
    """
    train_cfg = cfg.train
    temperature = train_cfg.temperature if temperature is None else temperature
    s_out, t_out, targets, _, extras = forward_pair(student, teacher, batch, precision, need_teacher, cache)
    parts = losses.distillation_loss(s_out, t_out, targets, 0.0 if on_policy_batch else train_cfg.alpha, temperature,
                                     normalizer, train_cfg.kd_loss, kd_options(train_cfg), columns)
    if extras["features"] is not None:
        parts.feature = features.feature_loss_sum(*extras["features"], train_cfg.feature_loss) / max(float(normalizer), 1.0)
        parts.loss = parts.loss + train_cfg.feature_weight * parts.feature
    if extras["router_aux"] is not None:
        # The seed adds the router's load-balancing loss to CE (so it weighs alpha); a per-batch mean,
        # weighted by this micro-batch's share of the window's tokens so accumulation stays exact.
        share = targets.numel() / max(float(normalizer), 1.0)
        parts.loss = parts.loss + train_cfg.alpha * extras["router_aux"] * share
    with (contextlib.nullcontext() if sync or not hasattr(student, "no_sync") else student.no_sync()):
        scaler.scale(parts.loss).backward()
    return parts


def optimizer_step(lm, optimizer, scaler, grad_clip: float) -> None:
    """Unscale (fp16), clip, step, zero_grad(set_to_none=True)."""
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(lm.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(student, teacher, val_data, pad_id, cfg: ExperimentConfig, precision, columns,
             rank: int = 0, world: int = 1, temperature: float | None = None,
             generation: on_policy.Generation | None = None) -> dict:
    """Validation metrics over the whole split (sharded across ranks and summed).

    val_ce and val_kl are at T = 1, so they compare across trials with different T and alpha;
    val_loss is the trial's own objective; val_acc is the share of conversations whose every
    assistant token is the argmax, i.e. what greedy decoding would answer exactly. With
    eval.generation_samples (and `generation`), val_gen_acc and val_gen_ce from the student's greedy
    replies to that many validation prompts (on_policy.py); NaN otherwise. Logits are made a chunk
    of rows at a time, as in training.
    """
    train_cfg = cfg.train
    temperature = train_cfg.temperature if temperature is None else temperature   # val_loss at the current T
    divergence, options = losses.KD_LOSSES[train_cfg.kd_loss], kd_options(train_cfg)
    student.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=precision.device)  # ce, kl@1, kd@T, tokens, right, rows
    batches = data.epoch_batches(val_data, train_cfg.batch_size, train_cfg.seed, epoch=0, shuffle=False)[rank::world]
    for indices in batches:
        batch = data.collate(val_data, indices, pad_id)
        s_out, t_out, targets, positions, _ = forward_pair(student, teacher, batch, precision, teacher is not None)
        rows = positions.nonzero()[:, 0]
        wrong = torch.zeros(positions.shape[0], device=precision.device)
        for lo, hi in row_chunks(s_out.rows, s_out.vocab):
            s_logits = s_out.logits(lo, hi)                                                   # (n, V)
            sums[0] += losses.ce_sum(s_logits, targets[lo:hi])
            wrong.index_add_(0, rows[lo:hi], (s_logits.argmax(-1) != targets[lo:hi]).float())
            if t_out is not None:
                t_logits, s_logits = losses.teacher_chunk(t_out, lo, hi, columns), s_logits[:, :columns]
                sums[1] += losses.forward_kl_sum(s_logits, t_logits, 1.0)
                sums[2] += divergence(s_logits, t_logits, temperature, **options)
        sums[3] += targets.numel()
        sums[4] += ((wrong == 0) & positions.any(1)).sum()
        sums[5] += positions.any(1).sum()
    gen_sums = torch.zeros(4, dtype=torch.float64, device=precision.device)
    if generation is not None and cfg.eval.generation_samples:
        subset = on_policy.generation_subset(val_data, cfg.eval.generation_samples)[rank::world]
        gen_sums = on_policy.generation_sums(student.lm, generation, val_data, subset, train_cfg.batch_size,
                                             teacher_ce_of(teacher, precision, columns), precision.autocast,
                                             precision.device)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(gen_sums)
    student.train()
    ce, kl, kd_t, tokens, right, rows = sums.tolist()
    tokens = max(tokens, 1.0)
    has_teacher = teacher is not None
    return {"val_ce": ce / tokens, "val_kl": kl / tokens if has_teacher else float("nan"),
            "val_loss": (train_cfg.alpha * ce
                         + (1 - train_cfg.alpha) * losses.kd_scale(train_cfg.kd_loss, temperature) * kd_t) / tokens,
            "val_acc": right / max(rows, 1.0), **on_policy.generation_metrics(gen_sums, has_teacher)}


def teacher_ce_of(teacher, precision, columns):
    """batch -> the teacher's CE sum on the batch's labelled tokens (val_gen_ce); None without a
    teacher. A served teacher answers it exactly (its target log-probs), whatever its top k."""
    if teacher is None:
        return None
    if isinstance(teacher, RemoteTeacher):
        return lambda batch: -float(teacher.rows(batch["input_ids"], scored_positions(batch["labels"])[0])[1].double().sum())
    return teacher_ce(teacher, precision, columns)


def gpu_peak_gib(device: torch.device) -> float:
    """The most GPU memory this process has allocated since train() began (GiB): a trial's real need,
    which resources.measure_trial_gpu_memory predicts. NaN off CUDA, as val_kl is without a teacher."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


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


def generation_setting(cfg: ExperimentConfig) -> str:
    """The setting that makes a run generate, named in its log and error lines."""
    train_cfg = cfg.train
    return ("train.on_policy_fraction" if train_cfg.on_policy_fraction > 0 else "train.seq_kd" if train_cfg.seq_kd
            else "eval.generation_samples")


def train(cfg: ExperimentConfig, report: Report | None = None, resume_from: str | Path | None = None,
          out_dir: str | Path | None = None, ddp: bool = False, use_wandb: bool | None = None,
          step_hook: Callable[[int, int, torch.nn.Module], None] | None = None,
          report_on_every_rank: bool = False, trial_key: str = "") -> TrainResult:
    """Distil cfg.teacher into cfg.student on cfg.data; returns the trained student and its metrics.

    report(metrics, save) is called once per epoch end with every name in METRICS; save(dir) writes
    a resumable checkpoint. resume_from continues a run from such a checkpoint exactly. out_dir
    receives a resumable `last/` checkpoint every train.save_interval steps (0: never mid-epoch).
    step_hook(epoch, step_in_epoch, student) runs after every optimizer step (fault drills use it).
    report_on_every_rank: call report on every rank (Ray Train's report is a barrier), not rank 0 only.
    trial_key: picks this run's replica of a served teacher (teacher_server.replicas).
    Raises TrainingDiverged when the loss stops being finite: checked every step on CPU, every
    train.log_interval steps and train.save_interval save on GPU (a check is a device sync), and
    before every evaluation.
    """
    train_cfg = cfg.train
    # ---- setup: device, precision, data, models, optimizer ----------------------------------
    rank, world, device = setup_distributed(ddp, train_cfg.device)
    precision = models.resolve_precision(train_cfg.dtype, device)
    if rank == 0:
        log.info("precision: %s (device %s)", precision.reason, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)   # gpu_peak_gib: this run's own peak
    torch.manual_seed(train_cfg.seed)
    tokenizer, train_data, val_data = load_data(cfg)
    pad_id = padding_id(tokenizer)
    # a served teacher (teacher_server.py: the search's actor on this node, or teacher_server.url)
    # stands in for a local one: this process never holds the teacher's weights (student.init: teacher
    # reads them once from teacher.path, a tensor at a time, to start the student)
    student_shape.check_student(cfg, tokenizer)   # a searched shape that is no model: ShapeRejected, before any work
    remote = connect(cfg, len(tokenizer), trial_key) if cfg.teacher else None
    lm, teacher_lm = models.make_models(cfg, tokenizer, precision, teacher_here=remote is None)
    student_params, embedding_params = student_shape.parameter_counts(lm)
    student_shape.check_budget(student_params, cfg.student.max_params)   # a student.path student, as loaded
    columns = models.check_vocab(len(tokenizer), models.vocab_rows(lm), remote.teacher_rows) if remote is not None \
        else models.check_compatibility(teacher_lm, lm, tokenizer)   # the vocabulary the divergence compares
    pairs = features.layer_map(train_cfg.feature_layers, lm.config.num_hidden_layers, teacher_lm.config.num_hidden_layers) \
        if train_cfg.feature_weight > 0 and teacher_lm is not None else []
    projector = features.FeatureProjector(len(pairs), lm.config.hidden_size, teacher_lm.config.hidden_size).to(device) \
        if pairs else None
    extra_state = {"feature_projector": projector} if projector is not None else {}   # trained, not exported
    teacher = ScoredLM(teacher_lm, [p[1] for p in pairs]) if teacher_lm is not None else remote
    trained = ScoredLM(lm, [p[0] for p in pairs], projector)   # every trained parameter
    student = trained if world == 1 else torch.nn.parallel.DistributedDataParallel(
        trained, device_ids=[device] if device.type == "cuda" else None)
    generates_in_training = train_cfg.on_policy_fraction > 0 or train_cfg.seq_kd
    need_teacher = teacher is not None and (train_cfg.alpha < 1.0 or bool(pairs) or generates_in_training)
    generation = on_policy.Generation(cfg, tokenizer, pad_id, [lm, teacher_lm if teacher_lm is not None else remote], generation_setting(cfg)) \
        if generates_in_training or cfg.eval.generation_samples else None
    # before any resume: top_k auto measures against the starting student, as every trial does.
    # Evaluation and on-policy batches keep the live teacher (exact val metrics; new sequences);
    # under seq_kd no batch is the data's, so the cache could serve none.
    reads_cache = need_teacher and not pairs and not train_cfg.seq_kd \
        and (train_cfg.on_policy_fraction < 1 or train_cfg.on_policy_start > 0)
    if remote is not None:   # the cache the search's driver built, if any (the key needs the teacher's weights)
        cache = TeacherCache(remote.cache_dir) if reads_cache and remote.cache_dir else None
    else:
        cache = open_teacher_cache(cfg, tokenizer, train_data, teacher, precision, columns, pad_id, trained)[0] \
            if reads_cache else None
    optimizer = torch.optim.AdamW(trained.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)
    progress = checkpoint.load_checkpoint(resume_from, lm, optimizer, scaler, extra_state) if resume_from \
        else Progress()
    counts = train_data.target_counts
    per_rank = len(data.epoch_batches(train_data, train_cfg.batch_size, train_cfg.seed, 0)) // world
    if per_rank < 1:
        raise UserError(f"data: {len(train_data)} training conversations make fewer batches than ranks ({world})")
    steps_per_epoch = math.ceil(per_rank / train_cfg.accumulation_steps)
    total_steps = train_cfg.epochs * steps_per_epoch
    save = lambda directory: checkpoint.save_checkpoint(Path(directory), lm, tokenizer, optimizer, scaler,  # noqa: E731
                                                        progress, extra_state)
    wandb_run = start_wandb(cfg) if rank == 0 and (cfg.logging.wandb if use_wandb is None else use_wandb) else None
    if rank == 0:
        log.info("train: %d conversations, %d val; %d epochs x %d steps; student %.2fM params%s", len(train_data),
                 len(val_data), train_cfg.epochs, steps_per_epoch, sum(p.numel() for p in lm.parameters()) / 1e6,
                 f", teacher {sum(p.numel() for p in teacher_lm.parameters()) / 1e6:.2f}M" if teacher_lm
                 else f", teacher served ({type(remote).__name__})" if remote else "")
    if generation is not None and (train_cfg.compile == "on" or train_cfg.compile == "auto" and device.type == "cuda"):
        # generate()'s cached decoding steps would recompile at every new length
        log.info("compile: off (train.compile %s): this run generates (%s)", train_cfg.compile, generation_setting(cfg))
    compiler = compiling.TrialCompile("off" if generation is not None else train_cfg.compile, device, (lm, teacher_lm),
                                      cfg.data.cache_dir,
                                      compiling.shapes_key(lm, teacher_lm, need_teacher and cache is None, device,
                                                           precision.autocast_dtype),
                                      steps_left=total_steps - progress.step, epoch=progress.epoch, record=rank == 0)
    run_started, steps_this_run = time.perf_counter(), 0
    speed = None                          # gen_tokens_per_s, measured at the first epoch end

    def stop_if_diverged(epoch_loss: torch.Tensor, epoch: int) -> None:
        if not loss_is_finite(epoch_loss, world):
            raise TrainingDiverged(f"loss became {epoch_loss.item()} at epoch {epoch + 1} step {progress.step} "
                                   f"(lr {optimizer.param_groups[0]['lr']:.3g}): lower train.learning_rate, "
                                   "tighten train.grad_clip, or use float32")
    for epoch in range(progress.epoch, train_cfg.epochs):
        # ---- one epoch: this rank's shard of the epoch's batches, in accumulation windows ----
        all_batches = data.epoch_batches(train_data, train_cfg.batch_size, train_cfg.seed, epoch)[: per_rank * world]
        shards = [all_batches[r::world] for r in range(world)]
        window_tokens = [sum(int(counts[b].sum()) for shard in shards for b in shard[w:w + train_cfg.accumulation_steps])
                         for w in range(0, per_rank, train_cfg.accumulation_steps)]
        loader = torch.utils.data.DataLoader(data.BatchList(train_data, shards[rank][progress.batch:], pad_id),
                                             batch_size=None, num_workers=train_cfg.num_workers,
                                             pin_memory=device.type == "cuda")
        epoch_loss = torch.zeros((), device=device)
        log_sums, log_steps = torch.zeros(3, device=device), 0      # loss, ce, kd since the last log line
        window_loss = torch.zeros((), device=device)
        epoch_tokens, epoch_steps, epoch_started = 0, 0, time.perf_counter()
        kind_seconds, kind_batches = {"off_policy": 0.0, "on_policy": 0.0}, {"off_policy": 0, "on_policy": 0}
        for micro, batch in enumerate(loader, start=progress.batch):
            window, last_in_window = micro // train_cfg.accumulation_steps, (micro + 1) % train_cfg.accumulation_steps == 0 \
                or micro + 1 == per_rank
            if micro % train_cfg.accumulation_steps == 0:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(progress.step, total_steps, train_cfg.learning_rate, train_cfg.warmup_iters)
                temperature = temperature_at(progress.step, total_steps, train_cfg)
            batch_started = time.perf_counter()
            warmed_up = on_policy.on_policy_started(progress.step, total_steps, train_cfg.on_policy_start)
            kind = "on_policy" if on_policy.is_on_policy(train_cfg.on_policy_fraction, train_cfg.seed, epoch, micro,
                                                         warmed_up) else "off_policy"
            # Each rank's share: DDP averages gradients over ranks, the window count is global.
            normalizer, batch_cache = window_tokens[window] / world, cache
            if kind == "on_policy" or train_cfg.seq_kd:
                data_targets = max(int(counts[batch["indices"]].sum()), 1)
                if kind == "on_policy":
                    batch, targets = generation.on_policy_batch(
                        lm, train_data, batch["indices"], on_policy.sampling_seed(train_cfg.seed, epoch, micro, rank),
                        precision.autocast)
                else:
                    batch, targets = generation.teacher_reply_batch(teacher_lm, train_data, batch["indices"],
                                                                    precision.autocast)
                # the batch's mean over its own reply tokens, weighted by its data share of the window
                normalizer, batch_cache = normalizer * targets / data_targets, None
            parts = backward_step(student, teacher, batch, cfg, precision, columns, need_teacher,
                                  normalizer, scaler, sync=last_in_window or world == 1,
                                  temperature=temperature, cache=batch_cache, on_policy_batch=kind == "on_policy")
            if generation is not None and device.type == "cuda":
                torch.cuda.synchronize(device)   # the per-kind cost below is the batch's, not a queue's
            kind_seconds[kind] += time.perf_counter() - batch_started
            kind_batches[kind] += 1
            log_sums += torch.stack([parts.loss.detach(), parts.ce.detach(), parts.kd.detach()])
            window_loss += parts.loss.detach()
            epoch_tokens += batch["num_tokens"]
            if not last_in_window:
                continue
            optimizer_step(trained, optimizer, scaler, train_cfg.grad_clip)
            if device.type == "cpu":
                models.release_freed_memory()
            compiler.after_step(epoch)
            progress.step, progress.batch, epoch_steps = progress.step + 1, micro + 1, epoch_steps + 1
            steps_this_run, log_steps = steps_this_run + 1, log_steps + 1
            epoch_loss += window_loss
            window_loss.zero_()
            if step_hook is not None:
                step_hook(epoch + 1, epoch_steps, lm)
            if divergence_check_due(progress.step, device, train_cfg):
                stop_if_diverged(epoch_loss, epoch)
            if progress.step % train_cfg.log_interval == 0 and rank == 0:
                loss, ce, kd = (log_sums / log_steps).tolist()
                elapsed = time.perf_counter() - run_started
                remaining = elapsed / steps_this_run * (total_steps - progress.step)
                log.info("epoch %d step %d/%d loss %.4f ce %.4f kd %.4f lr %.2e T %.3g tokens/s %.0f eta %.0fs",
                         epoch + 1, progress.step, total_steps, loss, ce, kd, optimizer.param_groups[0]["lr"], temperature,
                         epoch_tokens * world / (time.perf_counter() - epoch_started), remaining)
                if wandb_run:
                    wandb_run.log({"loss": loss, "ce": ce, "kd": kd, "lr": optimizer.param_groups[0]["lr"]},
                                  step=progress.step)
                log_sums.zero_()
                log_steps = 0
            if train_cfg.save_interval and progress.step % train_cfg.save_interval == 0 and out_dir and rank == 0:
                save(Path(out_dir) / "last")
        # ---- epoch end: evaluate, report, checkpoint --------------------------------------------
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - epoch_started
        stop_if_diverged(epoch_loss, epoch)
        progress.epoch, progress.batch = epoch + 1, 0
        train_loss = torch.stack([epoch_loss / max(epoch_steps, 1)])
        if world > 1:
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss.item(), "tokens_per_s": epoch_tokens * world / train_seconds,
                   **{f"{kind}_s_per_batch": kind_seconds[kind] / kind_batches[kind] if kind_batches[kind] else math.nan
                      for kind in kind_seconds}}
        # the unwrapped student: DDP's forward broadcasts buffers, a collective a rank without a batch never joins
        metrics.update(evaluate(trained, teacher, val_data, pad_id, cfg, precision, columns, rank, world,
                                temperature=temperature_at(progress.step, total_steps, train_cfg), generation=generation))
        metrics["gpu_peak_gib"] = gpu_peak_gib(device)
        if speed is None:   # once per run: the student's shape, not its weights, sets it
            speed_prompts = on_policy.prompts_and_replies(val_data, on_policy.generation_subset(
                val_data, student_shape.SPEED_PROMPTS))[0]
            speed = student_shape.generation_speed(lm, speed_prompts, pad_id, precision.autocast)
        metrics.update(student_params=student_params, student_embedding_params=embedding_params,
                       gen_tokens_per_s=speed)
        progress.history.append(metrics)
        if rank == 0:
            log.info("epoch %d: %s", epoch + 1, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if wandb_run:
                wandb_run.log(metrics, step=progress.step)
        if report is not None and (rank == 0 or report_on_every_rank):
            report(metrics, save)
        if rank == 0 and out_dir:
            save(Path(out_dir) / "last")
    if wandb_run:
        wandb_run.finish()
    final = progress.history[-1] if progress.history else {}
    return TrainResult(student=lm, tokenizer=tokenizer, metrics=final, history=progress.history)
