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

import base64
import html
import io
from pathlib import Path

from tune_kd.config.files import atomic_write_text
from tune_kd.results import reading, report_front
from tune_kd.results.experiment import Experiment, load
from tune_kd.results.figures import (
    MIN_TRIALS_FOR_IMPORTANCE,
    optuna_study,
    plot_controls,
    plot_curves,
    plot_importance,
    plot_parallel,
    plot_params,
    pyplot,
)
from tune_kd.results.samples import build_samples, samples_html

REPORT_FILE = "report.html"
FIGURES_DIR = "report"


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
        for line in ("verdict", "task_verdict", "on_policy_verdict"):
            if controls.get(line):
                parts.append(f"<p class='verdict'>{html.escape(controls[line])}</p>")
        rows = [("best trial " + controls["best"]["trial_id"], controls["best"]["value"], controls["best"]["settings"])]
        rows += [(name, arm.get("value"), arm["settings"]) for name, arm in controls["arms"].items()]
        if exp.teacher_value() is not None:
            rows.append(("teacher itself", exp.teacher_value(), {"evaluated": "on the validation set, as a student is"}))
        body = "".join(f"<tr><td>{html.escape(name)}</td><td>{'failed' if v is None else f'{v:.4f}'}</td>"
                       f"<td>{html.escape(', '.join(f'{k} = {reading.cell(x)}' for k, x in s.items()))}</td></tr>"
                       for name, v, s in rows)
        parts.append(f"<h2>Control arms</h2><table><tr><th>arm</th><th>{exp.metric}</th><th>settings</th></tr>"
                     f"{body}</table>")
        gap, spread = controls.get("seed_gap"), controls.get("seeds_for_best")
        if gap:
            sides = "; ".join(f"{label} over {gap[side]['n']} seeds: {gap[side]['mean']:.4f}"
                              + (f" ± {gap[side]['std']:.4f}" if gap[side]["std"] is not None else "")
                              for side, label in (("distilled", "the best config"), ("plain", "plain SFT")))
            parts.append(f"<p>{exp.metric}, {html.escape(sides)}; the gap {gap['gap']:+.4f}, its 95% interval "
                         f"±{gap['half_width']:.4f} (error bars in controls.png: the seed std)</p>")
        elif spread:
            std = f" ± {spread['std']:.4f}" if spread.get("std") is not None else ""
            parts.append(f"<p>best config re-trained with {spread['n']} more seed(s): {exp.metric} "
                         f"{spread['mean']:.4f}{std} (min {spread['min']:.4f}, max {spread['max']:.4f})</p>")
    teacher = exp.teacher or {}
    if "error" in teacher:
        parts.append(f"<p class='note'>The teacher's own point was not measured: {html.escape(teacher['error'])}</p>")
    elif not controls and exp.teacher_value() is not None:
        parts.append(f"<p>the teacher itself: {exp.metric} <b>{exp.teacher_value():.4f}</b></p>")
    if not controls and exp.finished:
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
        cells = [trial.trial_id, *(reading.cell(trial.params.get(n)) for n in names), str(len(trial.curve)),
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
                           report_front.plot_front(sized, pyplot())))
    plt = pyplot()
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
    samples = build_samples(exp.directory, reading.read_experiment(exp.directory))
    summary = _summary_html(exp) + (report_front.front_html(sized, exp.searched) if sized is not None else "")
    page = PAGE.format(name=html.escape(exp.name), summary=summary, figures="\n".join(blocks),
                       samples=samples_html(samples), table=_table_html(exp))
    target = exp.directory / REPORT_FILE
    atomic_write_text(target, page)   # a reader never sees half a report
    return target
