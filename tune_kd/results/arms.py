"""The control arms' results: where they are kept, read back, and judged against the best trial."""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

from tune_kd.config.experiment import ExperimentConfig
from tune_kd.results import reading

log = logging.getLogger(__name__)


CONTROL_KEY = "control"   # a control arm's Tune config: {"control": {"arm": name, train key: value, ...}}
CONTROLS_DIR = "controls"


CONTROLS_FILE = "controls.json"


NOISE_SIGMAS = 2.0   # a difference within this many seed standard deviations is not called a win


SUGGESTED_SEEDS = 3


OFF_POLICY = "best_off_policy"   # the best config trained off-policy only: what on-policy batches added


FRONT_SFT = "front_sft_"          # + a front trial's id: its shape and settings trained by plain SFT


def arm_results(controls_dir: Path, metric: str, mode: str) -> dict[str, dict]:
    """arm name -> {value: its best metric over epochs, metrics at that epoch, epochs, curve}."""
    out = {}
    for _, params, reports in reading.trial_folders(controls_dir):
        arm = params.get(CONTROL_KEY, {}).get("arm")
        at_best = reading.best_report(reports, metric, mode)
        if arm is None or at_best is None:
            continue
        out[arm] = {"value": at_best[metric], "metrics": {k: at_best[k] for k in reading.METRICS if k in at_best},
                    "epochs": max(r["epoch"] for r in reports),
                    "curve": [[r["epoch"], r[metric]] for r in reading.scored(reports, metric)]}
    return out


def compare(cfg: ExperimentConfig, best: dict, results: dict[str, dict], arms: dict[str, dict],
            experiment_dir: Path | None = None) -> dict:
    """The controls.json document: every arm next to the best trial, the verdict line, seed spread
    (from the best_seed_* arms, else what repeated trials in experiment_dir tell: repeat_noise)."""
    metric, mode = cfg.metric.name, cfg.metric.mode
    best_value = best[f"best_{metric}"]
    seeds = [results[name]["value"] for name in arms if name.startswith("best_seed_") and name in results]
    spread = None
    if seeds:
        spread = {"n": len(seeds), "mean": statistics.fmean(seeds), "min": min(seeds), "max": max(seeds),
                  "std": statistics.stdev(seeds) if len(seeds) > 1 else None}
    document = {"metric": metric, "mode": mode, "epochs": cfg.train.epochs, "seed": cfg.train.seed,
                "best": {"trial_id": best["trial_id"], "value": best_value,
                         "settings": {k: best.get(k) for k in cfg.parameters}},
                "arms": {name: {"settings": point, **results.get(name, {"value": None})} for name, point in arms.items()},
                "seeds_for_best": spread}
    document["repeat_noise"] = None if spread else repeat_noise(experiment_dir, metric, mode, cfg.train.epochs)
    document["verdict"] = verdict(metric, mode, best_value, results.get("plain_sft", {}).get("value"), spread,
                                  document["repeat_noise"])
    document["on_policy_verdict"] = on_policy_verdict(metric, mode, best_value, results)
    if document["on_policy_verdict"] is None and "on_policy_fraction" in cfg.parameters \
            and not best.get("on_policy_fraction"):
        document["on_policy_verdict"] = off_policy_best_verdict(metric, mode, best_value, experiment_dir)
    return document


def off_policy_best_verdict(metric: str, mode: str, best_value: float, experiment_dir: Path | None) -> str:
    """The "did on-policy help" line when the search's best trial is off-policy: no arm to train,
    the best on-policy trial says by how much it fell short (at its best epoch, however far it got)."""
    on_policy = []
    for _, params, reports in reading.trial_folders(experiment_dir) if experiment_dir else []:
        at_best = reading.best_report(reports, metric, mode)
        if params.get("on_policy_fraction") and at_best is not None:
            on_policy.append((at_best[metric], params["on_policy_fraction"], len(reports)))
    line = f"did on-policy help? no: the best trial trained off-policy (on_policy_fraction 0, {metric} {best_value:.4f})"
    if not on_policy:
        return line
    value, fraction, epochs = reading.best(on_policy, mode, key=lambda row: row[0])
    return (f"{line}; the best on-policy trial (on_policy_fraction {fraction:.2f}, {epochs} epoch(s)) reached "
            f"{value:.4f} = {value - best_value:+.4f}")


def on_policy_verdict(metric: str, mode: str, best_value: float, arm_outcomes: dict[str, dict]) -> str | None:
    """The "did on-policy help" line: the best trial against its own config trained off-policy
    (same epochs and seed), with each arm's val_gen_acc when measured; None without that arm.
    arm_outcomes: arm_results' dict (a name that would shadow the results module here)."""
    off = arm_outcomes.get(OFF_POLICY, {}).get("value")
    if off is None or best_value is None or math.isnan(best_value):
        return None
    diff = best_value - off
    helped = diff < 0 if mode == "min" else diff > 0
    gen = {name: arm_outcomes.get(name, {}).get("metrics", {}).get("val_gen_acc") for name in (OFF_POLICY, "plain_sft")}
    shown = ", ".join(f"{name} {value:.3f}" for name, value in gen.items() if value is not None and math.isfinite(value))
    return (f"did on-policy help? {'yes' if helped else 'no'}: {metric} {best_value:.4f} (the best trial) vs "
            f"{off:.4f} (its config off-policy, on_policy_fraction 0) = {diff:+.4f}"
            + (f"; val_gen_acc of the arms: {shown}" if shown and metric != "val_gen_acc" else ""))


def repeat_noise(experiment_dir: Path | None, metric: str, mode: str, epochs: int) -> dict | None:
    """The run-to-run noise the search's own trials show, without extra runs: the pooled standard
    deviation of the best metric within groups of trials that repeat every searched value (TPE does
    repeat a config, on a categorical space most). All trials share train.seed, so a repeat differs
    only by nondeterministic kernels: a lower bound on the seed noise. Only trials that ran all
    `epochs` count (an early stop changes the metric for another reason), and bit-identical repeats
    (a deterministic device) tell nothing. None when no group is left; else {"std", "trials"}."""
    if experiment_dir is None:
        return None
    groups: dict[str, list[float]] = {}
    for _, params, reports in reading.trial_folders(experiment_dir):
        scored = [r[metric] for r in reports if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        if scored and max(int(r.get("epoch", 0)) for r in reports) >= epochs:
            key = json.dumps(params, sort_keys=True, default=str)
            groups.setdefault(key, []).append(reading.best(scored, mode))
    spread = [values for values in groups.values() if len(set(values)) > 1]
    if not spread:
        return None
    squares = sum(sum((x - statistics.fmean(values)) ** 2 for x in values) for values in spread)
    return {"std": math.sqrt(squares / sum(len(values) - 1 for values in spread)),
            "trials": sum(len(values) for values in spread)}


def verdict(metric: str, mode: str, best_value: float, sft_value: float | None, spread: dict | None,
            noise: dict | None = None) -> str | None:
    """The "did distillation help" line; None without a plain-SFT result to compare with.
    With seeds_for_best, the re-trained mean stands for the best config (the search's own best is
    the luckiest of many draws) and a gap inside NOISE_SIGMAS seed deviations is called inconclusive.
    Without it, `noise` (repeat_noise) gives a lower bound when the trials repeat a config: a gap
    inside it is inconclusive, one beyond it is called with that caveat; with no estimate at all
    the line says so. Both name the setting that measures the seed noise."""
    if sft_value is None or best_value is None or math.isnan(best_value):
        return None
    distilled, which = best_value, "the best distilled student"
    if spread is not None:
        distilled, which = spread["mean"], f"the best config's mean over {spread['n']} seeds"
    diff = distilled - sft_value
    helped = diff < 0 if mode == "min" else diff > 0
    answer = "yes" if helped else "no"
    relative = f", {diff / abs(sft_value):+.1%}" if sft_value else ""
    note = ""
    if spread is not None and spread["std"] is not None:
        if abs(diff) <= NOISE_SIGMAS * spread["std"]:
            answer = f"inconclusive (within {NOISE_SIGMAS:g} x the seed spread {spread['std']:.4f})"
    elif noise is not None:
        bound = NOISE_SIGMAS * noise["std"]
        within = abs(diff) <= bound
        answer = "inconclusive" if within else answer
        note = (f"; {'within' if within else 'beyond'} the seed noise as far as the trials show it (±{bound:.4f}: "
                f"{NOISE_SIGMAS:g} x the std of {noise['trials']} full-length trials repeating a config, same seed; "
                f"a lower bound: controls.seeds_for_best: {SUGGESTED_SEEDS} measures it)")
    elif spread is None:
        note = (f"; the seed noise is unknown (no full-length trials repeat a config): set "
                f"controls.seeds_for_best: {SUGGESTED_SEEDS} to measure it")
    return (f"did distillation help? {answer}: {metric} {distilled:.4f} ({which}) vs {sft_value:.4f} "
            f"(plain SFT, alpha 1) = {diff:+.4f}{relative}{note}")


def format_comparison(document: dict) -> str:
    """The control-arm lines the search prints at its end."""
    metric = document["metric"]
    took = f", {document['seconds']:.0f} s" if "seconds" in document else ""
    header = f"control arms ({document['epochs']} epochs, seed {document['seed']}{took}; {metric} at each one's best epoch):"
    settings = lambda point: ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"  # noqa: E731
                                       for k, v in point.items())
    rows = [("best trial " + document["best"]["trial_id"], document["best"]["value"], settings(document["best"]["settings"]))]
    for name, arm in document["arms"].items():
        rows.append((name, arm["value"], settings(arm["settings"])))
    width = max(len(r[0]) for r in rows)
    lines = [header] + [f"  {name.ljust(width)}  {'failed' if value is None else f'{value:.4f}':>8}  {point}"
                        for name, value, point in rows]
    spread = document["seeds_for_best"]
    if spread:
        std = f" ± {spread['std']:.4f}" if spread["std"] is not None else ""
        lines.append(f"best config over {spread['n']} more seed(s): {metric} {spread['mean']:.4f}{std} "
                     f"(min {spread['min']:.4f}, max {spread['max']:.4f}); the search's own best was "
                     f"{document['best']['value']:.4f}")
    for line in ("verdict", "on_policy_verdict"):
        if document.get(line):
            lines.append(document[line])
    return "\n".join(lines)
