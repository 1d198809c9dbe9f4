"""The report's size/quality section, for a search with two objectives (search.objectives).

    front.png   every trial's student: its size (x, log scale) against the metric at its best epoch;
                the front (front.py) joined as a staircase; the teacher measured as a student
                (teacher_point.json); plain SFT of the front's shapes (the front_sft_* and plain_sft
                control arms), each joined to its distilled twin; the smallest student within
                search.within_percent of the best ringed
    table       the front's trials: shape, parameters (embeddings apart), tokens/s, metric, and the
                same shape's plain-SFT metric

A search of the metric alone has no section: its report reads as before.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from tune_kd.config.checks import SIZE_OBJECTIVES
from tune_kd.results import front, reading
from tune_kd.results.arms import FRONT_SFT

SIZE_LABEL = {"student_params": "student parameters (fewer is better)",
              "gen_tokens_per_s": "greedy decoding tokens/s at batch 1 (more is better)"}


@dataclass
class FrontView:
    points: list[front.Point]          # every trial with a metric and a size
    front: list[front.Point]           # the non-dominated ones, cheapest first
    size_key: str
    metric: str
    mode: str
    percent: float
    pick: front.Point | None           # the smallest within percent of the best
    teacher: dict | None               # teacher_point.json
    sft: dict[str, tuple[float, float]]   # front trial id -> (plain SFT's size, its metric)


def load_front(experiment_dir: Path, controls: dict | None) -> FrontView | None:
    points, size_key, metric, mode = front.experiment_points(experiment_dir)
    if size_key is None:
        return None
    config = reading.read_experiment(experiment_dir)["config"]
    percent = float(config["search"].get("within_percent", 5.0))
    shape_front = front.pareto_front(points, mode, SIZE_OBJECTIVES[size_key])
    sft = {}
    for name, arm in ((controls or {}).get("arms") or {}).items():
        trial_id = controls["best"]["trial_id"] if name == "plain_sft" else \
            name[len(FRONT_SFT):] if name.startswith(FRONT_SFT) else None
        size = (arm.get("metrics") or {}).get(size_key)
        if trial_id is not None and arm.get("value") is not None and size is not None:
            sft[trial_id] = (float(size), float(arm["value"]))
    return FrontView(points, shape_front, size_key, metric, mode, percent,
                     front.smallest_within(shape_front, percent, mode), reading.read_teacher_point(experiment_dir), sft)


def plot_front(view: FrontView, plt):
    """front.png's figure; plt: matplotlib.pyplot, set up headless by the report."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.scatter([p.size for p in view.points], [p.value for p in view.points], color="tab:gray", alpha=0.6, s=24,
               label="trial (best epoch)")
    sizes, values = [p.size for p in view.front], [p.value for p in view.front]
    ax.step(sizes, values, where="post", color="tab:blue", linewidth=1.5)
    ax.scatter(sizes, values, color="tab:blue", s=40, zorder=3, label="front")
    for point in view.front:
        if point.trial_id in view.sft:
            size, value = view.sft[point.trial_id]
            ax.plot([point.size, size], [point.value, value], color="tab:purple", linestyle=":", linewidth=1)
    if view.sft:
        ax.scatter([s for s, _ in view.sft.values()], [v for _, v in view.sft.values()], marker="s",
                   facecolors="none", edgecolors="tab:purple", s=44, label="plain SFT, same shape")
    if view.pick is not None:
        ax.scatter([view.pick.size], [view.pick.value], s=180, facecolors="none", edgecolors="tab:green",
                   linewidths=2, label=f"smallest within {view.percent:g}% of the best")
    teacher_value = (view.teacher or {}).get(view.metric)   # None: not measured, or no such metric for a teacher
    if teacher_value is not None:
        ax.scatter([view.teacher[view.size_key]], [teacher_value], marker="*", s=200, color="tab:red", label="teacher")
    ax.set_xscale("log")
    ax.set_xlabel(SIZE_LABEL[view.size_key])
    ax.set_ylabel(f"{view.metric} ({'lower' if view.mode == 'min' else 'higher'} is better)")
    ax.set_title(f"size against {view.metric}: the front of {len(view.points)} trials")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def front_html(view: FrontView, searched: list[str]) -> str:
    shape = [name for name in searched if name.startswith("student.")]
    head = ["rank", "trial", *shape, "parameters", "embedding params", "tokens/s", view.metric, "plain SFT, same shape"]
    rows = []
    for rank, point in enumerate(view.front, 1):
        sft = view.sft.get(point.trial_id)
        cells = [str(rank), point.trial_id, *(reading.cell(point.params.get(name)) for name in shape),
                 f"{point.metrics.get('student_params', float('nan')):,.0f}",
                 f"{point.metrics.get('student_embedding_params', float('nan')):,.0f}",
                 f"{point.metrics.get('gen_tokens_per_s', float('nan')):,.1f}", f"{point.value:.4f}",
                 "" if sft is None else f"{sft[1]:.4f} ({point.value - sft[1]:+.4f})"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    parts = [f"<h2>Size and quality</h2><table id='front'><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}"
             f"</tr>{''.join(rows)}</table>"]
    if view.pick is not None:
        best = reading.best([p.value for p in view.front], view.mode)
        parts.append(f"<p class='verdict'>smallest student within {view.percent:g}% of the best {view.metric} "
                     f"({best:.4f}): trial {html.escape(view.pick.trial_id)}, {view.size_key} "
                     f"{view.pick.size:,.6g}, {view.metric} {view.pick.value:.4f}</p>")
    if view.teacher is not None and view.teacher.get(view.metric) is not None:
        parts.append(f"<p>teacher, measured as a student: {view.size_key} {view.teacher[view.size_key]:,.6g}, "
                     f"{view.metric} {view.teacher[view.metric]:.4f}</p>")
    return "\n".join(parts)
