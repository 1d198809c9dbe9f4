"""A size/quality search's front: the trials no other trial beats on both the metric and the size.

A search with `search.objectives: [<metric>, student_params | gen_tokens_per_s]` asks "how small can
the student be for the quality I need". Each trial is a point: its best epoch's metric (the epoch its
kept checkpoint holds, as trials.csv ranks it) and its student's size, the parameter count (fewer is
better) or the measured greedy decoding speed at batch 1 (faster is better). The front is computed
from everything the trials reported, ASHA-stopped trials included: a stopped trial's best epoch is a
real student on disk, and a small one stopped early can still be the best of its size.

smallest_within answers the report's question: of the front, the smallest (or fastest) student whose
metric is within `percent` of the best trial's. Plain Python: report.py, export.py, controls.py and
the bench scripts read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tune_kd.config.checks import SIZE_OBJECTIVES
from tune_kd.results import reading


@dataclass(frozen=True)
class Point:
    trial_id: str
    value: float          # the metric at the trial's best epoch
    size: float           # the size objective at that epoch
    params: dict          # the trial's searched values (params.json)
    metrics: dict         # its best epoch's report


def better_or_equal(a: float, b: float, mode: str) -> bool:
    return a <= b if mode == "min" else a >= b


def dominates(a: Point, b: Point, metric_mode: str, size_mode: str) -> bool:
    """a is at least as good as b on both objectives and better on one."""
    return (better_or_equal(a.value, b.value, metric_mode) and better_or_equal(a.size, b.size, size_mode)
            and (a.value != b.value or a.size != b.size))


def pareto_front(points: list[Point], metric_mode: str, size_mode: str) -> list[Point]:
    """The points no other point dominates, from the cheapest student (smallest or fastest) to the best
    metric; of points equal on both objectives, the first."""
    front = []
    for point in points:
        if any(dominates(other, point, metric_mode, size_mode) for other in points):
            continue
        if not any(p.value == point.value and p.size == point.size for p in front):
            front.append(point)
    return sorted(front, key=lambda p: p.size if size_mode == "min" else -p.size)


def within(value: float, best: float, percent: float, metric_mode: str) -> bool:
    """value is within `percent` of best (relative to |best|) on the metric's side."""
    slack = abs(best) * percent / 100
    return value <= best + slack if metric_mode == "min" else value >= best - slack


def smallest_within(front: list[Point], percent: float, metric_mode: str) -> Point | None:
    """The cheapest front point within `percent` of the front's best metric (the front is sorted cheapest
    first, so the first that qualifies)."""
    if not front:
        return None
    best = reading.best([p.value for p in front], metric_mode)
    return next(p for p in front if within(p.value, best, percent, metric_mode))


def covered(point: Point, front: list[Point], metric_mode: str, size_mode: str) -> bool:
    """Some front point is at least as good as `point` on both objectives (dominates or ties it)."""
    return any(better_or_equal(f.value, point.value, metric_mode) and better_or_equal(f.size, point.size, size_mode)
               for f in front)


def experiment_points(experiment_dir: Path) -> tuple[list[Point], str | None, str, str]:
    """(every trial with a finite metric and size at its best epoch, the size objective or None,
    the metric, its mode) of an experiment folder."""
    meta = reading.read_experiment(experiment_dir)
    metric, mode = meta["metric"]["name"], meta["metric"]["mode"]
    size_key = reading.size_objective(meta["config"])
    points = []
    for _, params, reports in reading.trial_folders(experiment_dir):
        at_best = reading.best_report(reports, metric, mode)
        size = (at_best or {}).get(size_key) if size_key else None
        if at_best is None or not isinstance(size, (int, float)) or not math.isfinite(size):
            continue
        points.append(Point(str(at_best["trial_id"]), float(at_best[metric]), float(size), params,
                            {k: at_best[k] for k in reading.METRICS if k in at_best}))
    return points, size_key, metric, mode


def experiment_front(experiment_dir: Path) -> list[Point]:
    """The front of an experiment folder; empty for a search of the metric alone."""
    points, size_key, _, mode = experiment_points(experiment_dir)
    return pareto_front(points, mode, SIZE_OBJECTIVES[size_key]) if size_key else []


def summary_lines(shape_front: list[Point], experiment_dir: Path, size_key: str, metric: str, mode: str,
                  percent: float) -> str:
    """The front's lines at the end of a two-objective search."""
    pick = smallest_within(shape_front, percent, mode)
    lines = [f"size/quality front ({len(shape_front)} trials, {size_key} against {metric}):"]
    lines += [f"  trial {p.trial_id}  {size_key} {p.size:,.6g}  {metric} {p.value:.4f}" for p in shape_front]
    lines.append(f"smallest student within {percent:g}% of the best {metric}: trial {pick.trial_id} ({size_key} "
                 f"{pick.size:,.6g}, {metric} {pick.value:.4f}); export the front: python -m tune_kd.export "
                 f"{experiment_dir} --front --out DIR")
    return "\n".join(lines)
