"""The experiment report: results/<name>/report.html (one self-contained file) and its PNGs.

    python -m tune_kd.report results/<name>

rebuilds it from what is on disk (experiment.json, each trial's result.json and params.json,
trials.csv and controls.json when the search got that far), so it also works for an experiment
that was interrupted: trials then show as INCOMPLETE (stopped or cut short, the files cannot
tell). Figures, each also saved under results/<name>/report/:

    curves.png      the metric per epoch for every trial (ASHA's stops are the lines that end
                    early, marked x) and the control arms (dashed)
    params.png      each trial's metric at the common epoch against each searched parameter
    parallel.png    parallel coordinates of the searched parameters, coloured by the metric (Optuna's)
    importance.png  parameter importances (Optuna's fANOVA, seeded) for the metric at the common epoch
    controls.png    the best trial next to the control arms (controls.py)
    front.png       a size/quality search only: size against the metric, its front (report_front.py)

Below the figures, a table of a few validation prompts with the teacher's, the best student's and
the plain-SFT control's greedy answers (samples.py).

The common epoch is the last one every trial reached (ASHA's first rung, scheduler.grace_period,
when it stopped some): params, parallel and importance compare trials there, so a trial the
scheduler stopped after one epoch is not set against another's third. The best trial, the table
and the controls still go by each trial's best epoch, the one its kept checkpoint holds.
Importances need 4 trials with a value at the common epoch; with fewer they are left out (and
said so).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tune_kd import cli, report_front, results
from tune_kd.results import experiment_dirs
from tune_kd.errors import UserError
from tune_kd.controls import CONTROLS_DIR, CONTROLS_FILE, arm_results
from tune_kd.samples import build_samples, samples_html

REPORT_FILE = "report.html"
FIGURES_DIR = "report"
MIN_TRIALS_FOR_IMPORTANCE = 4
STATUS_STYLE = {"COMPLETED": ("tab:blue", "o"), "STOPPED_EARLY": ("tab:orange", "x"), "DIVERGED": ("tab:red", "v"),
                "REJECTED": ("tab:purple", "d"), "ERROR": ("tab:red", "s"), "INCOMPLETE": ("tab:gray", "x")}


@dataclass
class Trial:
    trial_id: str
    params: dict
    curve: list[tuple[int, float]]            # (epoch, metric) for every epoch that reported one
    status: str
    error: str = ""

    def value_at(self, epoch: int) -> float | None:
        return next((v for e, v in self.curve if e == epoch and math.isfinite(v)), None)

    def best(self, mode: str) -> float | None:
        values = [v for _, v in self.curve if math.isfinite(v)]
        return results.best(values, mode) if values else None


@dataclass
class Experiment:
    name: str
    directory: Path
    metric: str
    mode: str
    epochs: int
    parameters: dict                           # the YAML's parameters block
    trials: list[Trial]
    finished: bool                             # trials.csv written: the search reached its end
    controls: dict | None = None               # controls.json
    control_curves: dict = field(default_factory=dict)

    @property
    def searched(self) -> list[str]:
        return [name for name, spec in self.parameters.items() if "value" not in spec]

    @property
    def common_epoch(self) -> int | None:
        """The last epoch every trial that reported reached: where their metrics are comparable."""
        reached = [max(epoch for epoch, _ in t.curve) for t in self.trials if t.curve]
        return min(reached) if reached else None

    def best_trial(self) -> Trial | None:
        scored = [t for t in self.trials if t.best(self.mode) is not None]
        if not scored:
            return None
        return results.best(scored, self.mode, key=lambda t: t.best(self.mode))


def load(experiment_dir: str | Path) -> Experiment:
    directory = Path(experiment_dir)
    meta = results.read_experiment(directory)
    config = meta["config"]
    metric, mode = meta["metric"]["name"], meta["metric"]["mode"]
    epochs = int(config["train"]["epochs"])
    statuses = results.read_statuses(directory)
    finished = statuses is not None
    statuses = statuses or {}
    trials = []
    for _, params, reports in results.trial_folders(directory):
        if not reports:
            continue
        trial_id = str(reports[0]["trial_id"])
        curve = [(int(r["epoch"]), float(r[metric])) for r in reports if isinstance(r.get(metric), (int, float))]
        reached = max(int(r["epoch"]) for r in reports)
        status, error = statuses.get(trial_id, ("COMPLETED" if reached >= epochs else "INCOMPLETE", ""))
        trials.append(Trial(trial_id, params, curve, status, error))
    for trial_id, (status, error) in statuses.items():   # errored before their first report
        if status == "ERROR" and trial_id not in {t.trial_id for t in trials}:
            trials.append(Trial(trial_id, {}, [], status, error))
    controls_file = directory / CONTROLS_FILE
    controls = json.loads(controls_file.read_text()) if controls_file.is_file() else None
    curves = {arm: result["curve"] for arm, result in arm_results(directory / CONTROLS_DIR, metric, mode).items()}
    return Experiment(meta["name"], directory, metric, mode, epochs, config.get("parameters") or {}, trials,
                      finished, controls, curves)


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib, headless)
# ----------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # no display: render to files
    import matplotlib.pyplot as plt

    return plt


def plot_curves(exp: Experiment):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
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
    for status, (color, marker) in STATUS_STYLE.items():
        if any(t.status == status and t.curve for t in exp.trials):
            ax.plot([], [], marker=marker, color=color, linestyle="none", label=status.lower().replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel(exp.metric)
    ax.set_xticks(range(1, exp.epochs + 1))
    ax.set_title(f"{exp.metric} per epoch, every trial (a line that ends early: stopped by the scheduler)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_params(exp: Experiment):
    plt = _pyplot()
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
    ax.set_title(f"parameter importance for {exp.metric} at epoch {exp.common_epoch} (every trial reached it)")
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


def plot_controls(exp: Experiment):
    plt = _pyplot()
    controls = exp.controls
    labels = [f"best trial {controls['best']['trial_id']}"]
    values = [controls["best"]["value"]]
    for name, arm in controls["arms"].items():
        if arm.get("value") is not None:
            labels.append(name)
            values.append(arm["value"])
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(labels) + 1.4))
    colors = ["black"] + ["tab:green" if name.startswith("best_seed_") else "tab:purple" for name in labels[1:]]
    ax.barh(range(len(labels)), values, color=colors)
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:.4f}", va="center", fontsize=9)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{exp.metric} (best epoch; {'lower' if exp.mode == 'min' else 'higher'} is better)")
    ax.set_xlim(0, max(values) * 1.2)
    ax.set_title(f"control arms: same data, {controls['epochs']} epochs, seed {controls['seed']}")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tune_kd report: {name}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }}
figure {{ margin: 1.5em 0; }} figure img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
.verdict {{ font-weight: bold; font-size: 1.1em; }} .note {{ color: #666; }}
#samples td {{ white-space: pre-wrap; vertical-align: top; }}
#render-warning {{ display: none; background: #fdd; padding: 0.5em; }}
</style></head>
<body>
<h1>tune_kd report: {name}</h1>
<p id="render-warning"></p>
{summary}
{figures}
{samples}
<h2>Trials</h2>
{table}
<script>
// Say so on the page if a figure failed to decode (a truncated or edited file).
window.addEventListener("load", () => {{
  const images = Array.from(document.querySelectorAll("figure img"));
  const rendered = images.filter(img => img.complete && img.naturalWidth > 0);
  document.body.dataset.figures = images.length;
  document.body.dataset.rendered = rendered.length;
  for (const img of rendered) img.dataset.rendered = `${{img.naturalWidth}}x${{img.naturalHeight}}`;
  if (rendered.length < images.length) {{
    const warning = document.getElementById("render-warning");
    warning.textContent = `${{images.length - rendered.length}} of ${{images.length}} figures failed to render`;
    warning.style.display = "block";
  }}
}});
</script>
</body></html>
"""


def _summary_html(exp: Experiment) -> str:
    counts = {}
    for trial in exp.trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    parts = [f"<p>metric: <b>{exp.metric}</b> ({'minimised' if exp.mode == 'min' else 'maximised'}), "
             f"{exp.epochs} epochs per trial, {len(exp.trials)} trials: "
             + ", ".join(f"{n} {s.lower().replace('_', ' ')}" for s, n in sorted(counts.items())) + "</p>"]
    if not exp.finished:
        parts.append("<p class='note'>The search has not finished (no trials.csv): this is the state on disk.</p>")
    best = exp.best_trial()
    if best is not None:
        settings = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in best.params.items())
        parts.append(f"<p>best: trial <b>{best.trial_id}</b>, {exp.metric} <b>{best.best(exp.mode):.4f}</b> "
                     f"({html.escape(settings)})</p>")
    controls = exp.controls
    if controls:
        for line in ("verdict", "on_policy_verdict"):
            if controls.get(line):
                parts.append(f"<p class='verdict'>{html.escape(controls[line])}</p>")
        rows = [("best trial " + controls["best"]["trial_id"], controls["best"]["value"], controls["best"]["settings"])]
        rows += [(name, arm.get("value"), arm["settings"]) for name, arm in controls["arms"].items()]
        body = "".join(f"<tr><td>{html.escape(name)}</td><td>{'failed' if v is None else f'{v:.4f}'}</td>"
                       f"<td>{html.escape(', '.join(f'{k} = {results.cell(x)}' for k, x in s.items()))}</td></tr>"
                       for name, v, s in rows)
        parts.append(f"<h2>Control arms</h2><table><tr><th>arm</th><th>{exp.metric}</th><th>settings</th></tr>"
                     f"{body}</table>")
        spread = controls.get("seeds_for_best")
        if spread:
            std = f" ± {spread['std']:.4f}" if spread.get("std") is not None else ""
            parts.append(f"<p>best config re-trained with {spread['n']} more seed(s): {exp.metric} "
                         f"{spread['mean']:.4f}{std} (min {spread['min']:.4f}, max {spread['max']:.4f})</p>")
    elif exp.finished:
        parts.append("<p class='note'>No control arms were run (controls: all off, or the search was stopped "
                     "before them).</p>")
    return "\n".join(parts)


def _table_html(exp: Experiment) -> str:
    names = exp.searched
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["trial", *names, "epochs", f"best {exp.metric}", "status"])
    rows = []
    for trial in sorted(exp.trials, key=lambda t: (t.best(exp.mode) is None, (t.best(exp.mode) or 0)
                                                   * (1 if exp.mode == "min" else -1))):
        value = trial.best(exp.mode)
        cells = [trial.trial_id, *(results.cell(trial.params.get(n)) for n in names), str(len(trial.curve)),
                 "" if value is None else f"{value:.4f}", trial.status + (f": {trial.error}" if trial.error else "")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def build(experiment_dir: str | Path) -> Path:
    """Write report.html and the PNGs of one experiment folder; returns the report's path."""
    exp = load(experiment_dir)
    figures_dir = exp.directory / FIGURES_DIR
    figures_dir.mkdir(exist_ok=True)
    figures: list[tuple[str, str, object]] = []   # (file name, caption, figure)
    notes = []
    if any(t.curve for t in exp.trials):
        figures.append(("curves.png", f"{exp.metric} per epoch for every trial; x marks a trial stopped early; "
                                      "dashed lines are the control arms", plot_curves(exp)))
    if exp.searched and any(t.curve for t in exp.trials):
        at = f"{exp.metric} at epoch {exp.common_epoch}, the last epoch every trial reached"
        figures.append(("params.png", f"{at}, against each searched parameter", plot_params(exp)))
        study = optuna_study(exp)
        if len(study.trials) >= 2:
            figures.append(("parallel.png", f"parallel coordinates (Optuna): one line per trial, coloured by its {at}",
                            plot_parallel(exp, study)))
        if len(study.trials) >= MIN_TRIALS_FOR_IMPORTANCE:
            figures.append(("importance.png", "parameter importance (Optuna's fANOVA, seed 0): the share of the "
                                              f"variance of the {at} each parameter explains",
                            plot_importance(exp, study)))
        else:
            notes.append(f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} trials with a "
                         f"{exp.metric} at epoch {exp.common_epoch}; this experiment has {len(study.trials)}.")
    if exp.controls and any(arm.get("value") is not None for arm in exp.controls["arms"].values()):
        figures.append(("controls.png", "the best trial next to the control arms", plot_controls(exp)))
    sized = report_front.load_front(exp.directory, exp.controls)   # a size/quality search only
    if sized is not None and sized.points:
        figures.insert(0, ("front.png", "size against the metric: the front, the teacher and plain SFT",
                           report_front.plot_front(sized, _pyplot())))
    plt = _pyplot()
    blocks = []
    for file_name, caption, figure in figures:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        data = buffer.getvalue()
        (figures_dir / file_name).write_bytes(data)
        encoded = base64.b64encode(data).decode("ascii")
        blocks.append(f"<figure id='{file_name[:-4]}'><img alt='{html.escape(caption)}' "
                      f"src='data:image/png;base64,{encoded}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    blocks += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    samples = build_samples(exp.directory, results.read_experiment(exp.directory))
    summary = _summary_html(exp) + (report_front.front_html(sized, exp.searched) if sized is not None else "")
    page = PAGE.format(name=html.escape(exp.name), summary=summary, figures="\n".join(blocks),
                       samples=samples_html(samples), table=_table_html(exp))
    target = exp.directory / REPORT_FILE
    temporary = target.with_suffix(".html.tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(target)   # a reader never sees half a report
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="the experiment folder, results/<name>")


def command(args: argparse.Namespace) -> None:
    for directory in experiment_dirs(Path(args.experiment)):
        print(f"report: {build(directory)}")


def main(argv: list[str] | None = None) -> int:
    return cli.run("report", __doc__, add_arguments, command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
