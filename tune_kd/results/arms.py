"""The control arms' results: where they are kept, read back, and judged against the best trial."""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

from tune_kd.config.experiment import ExperimentConfig
from tune_kd.config.files import atomic_write_text
from tune_kd.results import reading

log = logging.getLogger(__name__)


CONTROL_KEY = "control"   # a control arm's Tune config: {"control": {"arm": name, train key: value, ...}}
CONTROLS_DIR = "controls"


CONTROLS_FILE = "controls.json"


NOISE_SIGMAS = 2.0   # a difference within this many seed standard deviations is not called a win


SUGGESTED_SEEDS = 2


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


BEST_SEED = "best_seed_"          # + a train.seed: the best config re-trained on it (controls.seeds)
SFT_SEED = "plain_sft_seed_"      # + a train.seed: plain SFT re-trained on it (controls.seeds)
CONFIDENCE = 0.95                 # the gap's interval: inside it, "within noise"
TASK_METRICS = {"val_acc": "the task's exact answers", "val_gen_acc": "exact answers of generated replies"}


def compare(cfg: ExperimentConfig, best: dict, results: dict[str, dict], arms: dict[str, dict],
            experiment_dir: Path | None = None, teacher: dict | None = None) -> dict:
    """The controls.json document: every arm next to the best trial, the seed spread of the best
    config and of plain SFT (controls.seeds), and the verdict lines (judge; with the teacher's point
    when given; else what repeated trials in experiment_dir tell: repeat_noise)."""
    metric, mode = cfg.metric.name, cfg.metric.mode
    best_value = best[f"best_{metric}"]
    document = {"metric": metric, "mode": mode, "epochs": cfg.train.epochs, "seed": cfg.train.seed,
                "best": {"trial_id": best["trial_id"], "value": best_value,
                         "settings": {k: best.get(k) for k in cfg.parameters}},
                "arms": {name: {"settings": point, **results.get(name, {"value": None})} for name, point in arms.items()}}
    document["seeds_for_best"] = spread_of([results[n]["value"] for n in arms if n.startswith(BEST_SEED) and n in results])
    document["repeat_noise"] = None if document["seeds_for_best"] else \
        repeat_noise(experiment_dir, metric, mode, cfg.train.epochs)
    judge(document, teacher)
    document["on_policy_verdict"] = on_policy_verdict(metric, mode, best_value, results)
    if document["on_policy_verdict"] is None and "on_policy_fraction" in cfg.parameters \
            and not best.get("on_policy_fraction"):
        document["on_policy_verdict"] = off_policy_best_verdict(metric, mode, best_value, experiment_dir)
    return document


def write_controls(experiment_dir: Path, document: dict) -> None:
    """controls.json, whole or absent (written beside, then renamed over)."""
    atomic_write_text(Path(experiment_dir) / CONTROLS_FILE, json.dumps(document, indent=1))


def spread_of(values: list[float]) -> dict | None:
    """{n, mean, std (None for one value), min, max} of finite values; None without any."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def seed_runs(document: dict, metric: str) -> tuple[list[float], list[float]]:
    """(the best config's re-trained runs, plain SFT's runs) on `metric`, each at the arm's best epoch
    by the ranked metric. The search's own best trial is left out: it was picked because its run
    was the best of many, so its value is biased (the winner's curse); plain SFT's own arm was not
    picked and counts."""
    def value(arm: dict) -> float | None:
        got = arm.get("value") if metric == document["metric"] else arm.get("metrics", {}).get(metric)
        return got if isinstance(got, (int, float)) and math.isfinite(got) else None

    arms_ = document["arms"]
    distilled = [value(arm) for name, arm in arms_.items() if name.startswith(BEST_SEED)]
    plain = [value(arm) for name, arm in arms_.items() if name == "plain_sft" or name.startswith(SFT_SEED)]
    return [v for v in distilled if v is not None], [v for v in plain if v is not None]


def seed_gap(distilled: list[float], plain: list[float], mode: str) -> dict | None:
    """The gap (distilled mean - plain mean) with its noise: the CONFIDENCE interval of the gap from
    Welch's t (each side its own seed variance: distillation can make runs vary less, or more, than
    plain SFT), or from the pooled variance on n1 + n2 - 2 degrees of freedom when one side has a
    single run. The runs of both sides share seeds, and a shared seed moves both the same way more
    often than not, so treating them as independent makes the interval wider, not narrower: "yes"
    and "no" stay safe calls. None with fewer than 3 runs (no noise to estimate)."""
    from scipy import stats

    n1, n2 = len(distilled), len(plain)
    if not n1 or not n2 or n1 + n2 < 3:
        return None
    mean1, mean2 = statistics.fmean(distilled), statistics.fmean(plain)
    var1 = statistics.variance(distilled) if n1 > 1 else None
    var2 = statistics.variance(plain) if n2 > 1 else None
    if var1 is not None and var2 is not None and var1 + var2 > 0:
        share1, share2 = var1 / n1, var2 / n2
        error = math.sqrt(share1 + share2)
        freedom = (share1 + share2) ** 2 / (share1 ** 2 / (n1 - 1) + share2 ** 2 / (n2 - 1))
        method = "Welch's t"
    else:
        squares = sum((x - mean1) ** 2 for x in distilled) + sum((x - mean2) ** 2 for x in plain)
        freedom = n1 + n2 - 2
        error = math.sqrt(squares / freedom) * math.sqrt(1 / n1 + 1 / n2)
        method = "pooled t"
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, freedom)) * error
    gap = mean1 - mean2
    better = gap < 0 if mode == "min" else gap > 0
    answer = "within noise" if abs(gap) <= half else "yes" if better else "no"
    return {"answer": answer, "gap": gap, "half_width": half, "standard_error": error, "df": freedom,
            "method": method,
            "distilled": {"n": n1, "mean": mean1, "std": math.sqrt(var1) if var1 is not None else None},
            "plain": {"n": n2, "mean": mean2, "std": math.sqrt(var2) if var2 is not None else None}}


def gap_text(metric: str, gap: dict) -> str:
    """'val_ce 1.1000 ± 0.0100 (the best config, 2 more seeds) vs ... = gap, its interval and noise'."""
    def side(arm: dict, label: str) -> str:
        std = f" ± {arm['std']:.4f}" if arm["std"] is not None else ""
        return f"{arm['mean']:.4f}{std} ({label}, {arm['n']} seed{'s' if arm['n'] > 1 else ''})"

    plain = gap["plain"]["mean"]
    relative = f" ({gap['gap'] / abs(plain):+.1%})" if plain else ""
    return (f"{metric} {side(gap['distilled'], 'the best config re-trained')} vs {side(gap['plain'], 'plain SFT')} "
            f"= {gap['gap']:+.4f}{relative}; {CONFIDENCE:.0%} interval of the gap ±{gap['half_width']:.4f} "
            f"({gap['method']}, {gap['df']:.3g} df)")


def teacher_note(document: dict, teacher: dict | None) -> str:
    """The teacher's own value on the ranked metric, and when it is no better than plain SFT, that it
    has little to transfer and what to do; '' without the teacher's point."""
    metric, mode = document["metric"], document["mode"]
    value = (teacher or {}).get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return ""
    gap = document.get("seed_gap")
    plain = gap["plain"]["mean"] if gap else document["arms"].get("plain_sft", {}).get("value")
    if plain is None:
        return f"; the teacher itself: {metric} {value:.4f}"
    better = value < plain if mode == "min" else value > plain
    if better:
        return f"; the teacher itself: {metric} {value:.4f}"
    return (f"; the teacher itself reaches only {metric} {value:.4f}, no better than plain SFT's {plain:.4f}: it has "
            "little to transfer (use a stronger or longer-trained teacher, or a smaller student)")


def judge(document: dict, teacher: dict | None = None) -> dict:
    """Set the document's verdict lines from its arms: "verdict" (did distillation help, on the ranked
    metric), "task_verdict" (the same on the task's own metric, val_acc / val_gen_acc, when its answer
    differs) and "seed_gap" / "task_gaps" (the numbers behind them); teacher: teacher_point.json's
    values, named in the verdict (the reason, when it is no better than plain SFT). Returns document."""
    metric, mode = document["metric"], document["mode"]
    document["seed_gap"] = seed_gap(*seed_runs(document, metric), mode)
    document["teacher"] = {k: v for k, v in (teacher or {}).items() if k in (metric, *TASK_METRICS, "val_ce")} or None
    document["task_gaps"], document["task_verdict"] = {}, None
    gap = document["seed_gap"]
    if gap is None:   # no seeds re-trained: the best trial against plain SFT's one run
        line = verdict(metric, mode, document["best"]["value"], document["arms"].get("plain_sft", {}).get("value"),
                       document.get("seeds_for_best"), document.get("repeat_noise"))
        document["verdict"] = line + teacher_note(document, teacher) if line else None
        return document
    document["verdict"] = f"did distillation help? {gap['answer']}: {gap_text(metric, gap)}{teacher_note(document, teacher)}"
    for task_metric, meaning in TASK_METRICS.items():
        task_gap = seed_gap(*seed_runs(document, task_metric), "max") if task_metric != metric else None
        if task_gap is None:
            continue
        document["task_gaps"][task_metric] = task_gap
        if task_gap["answer"] != gap["answer"] and document["task_verdict"] is None:
            document["task_verdict"] = (f"on {task_metric} ({meaning}) the answer differs: {task_gap['answer']}: "
                                        f"{gap_text(task_metric, task_gap)}")
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
    """The "did distillation help" line without plain SFT re-trained on more seeds (controls.seeds 0,
    or plain SFT off); None without a plain-SFT result to compare with.
    With the best config re-trained on seeds, its mean stands for the best config (the search's own best is
    the luckiest of many draws) and a gap inside NOISE_SIGMAS seed deviations is called within noise.
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
            answer = f"within noise ({NOISE_SIGMAS:g} x the seed spread {spread['std']:.4f})"
    elif noise is not None:
        bound = NOISE_SIGMAS * noise["std"]
        within = abs(diff) <= bound
        answer = "within noise" if within else answer
        note = (f"; {'within' if within else 'beyond'} the seed noise as far as the trials show it (±{bound:.4f}: "
                f"{NOISE_SIGMAS:g} x the std of {noise['trials']} full-length trials repeating a config, same seed; "
                f"a lower bound: controls.seeds: {SUGGESTED_SEEDS} measures it)")
    elif spread is None:
        note = (f"; the seed noise is unknown (no full-length trials repeat a config): set "
                f"controls.seeds: {SUGGESTED_SEEDS} to measure it")
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
    gap = document.get("seed_gap")
    if gap and "seconds" in document:   # what the noise cost: the re-trained arms' share of the arms' time
        retrained = sum(name.startswith((BEST_SEED, SFT_SEED)) for name in document["arms"])
        lines.append(f"the verdict's noise: {retrained} of the {len(document['arms'])} arms re-train the best config "
                     f"and plain SFT on {gap['distilled']['n']} more seed(s), ~{document['seconds'] * retrained / len(document['arms']):.0f} s")
    for line in ("verdict", "task_verdict", "on_policy_verdict"):
        if document.get(line):
            lines.append(document[line])
    return "\n".join(lines)
