"""An experiment as the report reads it back from its results folder: its trials' curves, their
statuses, and the control arms' results."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tune_kd.config.checks import searched_keys
from tune_kd.results import reading
from tune_kd.results.arms import CONTROLS_DIR, CONTROLS_FILE, arm_results


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
        return reading.best(values, mode) if values else None


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
    teacher: dict | None = None                # teacher_point.json, when the teacher was measured

    def teacher_value(self) -> float | None:
        """The teacher's own value of the metric (None when not measured)."""
        value = (self.teacher or {}).get(self.metric)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def searched(self) -> list[str]:
        return searched_keys(self.parameters)

    @property
    def common_epoch(self) -> int | None:
        """The last epoch every trial that reported reached: where their metrics are comparable."""
        reached = [max(epoch for epoch, _ in t.curve) for t in self.trials if t.curve]
        return min(reached) if reached else None

    def best_trial(self) -> Trial | None:
        scored = [t for t in self.trials if t.best(self.mode) is not None and t.status not in ("DIVERGED", "REJECTED")]
        if not scored:
            return None
        return reading.best(scored, self.mode, key=lambda t: t.best(self.mode))


def load(experiment_dir: str | Path) -> Experiment:
    directory = Path(experiment_dir)
    meta = reading.read_experiment(directory)
    config = meta["config"]
    metric, mode = meta["metric"]["name"], meta["metric"]["mode"]
    epochs = int(config["train"]["epochs"])
    statuses = reading.read_statuses(directory)
    finished = statuses is not None
    statuses = statuses or {}
    trials = []
    for _, params, reports in reading.trial_folders(directory):
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
                      finished, controls, curves, reading.read_teacher_point(directory))
