"""`search.warm_start: results/<name>`: a search that starts from an earlier one's trials.

A rerun (new data, another student size, a longer budget) need not start from nothing: the earlier
search's trials say where the good region is. Before the sampler's first proposal its study is given
them (searcher.PruneAwareOptunaSearch adds them when it creates the study, never on a resume):

    a COMPLETED trial      COMPLETE, its best epoch's value (as the search tells its own trials)
    stopped early, diverged or never finished
                           PRUNED with the epochs' values it reached (TPE ranks it as low-fidelity
                           evidence, as it does the search's own ASHA stops; the GP imputes its final
                           value: search/gp_sampler.py)
    errored, rejected, no value
                           left out

Keys: a key both spaces search keeps the earlier trial's value; a trial with a value outside this
space's range (or not among its choices) is left out. A key searched only here takes the earlier
search's own fixed setting (train.<key> in its experiment.json: what its trials trained with), when
that fits this space; a key searched only there is dropped (those trials' values of it are ignored).

read_warm_start checks the folder before Ray starts: no such experiment, another metric or goal, no
searched key in common, or a two-objective search (not supported: its sizes are not read back) are
one line each (a UserError, exit 2). The line it returns says how many trials were taken and why
any were dropped. Plain Python: the Optuna trials are made in searcher.warm_trials.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tune_kd.config.checks import searched_keys
from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.results import experiment as experiment_results
from tune_kd.results import reading

WARM_START_ATTR = "warm_start"   # an Optuna user attribute: the trial came from this results folder


@dataclass(frozen=True)
class EarlierTrial:
    """One trial of the earlier search, as this search's sampler is told it."""
    trial_id: str
    params: dict            # this space's keys only
    values: dict            # epoch -> the metric's value (finite only)
    completed: bool         # ran every epoch of the earlier search
    mode: str = "min"

    @property
    def value(self) -> float:
        """The best epoch's value, as the search ranks its own trials."""
        return reading.best(self.values.values(), self.mode)


@dataclass(frozen=True)
class WarmStart:
    source: Path
    trials: list[EarlierTrial]
    considered: int                                   # the earlier search's trials
    dropped: Counter = field(default_factory=Counter)  # reason -> trials left out
    held: dict = field(default_factory=dict)          # key searched only here -> the earlier search's setting
    ignored: list = field(default_factory=list)       # keys searched only there
    unknown: list = field(default_factory=list)       # keys searched only here without a setting there that fits

    def line(self) -> str:
        completed = sum(t.completed for t in self.trials)
        out = (f"warm start: {len(self.trials)} of {self.considered} trials of {self.source} given to the sampler "
               f"({completed} completed, {len(self.trials) - completed} stopped early)")
        if self.dropped:
            out += "; left out: " + ", ".join(f"{count} {reason}" for reason, count in self.dropped.most_common())
        if self.held:
            out += "; " + ", ".join(f"{k} at its setting there ({v})" for k, v in self.held.items())
        if self.unknown:
            out += f"; no value there for {', '.join(self.unknown)} (the sampler proposes it afresh)"
        if self.ignored:
            out += f"; searched there only, ignored: {', '.join(self.ignored)}"
        return out


def fits(spec: dict, value) -> bool:
    """Whether a value is one this space's spec can propose."""
    if "values" in spec:
        return value in spec["values"]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    if spec.get("distribution") == "int_uniform" and value != int(value):
        return False
    return spec["min"] <= value <= spec["max"]


def read_warm_start(cfg: ExperimentConfig) -> WarmStart | None:
    """The earlier search's trials as this search's sampler takes them (None without search.warm_start);
    a UserError naming search.warm_start for a folder it cannot start from."""
    setting = cfg.search.warm_start
    if not setting:
        return None
    source = Path(setting)
    where = f"search.warm_start: {setting}"
    if not (source / reading.EXPERIMENT_FILE).is_file():
        raise UserError(f"{where}: not a tune_kd search's results folder (no {source / reading.EXPERIMENT_FILE}); "
                        "give results/<name> of an earlier search")
    if cfg.search.size_objective:
        raise UserError(f"{where}: a two-objective search (search.objectives) cannot start from an earlier one yet; "
                        "drop search.warm_start or search.objectives")
    meta = reading.read_experiment(source)   # refused on its metric and objectives before its trials are read
    metric, mode, config = meta["metric"]["name"], meta["metric"]["mode"], meta["config"]
    if (metric, mode) != (cfg.metric.name, cfg.metric.mode):
        raise UserError(f"{where}: that search ranked trials by {metric} ({mode}), this one by "
                        f"{cfg.metric.name} ({cfg.metric.mode}): its values would mislead the sampler; start from a "
                        "search of the same metric and goal")
    if reading.size_objective(config):
        raise UserError(f"{where}: that search had two objectives (search.objectives); start from a search of "
                        f"{cfg.metric.name} alone")
    earlier = experiment_results.load(source)
    here, there = searched_keys(cfg.parameters), earlier.searched
    shared = [k for k in here if k in there]
    if not shared:
        raise UserError(f"{where}: no searched key in common (this search: {', '.join(here) or 'none'}; that one: "
                        f"{', '.join(there) or 'none'}); start from a search of the same keys")
    held = {}
    for key in here:
        setting_there = (config.get("train") or {}).get(key)
        if key not in there and setting_there is not None and fits(cfg.parameters[key], setting_there):
            held[key] = setting_there
    dropped, trials = Counter(), []
    for trial in earlier.trials:
        values = {epoch: value for epoch, value in trial.curve if math.isfinite(value)}
        if trial.status in ("ERROR", "REJECTED") or not values:
            dropped[{"ERROR": "errored", "REJECTED": "rejected"}.get(trial.status, "without a value")] += 1
            continue
        params = {**held, **{k: trial.params.get(k) for k in shared}}
        outside = next((k for k in shared if not fits(cfg.parameters[k], params[k])), None)
        if outside:
            dropped[f"with {outside} outside this space"] += 1
            continue
        trials.append(EarlierTrial(trial.trial_id, params, values, trial.status == "COMPLETED", cfg.metric.mode))
    return WarmStart(source, trials, len(earlier.trials), dropped, held, [k for k in there if k not in here],
                     [k for k in here if k not in there and k not in held])
