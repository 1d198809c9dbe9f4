"""Reading an experiment's results folder: results/<name>/ as a search leaves it on disk.

    experiment.json          the search's resolved config, metric and versions (read_experiment)
    trial_*/params.json      a trial's searched values           } read_trial
    trial_*/result.json      one line per reported epoch          }
    trials.csv               one row per trial, its best metric and status (trial_rows; read_statuses)

The names of the metrics every epoch reports (METRICS), a trial's best epoch by the experiment's
metric (best_report, best), and the status a trial ended in (trial_status) live here, so the
search summary, the export, the report and the control arms read the folder the same way.
Plain Python only: no torch, no ray.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

from tune_kd.config.errors import UserError

if TYPE_CHECKING:
    from tune_kd.config.experiment import ExperimentConfig

T = TypeVar("T")

# every metric an epoch end reports (loop.train), in the order the logs show them
METRICS = ("epoch", "train_loss", "val_ce", "val_kl", "val_loss", "val_acc", "val_gen_acc", "val_gen_ce", "tokens_per_s",
           "gpu_peak_gib", "student_params", "student_embedding_params", "gen_tokens_per_s")
EXPERIMENT_FILE = "experiment.json"      # written by the search: resolved config, metric, versions
SUMMARY_FILE = "trials.csv"              # written at the search's end: one row per trial
TEACHER_POINT_FILE = "teacher_point.json"   # the teacher measured as a student (search/teacher_point.py)


def best(values: Iterable[T], mode: str, key: Callable[[T], float] | None = None) -> T:
    """The best of `values` by the metric's mode: the least for "min", else the greatest
    (by `key`, when given). Like min/max, it raises on an empty iterable."""
    pick = min if mode == "min" else max
    return pick(values) if key is None else pick(values, key=key)


def size_objective(config: dict) -> str | None:
    """The size objective of a search (experiment.json's config, or cfg.to_dict()): the second of
    search.objectives, None for a search of the metric alone."""
    objectives = (config.get("search") or {}).get("objectives") or []
    return objectives[1] if len(objectives) > 1 else None


def read_experiment(experiment_dir: Path) -> dict:
    """experiment.json of an experiment folder; a UserError when the folder is not one."""
    path = Path(experiment_dir) / EXPERIMENT_FILE
    if not path.is_file():
        raise UserError(f"{experiment_dir}: not a tune_kd experiment folder (no {EXPERIMENT_FILE}); give "
                        "results/<name> of a search")
    return json.loads(path.read_text())


def read_teacher_point(experiment_dir: Path) -> dict | None:
    """teacher_point.json: the teacher's validation metrics (None before it was measured, without a
    teacher directory, or {"error": reason} when it could not be measured)."""
    path = Path(experiment_dir) / TEACHER_POINT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_trial(trial_dir: Path) -> tuple[dict, list[dict]]:
    """(searched values from params.json, one dict per reported epoch from result.json)."""
    params_file = trial_dir / "params.json"
    params = json.loads(params_file.read_text()) if params_file.is_file() else {}
    reports = []
    for line in (trial_dir / "result.json").read_text().splitlines():
        try:
            reports.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return params, reports


def trial_folders(experiment_dir: Path) -> Iterator[tuple[Path, dict, list[dict]]]:
    """(trial folder, params, reports) for every trial folder with a result.json, in name order."""
    for result_file in sorted(Path(experiment_dir).glob("*/result.json")):
        params, reports = read_trial(result_file.parent)
        yield result_file.parent, params, reports


def scored(reports: list[dict], metric: str) -> list[dict]:
    """The reports that carry a number (not NaN) for `metric`."""
    return [r for r in reports if not math.isnan(r.get(metric, math.nan))]


def rankable(row: dict, key: str) -> bool:
    """Whether a trials.csv row may be the search's best: a finite value of its metric (`key`), and
    not DIVERGED (its config is unstable, whatever its earlier epochs reached) nor REJECTED."""
    value = row.get(key)
    return isinstance(value, (int, float)) and math.isfinite(value) and row.get("status") not in ("DIVERGED", "REJECTED")


def best_report(reports: list[dict], metric: str, mode: str) -> dict | None:
    """The report of a trial's best epoch by `metric` (None when no epoch has a value)."""
    rows = scored(reports, metric)
    return best(rows, mode, key=lambda r: r[metric]) if rows else None


def trial_status(trial_id: str, errors: dict, diverged, epochs: int, max_epochs: int, rejected=None) -> str:
    """How a trial ended: ERROR (Tune says it errored), REJECTED (its student shape was no model or
    over student.max_params: student_shape.py), DIVERGED (its last report says so), COMPLETED (it ran
    every epoch) or STOPPED_EARLY (the scheduler stopped it)."""
    return ("ERROR" if trial_id in errors else "REJECTED" if rejected else "DIVERGED" if diverged
            else "COMPLETED" if epochs >= max_epochs else "STOPPED_EARLY")


def trial_rows(experiment_dir: Path, cfg: ExperimentConfig, errors: dict[str, tuple[str, dict]],
               trials: set[str] | None = None) -> list[dict]:
    """One row per trial from its result.json (searched values, best metric, epochs run, status),
    plus the errored trials that never reported. errors: trial id -> (last error line, config).
    trials: the search's trial ids; a killed run can leave the folder of a trial started after
    Tune's last state save, which the resumed search never knew."""
    rows, key = [], f"best_{cfg.metric.name}"
    for _, params, reports in trial_folders(experiment_dir):
        if not reports or trials is not None and str(reports[0]["trial_id"]) not in trials:
            continue
        trial_id = str(reports[0]["trial_id"])
        at_best = best_report(reports, cfg.metric.name, cfg.metric.mode)
        epochs = max(r["epoch"] for r in reports)
        diverged, rejected = reports[-1].get("diverged"), reports[-1].get("rejected")
        rows.append({"trial_id": trial_id, **{k: params.get(k) for k in cfg.parameters}, "epochs": epochs,
                     key: at_best[cfg.metric.name] if at_best is not None else math.nan,
                     "val_acc": reports[-1].get("val_acc", math.nan),
                     "status": trial_status(trial_id, errors, diverged, epochs, cfg.train.epochs, rejected),
                     "error": errors.get(trial_id, ("", {}))[0] or rejected or diverged or ""})
    reported = {r["trial_id"] for r in rows}
    for trial_id, (message, config) in sorted(errors.items()):
        if trial_id not in reported:
            rows.append({"trial_id": trial_id, **{k: config.get(k) for k in cfg.parameters}, "epochs": 0,
                         key: math.nan, "val_acc": math.nan, "status": "ERROR", "error": message})
    return rows


def read_statuses(experiment_dir: Path) -> dict[str, tuple[str, str]] | None:
    """trial id -> (status, error) from trials.csv; None when the search has not written it (yet)."""
    summary_file = Path(experiment_dir) / SUMMARY_FILE
    if not summary_file.is_file():
        return None
    with summary_file.open(newline="") as handle:
        return {row["trial_id"]: (row["status"], row.get("error", "")) for row in csv.DictReader(handle)}


def experiment_dirs(path: Path) -> list[Path]:
    """The experiment folders under `path`: itself, or each stage of a progressive chain."""
    if (path / EXPERIMENT_FILE).is_file():
        return [path]
    stages = sorted(p.parent for p in path.glob(f"*/{EXPERIMENT_FILE}"))
    if stages:
        return stages
    raise UserError(f"{path}: not a tune_kd experiment folder (no {EXPERIMENT_FILE}); give results/<name> "
                    "of a search")


def cell(value) -> str:
    """A searched value as a table shows it: floats to 4 significant digits, None empty."""
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
