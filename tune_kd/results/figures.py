"""The report's figures: learning curves, parameters against the metric, Optuna's views, the control arms."""

from __future__ import annotations

import contextlib
import math
import warnings

from tune_kd.results.experiment import Experiment

MIN_TRIALS_FOR_IMPORTANCE = 4


STATUS_STYLE = {"COMPLETED": ("tab:blue", "o"), "STOPPED_EARLY": ("tab:orange", "x"), "DIVERGED": ("tab:red", "v"),
                "REJECTED": ("tab:purple", "d"), "ERROR": ("tab:red", "s"), "INCOMPLETE": ("tab:gray", "x")}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")   # no display: render to files
    import matplotlib.pyplot as plt

    return plt


def plot_curves(exp: Experiment):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    best = exp.best_trial()
    for trial in exp.trials:
        if not trial.curve:
            continue
        epochs, values = zip(*trial.curve)
        color, marker = STATUS_STYLE.get(trial.status, ("tab:gray", "x"))
        is_best = best is not None and trial.trial_id == best.trial_id
        ax.plot(epochs, values, color="black" if is_best else color, alpha=1.0 if is_best else 0.6,
                linewidth=2.5 if is_best else 1.0, label=f"best: trial {trial.trial_id}" if is_best else None)
        ax.plot(epochs[-1], values[-1], marker=marker, color=color, markersize=7, linestyle="none")
    for arm, curve in exp.control_curves.items():
        epochs, values = zip(*curve)
        ax.plot(epochs, values, linestyle="--", linewidth=1.5, marker=".", label=f"control: {arm}")
    teacher = exp.teacher_value()
    if teacher is not None:
        ax.axhline(teacher, color="tab:green", linestyle=":", linewidth=2, label=f"teacher itself: {teacher:.4f}")
    for status, (color, marker) in STATUS_STYLE.items():
        if any(t.status == status and t.curve for t in exp.trials):
            ax.plot([], [], marker=marker, color=color, linestyle="none", label=status.lower().replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel(exp.metric)
    ax.set_xticks(range(1, exp.epochs + 1))
    ax.set_title(f"{exp.metric} per epoch, every trial (a line that ends early: stopped by the scheduler)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the axes: it hides no curve
    fig.tight_layout()
    return fig


def plot_params(exp: Experiment):
    plt = pyplot()
    names, epoch = exp.searched, exp.common_epoch
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        spec = exp.parameters[name]
        points = [(t.params.get(name), t.value_at(epoch), t.status) for t in exp.trials
                  if t.params.get(name) is not None and t.value_at(epoch) is not None]
        categorical = "values" in spec
        choices = [str(v) for v in spec.get("values", [])]
        for value, metric, status in points:
            color, marker = STATUS_STYLE.get(status, ("tab:gray", "x"))
            x = choices.index(str(value)) if categorical and str(value) in choices else value
            ax.scatter([x], [metric], color=color, marker=marker if marker != "x" else "X", s=36)
        if categorical:
            ax.set_xticks(range(len(choices)), choices, rotation=20)
        elif spec.get("distribution") == "log_uniform_values":
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels collide on a short log range
        ax.set_xlabel(name)
        ax.set_ylabel(f"{exp.metric} at epoch {epoch}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{exp.metric} at epoch {epoch} (reached by every trial) against each searched parameter")
    fig.tight_layout()
    return fig


def optuna_study(exp: Experiment):
    """An in-memory Optuna study holding every trial that reported, valued at the common epoch
    (its per-epoch values kept as intermediate values)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {}
    for name in exp.searched:
        spec = exp.parameters[name]
        if "values" in spec:
            distributions[name] = optuna.distributions.CategoricalDistribution(spec["values"])
        elif spec.get("distribution") == "int_uniform":
            distributions[name] = optuna.distributions.IntDistribution(spec["min"], spec["max"])
        else:
            distributions[name] = optuna.distributions.FloatDistribution(
                spec["min"], spec["max"], log=spec.get("distribution") == "log_uniform_values")
    study = optuna.create_study(direction="minimize" if exp.mode == "min" else "maximize", study_name=exp.name)
    for trial in exp.trials:
        value = trial.value_at(exp.common_epoch)
        if value is None or any(trial.params.get(name) is None for name in distributions):
            continue
        study.add_trial(optuna.trial.create_trial(
            params={name: trial.params[name] for name in distributions}, distributions=distributions,
            value=value, intermediate_values={epoch: v for epoch, v in trial.curve if math.isfinite(v)}))
    return study


def plot_parallel(exp: Experiment, study):
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    with _quiet_experimental():
        ax = plot_parallel_coordinate(study, target_name=f"{exp.metric} at epoch {exp.common_epoch}")
    ax.figure.set_size_inches(9, 4.5)
    ax.set_title(f"parallel coordinates: each line a trial, coloured by its {exp.metric} at epoch {exp.common_epoch}")
    ax.figure.subplots_adjust(bottom=0.2, left=0.08)
    return ax.figure


def plot_importance(exp: Experiment, study):
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    with _quiet_experimental():
        ax = plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                    target_name=f"{exp.metric} at epoch {exp.common_epoch}")
    ax.set_title("", loc="left")   # Optuna's own title sits at the left, under ours: one title only
    ax.set_title(f"parameter importance for {exp.metric} at epoch {exp.common_epoch}\n(the last epoch every trial "
                 "reached)", fontsize=11)
    ax.figure.set_size_inches(7, 0.5 * len(exp.searched) + 2)
    ax.figure.tight_layout()
    return ax.figure


@contextlib.contextmanager
def _quiet_experimental():
    """Optuna marks its matplotlib plots experimental; the warning says nothing to a report reader."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def control_rows(exp: Experiment) -> list[tuple[str, float, float | None, str]]:
    """(label, value, error bar or None, colour) per bar of controls.png: the best trial, the seed means
    of the best config and of plain SFT with their seed std (the verdict's noise), every arm, the teacher."""
    controls = exp.controls
    rows = [(f"best trial {controls['best']['trial_id']} (the search's pick)", controls["best"]["value"], None, "black")]
    gap = controls.get("seed_gap")
    if gap:
        for side, label, color in (("distilled", "best config", "tab:green"), ("plain", "plain SFT", "tab:purple")):
            arm = gap[side]
            rows.append((f"{label}: mean of {arm['n']} seeds", arm["mean"], arm["std"], color))
    for name, arm in controls["arms"].items():
        if arm.get("value") is not None:
            color = "#9fd89f" if name.startswith("best_seed_") else "#c9b3e0" if name.startswith("plain_sft") \
                else "tab:gray"
            rows.append((name, arm["value"], None, color))
    if exp.teacher_value() is not None:
        rows.append(("teacher itself", exp.teacher_value(), None, "tab:olive"))
    return rows


def plot_controls(exp: Experiment):
    plt = pyplot()
    controls = exp.controls
    rows = control_rows(exp)
    labels, values = [r[0] for r in rows], [r[1] for r in rows]
    errors = [r[2] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    ax.barh(range(len(rows)), values, color=[r[3] for r in rows])
    barred = [y for y, row in enumerate(rows) if row[2]]   # only the seed means have a spread to draw
    ax.errorbar([values[y] for y in barred], barred, xerr=[errors[y] for y in barred], fmt="none", ecolor="black",
                capsize=4)
    for y, (value, error) in enumerate(zip(values, errors)):
        ax.text(value + error, y, f" {value:.4f}" + (f" ± {error:.4f}" if error else ""), va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{exp.metric} (best epoch; {'lower' if exp.mode == 'min' else 'higher'} is better; "
                  "error bars: the seed std)")
    ax.set_xlim(0, max(v + e for v, e in zip(values, errors)) * 1.3)
    answer = (controls.get("seed_gap") or {}).get("answer")
    ax.set_title(f"control arms: same data, {controls['epochs']} epochs, seed {controls['seed']}"
                 + (f"\ndid distillation help? {answer}" if answer else ""),
                 fontsize=11)
    fig.tight_layout()
    return fig
