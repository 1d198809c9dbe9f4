"""Control arms: the reference runs that say whether the search, and distillation, paid off.

After the search, with the same data, epochs and train.seed as its trials:

    plain_sft       the best trial's settings with alpha = 1: CE only, the teacher never runs
    front_sft_<id>  a size/quality search (front.py): each front student's shape and settings with
                    alpha = 1, so the report can set distillation against plain SFT at every size
    minimind_defaults  MiniMind's defaults for the knobs the search tunes: lr 5e-6, alpha 0, T 1
    best_seed_<s>   the best trial's settings re-trained with train.seed s, and
    plain_sft_seed_<s>  plain SFT re-trained with it (controls.seeds: s = train.seed + 1 .. + N): the
                    seed noise the verdict weighs the gap against (arms.judge)

They run as one more Tune experiment in results/<name>/controls/ (no early stopping: every arm
gets the full budget). The comparison goes to results/<name>/controls.json and the terminal; its
headline is the "did distillation help" line: the best distilled student against plain SFT.

The plain-SFT arm reuses the learning rate tuned for distillation; it answers "what if the
teacher were dropped from the best run", not "what would a separately tuned SFT run reach".
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tune_kd.config.experiment import ExperimentConfig
from tune_kd.results.arms import (
    BEST_SEED,
    CONTROL_KEY,
    CONTROLS_DIR,
    FRONT_SFT,
    OFF_POLICY,
    SFT_SEED,
    arm_results,
    compare,
    write_controls,
)
from tune_kd.search import interrupt

log = logging.getLogger(__name__)

# MiniMind's train_distillation.py: --learning_rate 5e-6, train_epoch(alpha=0.0, temperature=1.0)
MINIMIND_DEFAULTS = {"learning_rate": 5e-6, "alpha": 0.0, "temperature": 1.0}
FRONT_SFT_ARMS = 6                # front students (besides the best) given a plain-SFT arm


def tuned_values(cfg: ExperimentConfig, params: dict) -> dict:
    """The searched values a trial ran with (a trials.csv row or params.json)."""
    return {name: params[name] for name in cfg.parameters if params.get(name) is not None}


def sft_point(cfg: ExperimentConfig, tuned: dict) -> dict:
    """A trial's settings trained without the teacher: alpha 1, nothing on-policy, no teacher replies."""
    return {**tuned, "alpha": 1.0,
            **({"on_policy_fraction": 0.0} if tuned.get("on_policy_fraction", cfg.train.on_policy_fraction) > 0 else {}),
            **({"seq_kd": False} if tuned.get("seq_kd", cfg.train.seq_kd) else {})}


def arm_points(cfg: ExperimentConfig, best_params: dict, front: list | None = None) -> dict[str, dict]:
    """arm name -> the train settings it overrides (a point for space.apply_point). front (a size/quality
    search's front.Point list): plain SFT of each front student's shape too (front_sft_<trial id>), up to
    FRONT_SFT_ARMS of them, cheapest first."""
    tuned = tuned_values(cfg, best_params)
    on_policy = tuned.get("on_policy_fraction", cfg.train.on_policy_fraction) > 0
    arms = {}
    if cfg.teacher is not None and cfg.controls.plain_sft:   # no teacher: nothing on-policy, no teacher replies
        arms["plain_sft"] = sft_point(cfg, tuned)
        others = [p for p in front or [] if p.trial_id != best_params.get("trial_id")]
        for point in others[:FRONT_SFT_ARMS]:
            arms[f"{FRONT_SFT}{point.trial_id}"] = sft_point(cfg, tuned_values(cfg, point.params))
    if on_policy and cfg.controls.best_off_policy:
        arms[OFF_POLICY] = {**tuned, "on_policy_fraction": 0.0}
    if cfg.teacher is not None and cfg.controls.minimind_defaults:
        arms["minimind_defaults"] = dict(MINIMIND_DEFAULTS)
    for offset in range(1, cfg.controls.seeds + 1):   # each seed's pair side by side: they run together
        seed = cfg.train.seed + offset
        arms[f"{BEST_SEED}{seed}"] = {**tuned, "seed": seed}
        if "plain_sft" in arms:
            arms[f"{SFT_SEED}{seed}"] = {**arms["plain_sft"], "seed": seed}
    return arms


def run_controls(cfg: ExperimentConfig, best: dict, experiment_dir: Path, trainable, parallel: int,
                 callbacks: list, resume: bool, front: list | None = None) -> dict | None:
    """Train every control arm (or finish them, with resume) and return the comparison
    (also written to controls.json); None when the config asks for no arm."""
    from ray import tune

    from tune_kd.search.progress import SearchProgress, trial_log_options

    arms = arm_points(cfg, best, front)
    if not arms:
        return None
    started = time.perf_counter()
    callbacks = callbacks + [SearchProgress(cfg.metric.name, cfg.metric.mode, len(arms), cfg.train.epochs,
                                            min(parallel, len(arms)), label="controls")]
    controls_dir = experiment_dir / CONTROLS_DIR
    log.info("control arms: %s (%d epochs, seed %d, up to %d at a time)", ", ".join(arms), cfg.train.epochs,
             cfg.train.seed, parallel)
    if resume and tune.Tuner.can_restore(str(controls_dir)):
        tuner = tune.Tuner.restore(str(controls_dir), trainable=trainable, resume_errored=True)
    else:
        grid = [{"arm": name, **point} for name, point in arms.items()]
        tuner = tune.Tuner(
            trainable,
            param_space={CONTROL_KEY: tune.grid_search(grid)},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=parallel,
                                        trial_dirname_creator=lambda t: f"{t.config[CONTROL_KEY]['arm']}_{t.trial_id}",
                                        reuse_actors=True),   # as the search's trials (runner.build_tuner)
            run_config=tune.RunConfig(
                name=CONTROLS_DIR, storage_path=str(experiment_dir), callbacks=callbacks, **trial_log_options(),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.metric.name,
                                                        checkpoint_score_order=cfg.metric.mode),
                failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures), verbose=0))
    interrupt.fit(tuner)   # Ctrl-C, SIGTERM: Ray saves the arms' state, then KeyboardInterrupt (interrupt.py)
    comparison = compare(cfg, best, arm_results(controls_dir, cfg.metric.name, cfg.metric.mode), arms, experiment_dir)
    comparison["seconds"] = time.perf_counter() - started
    write_controls(experiment_dir, comparison)
    return comparison


