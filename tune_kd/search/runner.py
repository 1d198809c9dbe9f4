"""The search as a recipe (`tune-kd search` / `python -m tune_kd.search` run it: cli/search.py).

Ray Tune runs `trainable.make_trainable(cfg)` for `search.num_samples` configs proposed by Optuna
(samplers.py: a Gaussian process or TPE; the study in results/<name>/optuna.db) and stopped early by
ASHA on our `epoch` counter (searcher.py), then writes trials.csv and best.json, prints the table and
exports the best student to results/<name>/best_student. --resume continues an interrupted search
(--retry-errored re-runs its errored trials); whatever a user can get wrong is checked before Ray starts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig, absolute_paths
from tune_kd.config.files import NO_ROOM, atomic_write_text, disk_writes
from tune_kd.model import hardware
from tune_kd.results import arms, export, front, reading, report
from tune_kd.search import controls, interrupt, prepare, resources, space, teacher_actor
from tune_kd.search.preflight import LOOPBACK, preflight
from tune_kd.search.samplers import sampler_line
from tune_kd.search.warm_start import WarmStart
from tune_kd.search.teacher_point import write_teacher_point
from tune_kd.search.tracking import make_callbacks
from tune_kd.teacher import served

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------

def write_summary(experiment_dir: Path, cfg: ExperimentConfig, rows: list[dict]) -> dict | None:
    """trials.csv (every row) and best.json (the best rankable row, returned; None when no trial
    has a finite value and ended well: reading.rankable), each written whole or not at all."""
    columns = list(rows[0]) if rows else ["trial_id"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(experiment_dir / reading.SUMMARY_FILE, table.getvalue())
    key = f"best_{cfg.metric.name}"
    scored = [r for r in rows if reading.rankable(r, key)]
    if not scored:
        return None
    best = reading.best(scored, cfg.metric.mode, key=lambda r: r[key])
    atomic_write_text(experiment_dir / "best.json", json.dumps(best, indent=1))
    return best


def check_some_trial_converged(rows: list[dict], cfg: ExperimentConfig) -> None:
    """Every trial diverged: one line saying so and what to change (a UserError, exit 2), instead of
    a best trial, an export and a report of NaN students."""
    if rows and all(r["status"] == "DIVERGED" for r in rows):
        lowest = min(r["learning_rate"] for r in rows) if "learning_rate" in rows[0] else cfg.train.learning_rate
        raise UserError(f"every one of the {len(rows)} trials diverged (loss NaN or inf; the first: {rows[0]['error']}); "
                        f"nothing is exported: lower train.learning_rate (the lowest tried was {lowest:.3g}), keep "
                        "train.grad_clip on, or train in float32 (train.dtype)")


def trials_out_of_room(rows: list[dict]) -> str | None:
    """The one line for trials that errored because a checkpoint found the disk full (their error
    is files.no_room_line's), None when none did: the rest of the search is summarised and kept."""
    full = [r for r in rows if r["status"] == "ERROR" and any(why in r["error"] for why in NO_ROOM.values())]
    if not full:
        return None
    cause = full[0]["error"].split(": ", 1)[-1] if full[0]["error"].startswith(("tune_kd.", "ray.")) else full[0]["error"]
    return (f"{len(full)} trial(s) stopped on a full disk ({', '.join(r['trial_id'] for r in full)}): {cause}; then "
            "rerun with --resume --retry-errored to continue them from their last checkpoint (the finished trials "
            "and the summary above are kept)")


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trial reported a result)"
    columns = [c for c in rows[0] if c != "error"]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------

def teacher_cache_savings(cache, builder_pid: int, trial_epochs: int) -> str:
    """What the teacher cache saved: each trial-epoch read it instead of running the teacher over
    the training split, at the cost of one such pass when the cache was built (by the process
    builder_pid: the driver, or its task on a GPU node)."""
    meta = cache.meta
    built = "built for this search" if meta.get("built_by_pid") == builder_pid else "built by an earlier run"
    return (f"teacher cache ({built}: one teacher pass over {meta['examples']} conversations, {meta['build_seconds']:.1f} s, "
            f"{cache.nbytes / 2**20:.1f} MB): {trial_epochs} trial-epochs read it instead of running the teacher, "
            f"about {trial_epochs} teacher passes (~{trial_epochs * meta['build_seconds']:.0f} s of teacher compute at "
            f"the build's pace) saved")


def trial_class(trial_cfg: ExperimentConfig, experiment_dir: Path, per_trial: dict, name: str):
    """The Tune trainable for trial_cfg, holding `per_trial` (resources.trial_resources), under a
    readable class name."""
    from ray import tune
    from ray.tune.trainable import wrap_function

    from tune_kd.search import trainable

    distill = trainable.make_trainable(trial_cfg, experiment_dir)
    distill.__name__ = distill.__qualname__ = name
    # Ray wraps a function trainable in classes named ImplicitFunc / ResourceTrainable; a named
    # subclass makes the trial actors readable in the dashboard and the state API.
    # A data-parallel trial's actor only drives Ray Train, whose workers ask for the resources themselves.
    actor = {"cpu": resources.DRIVER_CPU} if per_trial["workers"] > 1 else {"cpu": per_trial["cpu"], "gpu": per_trial["gpu"]}
    base = tune.with_resources(wrap_function(distill), actor)
    return type(name, (base,), {"__qualname__": name})


@dataclass
class Plan:
    """How the trials run on the Ray cluster at hand (size_trials)."""

    per_trial: dict               # resources.trial_resources: cpu, gpu, workers of one trial
    placed: dict                  # resources.place_trials: the teacher cache built, why, by which process
    parallel: int                 # trials at a time
    trial_cfg: ExperimentConfig   # cfg as a trial runs it: absolute paths, the resolved GPU share and serving
    trainable: type               # the Tune trainable of the search's trials
    served: teacher_actor.Served | None = None   # the teacher actors, when the search serves its teacher


@interrupt.guarded   # Ctrl-C, SIGTERM: exit 130 with one line, resumable, no summary
def run_search(cfg: ExperimentConfig, source: str, storage: str | None = None, address: str | None = None,
               resume: bool = False, num_cpus: int | None = None, callbacks: list | None = None,
               export_best: bool = True, dashboard_host: str | None = LOOPBACK, trial_logs: bool = False,
               retry_errored: bool = False, grid: list[dict] | None = None) -> dict:
    """Run (or resume) the search described by cfg; returns the summary dict (rows, best, export,
    controls, report). A resume leaves errored trials ERROR unless retry_errored re-runs them.

    grid: instead of searching, train exactly these points (one per trial, in order; each names every
    key of cfg.parameters, and cfg.search.num_samples is their count): a recorded table of learning
    curves (bench/curves/record.py) is such a run, resumable like any search.

    dashboard_host: where a local Ray's dashboard listens (None: no dashboard); see check_dashboard.
    trial_logs: also stream every trial's log lines to this terminal (they are always written to
    stdout.log / stderr.log in the trial's folder; the terminal gets search/progress.py's lines).

    The steps, in order: preflight (before Ray starts) -> start_ray -> size_trials -> build_tuner -> fit ->
    summarize_and_export -> run_control_arms -> write_report. summary["phase_seconds"]: the
    wall time of each (progress.PHASE_NAMES), also printed as the last line.
    """
    from tune_kd.search.progress import phase_line, timed   # progress imports Ray: not before a command runs

    search_started, phases = time.perf_counter(), {}
    root = Path(storage or "results").resolve()
    experiment_dir = root / cfg.name
    with timed(phases, "preflight"):
        prepared, resume, warm = preflight(cfg, source, experiment_dir, address, resume, dashboard_host)
        print("\n".join([sampler_line(cfg, grid)] + ([warm.line()] if warm else [])), flush=True)
    with timed(phases, "ray_start"):
        context = start_ray(address, num_cpus, dashboard_host, trial_logs)
    try:   # a Ray this search started goes with it, also on an error or Ctrl-C
        with timed(phases, "size_trials"):
            plan = size_trials(cfg, source, address, experiment_dir, prepared)
        try:
            started = time.perf_counter()
            with timed(phases, "trials"):
                tuner = build_tuner(cfg, root, experiment_dir, plan, resume, retry_errored, callbacks, grid, warm)
                errors, trial_ids = fit(tuner)
            with timed(phases, "summary_export"), disk_writes(experiment_dir):
                summary = summarize_and_export(cfg, experiment_dir, errors, trial_ids, plan, prepared, started, export_best)
            with timed(phases, "control_arms"):
                run_control_arms(cfg, summary, experiment_dir, plan, resume)
            if plan.served is not None:
                summary["served_teacher"] = plan.served.summary_line()
                print(summary["served_teacher"])
        finally:
            if plan.served is not None:   # the teacher's actors go with the search (also on errors and Ctrl-C)
                plan.served.stop()
        # the teacher's own point, once the served teacher has let go of its GPU: the verdict names it
        with timed(phases, "teacher_point"):
            summary["teacher_point"] = write_teacher_point(plan.trial_cfg, experiment_dir, plan.per_trial)
        with timed(phases, "report"), disk_writes(experiment_dir):
            print_verdict(cfg, summary, experiment_dir)
            write_report(summary, experiment_dir)
    finally:
        if context is not None and address is None:
            import ray

            with timed(phases, "ray_stop"):
                ray.shutdown()
    summary["phase_seconds"] = {**phases, "total": time.perf_counter() - search_started}
    print(phase_line(summary["phase_seconds"]))
    return summary


def start_ray(address: str | None, num_cpus: int | None, dashboard_host: str | None, trial_logs: bool):
    """Start a local Ray (or join the cluster at `address`) unless one is initialized already; returns
    Ray's context, None when this process was already connected."""
    import ray

    if ray.is_initialized():
        return None
    # joining a cluster: its head already runs (or not) the dashboard
    dashboard = {} if address is not None else {"include_dashboard": False} if dashboard_host is None else \
        {"include_dashboard": True, "dashboard_host": dashboard_host}
    # "local": a Ray of our own even when one runs here already (Ray would join one started with
    # `ray start` and refuse num_cpus); joining takes --address
    context = ray.init(address=address or "local", num_cpus=num_cpus if address is None else None,
                       logging_level=logging.WARNING, log_to_driver=trial_logs, **dashboard)
    interrupt.take_sigterm_back()   # ray.init set its own SIGTERM handlers: a stop must still exit 130
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s (token authentication: `ray get-auth-token` prints the token "
                 "to paste at its login page)", context.dashboard_url)
    return context


def size_trials(cfg: ExperimentConfig, source: str, address: str | None, experiment_dir: Path,
                prepared: prepare.Prepared) -> Plan:
    """Fit the trials to the cluster: its GPUs and nodes checked, the teacher cache built where the
    trials run (in their precision; gpu auto measures a trial there), how many run at a time, and
    the trainable they run."""
    import ray

    cluster = ray.cluster_resources()
    if address is not None:
        resources.check_gpus(cfg, int(cluster.get("GPU", 0)), source)
        resources.check_node_fit(cfg, ray.nodes(), source)
    per_trial, placed = resources.place_trials(absolute_paths(cfg), int(cluster.get("GPU", 0)), source)
    prepared.add_teacher_cache(placed["teacher_cache"], placed["why"])
    hardware.release_freed_memory()   # what building the caches freed: the driver stays up for the whole search
    log.info("%s", prepared.lines[-1])
    parallel = resources.concurrency(cfg, per_trial, cluster.get("CPU", 1), cluster.get("GPU", 0))
    # trials run in other working directories (absolute paths) and use the resolved GPU share
    trial_cfg = absolute_paths(cfg).replace(resources=dataclasses.replace(cfg.resources, gpu_per_trial=per_trial["gpu"]))
    trial_cfg, served, parallel = serve_teacher(trial_cfg, placed, per_trial, parallel, cluster, ray.nodes())
    # Without this Ray keeps one pending trial at a time for searchers like Optuna's.
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(parallel)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"   # make_callbacks picks them explicitly
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # per-epoch checkpoints are the design
    # Ray's new output engine prints its own experiment box and a TensorBoard hint into its staging
    # folder under /tmp; search/progress.py's lines and the hint in build_tuner replace both
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    log.info("search %s: %d trials, up to %d at a time, %s per trial", cfg.name, cfg.search.num_samples, parallel,
             per_trial)
    trainable = trial_class(trial_cfg, experiment_dir, per_trial, f"distill_{cfg.name.replace('-', '_')}")
    return Plan(per_trial, placed, parallel, trial_cfg, trainable, served)


def serve_teacher(trial_cfg: ExperimentConfig, placed: dict, per_trial: dict, parallel: int, cluster: dict,
                  nodes: list[dict]):
    """(trial_cfg with teacher_server.mode resolved to on or off, the started teacher actors or None,
    trials at a time): served.decide's rule, priced with placed["teacher_costs"] (measured where the
    trials run) for the trials a node runs each way; the actors started before any trial
    (teacher_actor.start), their CPUs and GPUs taken from what the trials share; a url's engine
    checked once here, so a wrong one stops the search before its trials."""
    hosts = teacher_actor.trial_nodes(nodes) or [n["NodeID"] for n in nodes if n.get("Alive")]
    per_node = math.ceil(parallel / max(1, len(hosts)))
    cache_used, costs = placed.get("teacher_cache") is not None, placed.get("teacher_costs")
    serve, why = served.decide(trial_cfg, per_node, cache_used)   # the config's answer, before any cost
    if serve:   # what a server takes from the trials, then the cost rule where the driver priced it
        on = trial_cfg.replace(teacher_server=dataclasses.replace(trial_cfg.teacher_server, mode="on"))
        gpus_per_node = max((n["Resources"].get("GPU", 0) for n in nodes if n.get("Alive")), default=0)
        gpus = teacher_actor.server_gpus(on, gpus_per_node, per_trial["gpu"])
        copies = len(hosts) * on.teacher_server.replicas
        served_parallel = resources.concurrency(on, per_trial, max(cluster.get("CPU", 1) - copies * on.teacher_server.cpus,
                                                                   per_trial["cpu"]),
                                                max(cluster.get("GPU", 0) - copies * gpus, 0.0))
        # the server works on the trials' own compute unless it holds a device of its own: a whole GPU
        # apart from theirs, or CPUs of its own when the trials run on CPUs
        own_device = gpus >= 1 if per_trial["gpu"] else on.teacher_server.cpus >= 1
        if costs is not None:
            serve, why = served.decide(trial_cfg, per_node, cache_used, costs,
                                       math.ceil(served_parallel / max(1, len(hosts))), shared_compute=not own_device)
    log.info("teacher server: %s", why)
    if trial_cfg.teacher_server.url and trial_cfg.teacher is not None:
        from tune_kd.data import inputs

        served.HttpRemote(trial_cfg, len(inputs.run_tokenizers(trial_cfg).of_teacher))   # checks the endpoint
    resolved = trial_cfg.replace(teacher_server=dataclasses.replace(trial_cfg.teacher_server,
                                                                    mode="on" if serve else "off"))
    if not serve:
        return resolved, None, parallel
    actors = teacher_actor.start(resolved, placed["served_layout"], placed.get("teacher_cache"), hosts, gpus, why,
                                 teacher_actor.batching_wait(costs))
    return resolved, actors, served_parallel


def build_tuner(cfg: ExperimentConfig, root: Path, experiment_dir: Path, plan: Plan, resume: bool, retry_errored: bool,
                callbacks: list | None, grid: list[dict] | None = None, warm: WarmStart | None = None):
    """The Tune Tuner: a new one (Optuna's searcher, the scheduler, checkpoints, callbacks), or the
    interrupted one restored with resume."""
    from ray import tune

    from tune_kd.search.progress import SearchProgress, trial_log_options
    from tune_kd.search.searcher import make_scheduler, make_searcher

    progress = SearchProgress(cfg.metric.name, cfg.metric.mode, cfg.search.num_samples, cfg.train.epochs, plan.parallel)
    if cfg.logging.tensorboard:
        print(f"TensorBoard: tensorboard --logdir {experiment_dir}", flush=True)
    if resume:
        if not tune.Tuner.can_restore(str(experiment_dir)):
            raise UserError(f"{experiment_dir}: nothing to resume (no Ray experiment state there)")
        return tune.Tuner.restore(str(experiment_dir), trainable=plan.trainable, resume_errored=retry_errored)
    return tune.Tuner(
        plan.trainable,
        param_space=space.tune_domains(cfg),
        tune_config=tune.TuneConfig(search_alg=make_searcher(cfg, experiment_dir, grid, warm), scheduler=make_scheduler(cfg),
                                    num_samples=cfg.search.num_samples, max_concurrent_trials=plan.parallel,
                                    # the searcher and ASHA hold the metric (and a size objective) themselves
                                    metric=None if cfg.scheduler.type == "asha" or cfg.search.objectives else cfg.metric.name,
                                    mode=None if cfg.scheduler.type == "asha" or cfg.search.objectives else cfg.metric.mode,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
                                    # the next trial runs in a finished one's worker: no new process importing
                                    # torch and transformers per trial (trainable.start_in_process)
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=str(root),
            callbacks=make_callbacks(cfg) + [progress] + list(callbacks or []), **trial_log_options(),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_per_trial,
                                                    checkpoint_score_attribute=cfg.metric.name,
                                                    checkpoint_score_order=cfg.metric.mode),
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures), verbose=0),
    )


def fit(tuner) -> tuple[dict[str, tuple[str, dict]], set[str]]:
    """Run the trials; returns (trial id -> (last error line, config) of each errored trial, every
    trial id the search knows)."""
    grid = interrupt.fit(tuner)   # Ctrl-C, SIGTERM: Ray saves its state, then KeyboardInterrupt
    errors = {Path(r.path).name.removeprefix("trial_"): (str(r.error).strip().splitlines()[-1], r.config)
              for r in grid if r.error}
    return errors, {Path(r.path).name.removeprefix("trial_") for r in grid}


def summarize_and_export(cfg: ExperimentConfig, experiment_dir: Path, errors: dict, trial_ids: set[str], plan: Plan,
                         prepared: prepare.Prepared, started: float, export_best: bool) -> dict:
    """trials.csv and best.json, the table and what the teacher cache saved printed, and the best
    student exported (unless export_best is off); returns the summary dict."""
    rows = reading.trial_rows(experiment_dir, cfg, errors, trial_ids)
    best = write_summary(experiment_dir, cfg, rows)
    check_some_trial_converged(rows, cfg)
    summary = {"rows": rows, "best": best, "seconds": time.perf_counter() - started, "dir": experiment_dir,
               "parallel": plan.parallel, "resources": plan.per_trial}
    print(format_table(rows))
    print(f"{len(rows)} trials in {summary['seconds']:.0f} s -> {experiment_dir / 'trials.csv'}")
    if prepared.teacher_cache is not None:
        print(teacher_cache_savings(prepared.teacher_cache, plan.placed["pid"], sum(int(r["epochs"]) for r in rows)))
    if best is not None and export_best:
        target = experiment_dir / export.export_name(cfg)
        candidate = export.export(experiment_dir, target, best["trial_id"])   # the trial best.json names
        summary["export"] = candidate
        print(f"best: trial {candidate.trial_id} epoch {candidate.metrics['epoch']} {cfg.metric.name} "
              f"{candidate.value:.4f} -> {target} (reload verified)")
        print(f"export another: python -m tune_kd.export {experiment_dir} --out DIR [--trial ID]")
        if cfg.search.algorithm == "optuna":
            print(f"study: optuna-dashboard sqlite:///{experiment_dir / 'optuna.db'}")
    return summary


def run_control_arms(cfg: ExperimentConfig, summary: dict, experiment_dir: Path, plan: Plan, resume: bool) -> None:
    """The control arms next to the best trial (controls.py), into summary["controls"] (print_verdict
    prints them); nothing without a best trial or with every arm off."""
    if summary["best"] is None:
        return
    arm_trainable = trial_class(plan.trial_cfg, experiment_dir / arms.CONTROLS_DIR, plan.per_trial,
                                f"control_{cfg.name.replace('-', '_')}")
    shape_front = front.experiment_front(experiment_dir)
    outcome = controls.run_controls(cfg, summary["best"], experiment_dir, arm_trainable, plan.parallel,
                                    make_callbacks(cfg), resume, shape_front)
    if outcome is not None:
        summary["controls"] = outcome


def print_verdict(cfg: ExperimentConfig, summary: dict, experiment_dir: Path) -> None:
    """The control arms and the verdict lines, judged again with the teacher's point
    (summary["teacher_point"]) and rewritten to controls.json; a size/quality search's front lines."""
    comparison = summary.get("controls")
    if comparison is not None:
        arms.judge(comparison, summary.get("teacher_point"))
        arms.write_controls(experiment_dir, comparison)
        print(arms.format_comparison(comparison))
    shape_front = front.experiment_front(experiment_dir) if summary["best"] is not None else None
    if shape_front:
        print(front.summary_lines(shape_front, experiment_dir, cfg.search.size_objective, cfg.metric.name, cfg.metric.mode,
                                  cfg.search.within_percent))


def write_report(summary: dict, experiment_dir: Path) -> None:
    """report.html (report.py), its path into summary["report"] and printed."""
    summary["report"] = report.build(experiment_dir)
    print(f"report: {summary['report']} (rebuild: python -m tune_kd.report {experiment_dir})")
