"""The search's searcher and scheduler, and what keeps them right across `--resume`
(the checks that refuse a resume: search/resume_checks.py).

make_searcher: Optuna with the sampler samplers.py picks (PruneAwareOptunaSearch; the study lives in
results/<name>/optuna.db, with an earlier search's trials first under search.warm_start), or random
search. make_scheduler: ASHA on our `epoch` counter (PersistentASHA), or none.

A resumed search gets both back from tuner.pkl, pickled when the Tuner was built, before any
trial ran. Tune saves the searcher with its experiment state and restores it (PruneAwareOptunaSearch
then reconciles it with the study, which is always newer); Tune drops the scheduler from that state
(TuneController.__getstate__, ray issue 30838), so PersistentASHA keeps its own file.
check_resume_config refuses a resume whose YAML changed since the first run.

The study and trials.csv agree after any search: a trials.csv row COMPLETED / STOPPED_EARLY,
DIVERGED or REJECTED / ERROR is an Optuna trial COMPLETE / PRUNED / FAIL (user attr tune_trial_id; a re-run
trial's latest), told the value the search ranks by (the trial's best epoch). Optuna trials that
never ran under Tune end FAIL.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from tune_kd.config.checks import SIZE_OBJECTIVES
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.results import reading
from tune_kd.search import space
from tune_kd.search.samplers import make_sampler
from tune_kd.search.warm_start import WARM_START_ATTR, WarmStart

SCHEDULER_STATE_FILE = "scheduler_state.pkl"
EPOCH_VALUES, SIZE = "epoch_values", "size"   # a two-objective study's per-epoch values and size (user attributes)


# ----------------------------------------------------------------------------------------------
# Searcher: Optuna that knows ASHA's early stops are prunes, and survives a resume
# ----------------------------------------------------------------------------------------------

class PruneAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch reports at training_iteration and tells an early-stopped trial COMPLETE
    with its last value. Here intermediate values are keyed by our `epoch`; a trial that ends before
    train.epochs (ASHA) or diverges is told PRUNED; one that completes is told its best epoch's value.

    Resume: Tune restores this object as saved at its last experiment save, while the study holds
    everything up to the kill. restore() closes what was asked after that save (FAIL: it never ran;
    left RUNNING, TPE's constant liar would count it in every later proposal) and marks what was
    finished after it, so reports Tune replays are not told twice. A trial Optuna holds as FAIL
    that runs again (--retry-errored) gets a new Optuna trial, added when it ends.

    With a size objective (search.objectives) the study has two directions: a completed trial is
    told [its best epoch's value, its size]; the per-epoch values go to the EPOCH_VALUES attribute."""

    def __init__(self, *, metric: str, mode: str, max_epochs: int, size_objective: str | None = None,
                 warm_start: WarmStart | None = None, **kwargs):
        # two objectives (search.objectives): the study minimises/maximises both; Optuna keeps no
        # intermediate values for such a study, so a trial's per-epoch values live in a user attribute
        sized = size_objective is not None
        super().__init__(metric=[metric, size_objective] if sized else metric,
                         mode=[mode, SIZE_OBJECTIVES[size_objective]] if sized else mode, **kwargs)
        self._ranked_by, self._ranked_mode, self._size_objective = metric, mode, size_objective
        self._max_epochs = max_epochs
        self._failed: set[str] = set()          # Tune trial ids whose Optuna trial ended FAIL
        self._retries: dict[str, dict] = {}     # trial id -> its re-run after a FAIL, until it ends
        self._reported: dict[str, set] = {}     # trial id -> epochs already reported
        self._max_live: int | None = None
        self._warm_start = warm_start

    def _setup_study(self, mode) -> None:
        super()._setup_study(mode)
        # the earlier search's trials, before the first proposal; once: a resumed study holds them already
        if self._warm_start and not any(WARM_START_ATTR in t.user_attrs for t in self._ot_study.get_trials(deepcopy=False)):
            self._ot_study.add_trials(warm_trials(self._warm_start, self._space))

    @property
    def metric(self) -> str:
        """The metric Tune requires in every result: the ranked one alone. A diverged or rejected trial
        reports no size, and Tune stops the whole search on a result without a searcher's metric.
        (The study's two directions come from _mode, which Ray's OptunaSearch reads directly.)"""
        return self._ranked_by

    @property
    def mode(self) -> str:
        return self._ranked_mode

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        # limit here, not in Ray's ConcurrencyLimiter: it drops the completion of a trial it does not
        # count as live, and a trial re-run after its error (--retry-errored) never is
        self._max_live = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if self._max_live is not None and len(self._ot_trials.keys() - self._completed_trials) >= self._max_live:
            return None
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._failed:
            self._retry(trial_id)
        value = result.get(self._ranked_by)
        if value is None or math.isnan(value):
            return
        if trial_id in self._retries:
            self._retries[trial_id]["values"].setdefault(result["epoch"], value)
            self._retries[trial_id]["size"] = result.get(self._size_objective)
        elif trial_id in self._ot_trials and trial_id not in self._completed_trials:
            try:
                self._record(trial_id, value, result)
            except UpdateFinishedTrialError:   # finished behind this object's back (a killed run's last moments)
                self._adopt(trial_id, self._frozen(trial_id).state)
                if trial_id in self._failed:
                    self.on_trial_result(trial_id, result)
                return
        self._reported.setdefault(trial_id, set()).add(result["epoch"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and result.get("epoch") not in self._reported.get(trial_id, ()):
            self.on_trial_result(trial_id, result)   # ASHA's STOP withholds a trial's last result from on_trial_result
        if trial_id in self._retries:
            retry = self._retries.pop(trial_id)
            state, value = self._ending(result, error, retry["values"], retry.get("size"))
            attrs = {"tune_trial_id": trial_id, "retry_of": retry["retry_of"]}
            if self._size_objective:
                attrs.update({EPOCH_VALUES: {str(e): v for e, v in retry["values"].items()}, SIZE: retry.get("size")})
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=state, **({"values": value} if self._size_objective else {"value": value}), params=retry["params"],
                distributions=retry["distributions"], user_attrs=attrs,
                intermediate_values={} if self._size_objective else retry["values"]))
        elif trial_id in self._ot_trials and trial_id not in self._completed_trials:
            frozen = self._frozen(trial_id)
            state, value = self._ending(result, error, epoch_values(frozen), frozen.user_attrs.get(SIZE))
            self._ot_study.tell(self._ot_trials[trial_id], value, state=state, skip_if_finished=True)
        else:
            return
        self._adopt(trial_id, state)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {trial.number: trial_id for trial_id, trial in self._ot_trials.items()}
        for frozen in self._ot_study.get_trials(deepcopy=False):
            trial_id = known.get(frozen.number)
            if trial_id is None and frozen.state == TrialState.RUNNING:   # asked after Tune's last save
                self._ot_study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
            elif trial_id is not None and frozen.state.is_finished() and trial_id not in self._completed_trials:
                self._adopt(trial_id, frozen.state)
            retried = frozen.user_attrs.get("tune_trial_id")
            retry = self._retries.get(retried)
            if retry is not None and frozen.user_attrs.get("retry_of") == retry["retry_of"]:
                del self._retries[retried]   # the re-run ended after the last save
                self._adopt(retried, frozen.state)

    def _adopt(self, trial_id: str, state: TrialState) -> None:
        """The trial's Optuna trial ended in `state`: tell it nothing more (a FAIL one is re-opened by a re-run)."""
        self._completed_trials.add(trial_id)
        (self._failed.add if state == TrialState.FAIL else self._failed.discard)(trial_id)

    def _retry(self, trial_id: str) -> None:
        """Collect the re-run of a trial Optuna holds as FAIL, from its reports so far; added when it ends,
        so a kill meanwhile leaves nothing RUNNING."""
        failed = self._frozen(trial_id)
        self._retries[trial_id] = {"params": failed.params, "distributions": failed.distributions,
                                   "values": epoch_values(failed), "size": failed.user_attrs.get(SIZE),
                                   "retry_of": failed.number}
        self._failed.discard(trial_id)
        self._completed_trials.discard(trial_id)

    def _frozen(self, trial_id: str) -> optuna.trial.FrozenTrial:
        """The latest Optuna trial of a Tune trial, as the study stores it now."""
        number = self._ot_trials[trial_id].number
        mine = [t for t in self._ot_study.get_trials(deepcopy=False)
                if t.number == number or t.user_attrs.get("tune_trial_id") == trial_id]
        return max(mine, key=lambda t: t.number)

    def _record(self, trial_id: str, value: float, result: dict) -> None:
        """An epoch's value into the study: an intermediate value, or with two objectives the
        EPOCH_VALUES attribute (and the trial's size: ASHA's stop may withhold the last result)."""
        ot_trial = self._ot_trials[trial_id]
        if self._size_objective is None:
            ot_trial.report(value, result["epoch"])
            return
        values = epoch_values(self._frozen(trial_id))
        values.setdefault(result["epoch"], value)
        ot_trial.set_user_attr(EPOCH_VALUES, {str(e): v for e, v in values.items()})
        if result.get(self._size_objective) is not None:
            ot_trial.set_user_attr(SIZE, result[self._size_objective])

    def _ending(self, result: dict | None, error: bool, values: dict,
                size: float | None = None) -> tuple[TrialState, float | list | None]:
        """(state, value) to tell: FAIL for an error or a trial that never reported; PRUNED for an early
        stop, a divergence or a rejected student shape; else COMPLETE with the best epoch's value, as
        trials.csv ranks it (and, with two objectives, the student's size)."""
        finite = [v for v in values.values() if not math.isnan(v)]
        if error or not result or not finite:
            return TrialState.FAIL, None
        if result.get("diverged") or result.get("rejected") or result.get("epoch", self._max_epochs) < self._max_epochs:
            return TrialState.PRUNED, None
        best = reading.best(finite, self._ranked_mode)
        if self._size_objective is None:
            return TrialState.COMPLETE, best
        size = result.get(self._size_objective, size)
        if size is None or not math.isfinite(size):   # Optuna refuses a NaN objective
            return TrialState.FAIL, None
        return TrialState.COMPLETE, [best, float(size)]


def warm_trials(warm: WarmStart, distributions: dict) -> list[optuna.trial.FrozenTrial]:
    """The earlier search's trials as Optuna trials of this space (search/warm_start.py): COMPLETE with
    the best epoch's value, or PRUNED with the epochs' values reached; marked WARM_START_ATTR."""
    return [optuna.trial.create_trial(
        state=TrialState.COMPLETE if trial.completed else TrialState.PRUNED,
        value=trial.value if trial.completed else None, params=trial.params,
        distributions={k: distributions[k] for k in trial.params}, intermediate_values=trial.values,
        user_attrs={WARM_START_ATTR: str(warm.source), "earlier_trial_id": trial.trial_id}) for trial in warm.trials]


def epoch_values(frozen: optuna.trial.FrozenTrial) -> dict[int, float]:
    """epoch -> value of an Optuna trial: its intermediate values, or EPOCH_VALUES with two objectives."""
    stored = frozen.user_attrs.get(EPOCH_VALUES)
    return {int(e): v for e, v in stored.items()} if stored is not None else dict(frozen.intermediate_values)


def make_optuna_searcher(cfg: ExperimentConfig, storage_url: str, points: list[dict] | None,
                         warm: WarmStart | None = None) -> PruneAwareOptunaSearch:
    storage = optuna.storages.RDBStorage(storage_url)
    return PruneAwareOptunaSearch(metric=cfg.metric.name, mode=cfg.metric.mode, points_to_evaluate=points,
                                  sampler=make_sampler(cfg), study_name=cfg.name, storage=storage,
                                  max_epochs=cfg.train.epochs, size_objective=cfg.search.size_objective,
                                  warm_start=warm)


def make_searcher(cfg: ExperimentConfig, experiment_dir: Path, grid: list[dict] | None = None,
                  warm: WarmStart | None = None):
    """The YAML's settings are the first trial (search.evaluate_train_first); in a size/quality search
    the smallest student of the space is the second: a dozen TPE trials rarely sample the small corner
    of a shape space, and the front's small end is half of what the user asked (docs/search.md).
    grid: these points and nothing else, in order (run_search's grid).
    warm: an earlier search's trials (search/warm_start.py), given to Optuna's study before its first proposal."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if grid is not None:
        if len(grid) != cfg.search.num_samples:
            raise ValueError(f"a grid of {len(grid)} points needs search.num_samples {len(grid)}, "
                             f"got {cfg.search.num_samples}")
        return BasicVariantGenerator(points_to_evaluate=grid)
    first, smallest = space.fixed_point(cfg), space.smallest_point(cfg) if cfg.search.size_objective else None
    points = [p for p in (first, smallest) if p] if cfg.search.evaluate_train_first else []
    points = [p for i, p in enumerate(points) if p not in points[:i]] or None
    if cfg.search.algorithm == "optuna":
        return make_optuna_searcher(cfg, f"sqlite:///{experiment_dir / 'optuna.db'}", points, warm)
    return BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.search.seed)


# ----------------------------------------------------------------------------------------------
# Scheduler: ASHA whose rungs survive a resume
# ----------------------------------------------------------------------------------------------

class PersistentASHA(AsyncHyperBandScheduler):
    """ASHA that writes its rungs to <experiment>/scheduler_state.pkl after every decision and
    reads them back when a restored run adds its first trial (Tune restores the scheduler as it
    was built, with empty rungs: every decision would be CONTINUE). It also remembers whom it
    stopped: Tune may resume a trial stopped after its last state save, and it must stop again.

    size_key (a size/quality search): a trial's rung values are compared only with those of trials
    in its size bracket, the log-spaced cell [ratio^k, ratio^(k+1)) its size falls in (k =
    floor(log(size) / log(ratio)); a trial keeps the bracket of its first reported size, which a
    re-measured speed after a restart could otherwise move). A small student is slower to learn and worse at every epoch; plain ASHA would stop
    it against the large ones, and the front's small end would never be trained (docs/search.md,
    "Searching the student's shape", measures it). Every trial reports its size from its first epoch."""

    def __init__(self, *args, size_key: str | None = None, size_ratio: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._stopped: set[str] = set()
        self._loaded = False
        self._size_key, self._size_ratio = size_key, size_ratio
        self._by_size: dict[int, object] = {}   # size bracket -> its own rungs (one of Ray's _Bracket)
        self._bracket_of: dict[str, int] = {}   # trial id -> its size bracket

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._loaded:
            self._loaded = True
            path = state_path(trial)
            if path.is_file():
                with path.open("rb") as handle:
                    state = pickle.load(handle)
                self._brackets, self._stopped, self._num_stopped = state["brackets"], state["stopped"], state["num_stopped"]
                self._by_size, self._bracket_of = state.get("by_size", {}), state.get("bracket_of", {})
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._place_by_size(trial.trial_id, result)
        decision = super().on_trial_result(tune_controller, trial, result)
        if trial.trial_id in self._stopped:
            decision = TrialScheduler.STOP
        if decision == TrialScheduler.STOP:
            self._stopped.add(trial.trial_id)
        self._save(trial)
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._place_by_size(trial.trial_id, result)
        super().on_trial_complete(tune_controller, trial, result)
        self._save(trial)

    def _place_by_size(self, trial_id: str, result: dict) -> None:
        """Point the trial at its size bracket's rungs (again after a resume: the rungs persist)."""
        size = (result or {}).get(self._size_key) if self._size_key else None
        if not size or trial_id not in self._trial_info or not math.isfinite(size):
            return
        bracket = self._bracket_of.setdefault(trial_id, size_bracket(size, self._size_ratio))
        if bracket not in self._by_size:
            self._by_size[bracket] = copy.deepcopy(self._fresh)
        self._trial_info[trial_id] = self._by_size[bracket]

    @property
    def _fresh(self):
        """Empty rungs as ASHA builds them (its single bracket, before any trial reported)."""
        fresh = copy.deepcopy(self._brackets[0])
        for _, recorded in fresh._rungs:
            recorded.clear()
        return fresh

    def _save(self, trial) -> None:
        path = state_path(trial)
        staging = path.with_name(f".{path.name}.{os.getpid()}")   # whole or not at all: a kill can come any time
        with staging.open("wb") as handle:
            pickle.dump({"brackets": self._brackets, "stopped": self._stopped, "num_stopped": self._num_stopped,
                         "by_size": self._by_size, "bracket_of": self._bracket_of}, handle)
        os.replace(staging, path)


def size_bracket(size: float, ratio: float) -> int:
    """The size bracket of a student: k of the log-spaced cell [ratio^k, ratio^(k+1)) its size is in."""
    return math.floor(math.log(size) / math.log(ratio))


def state_path(trial) -> Path:
    # from the trial, not from construction: a restored experiment may have moved
    return Path(trial.storage.experiment_fs_path) / SCHEDULER_STATE_FILE


def make_scheduler(cfg: ExperimentConfig):
    if cfg.scheduler.type == "none":
        return None
    # time_attr="epoch": our own counter, which survives restores (training_iteration restarts)
    sized = cfg.search.size_objective if cfg.scheduler.size_bracket_ratio else None
    return PersistentASHA(time_attr="epoch", metric=cfg.metric.name, mode=cfg.metric.mode, max_t=cfg.train.epochs,
                          grace_period=cfg.scheduler.grace_period, reduction_factor=cfg.scheduler.reduction_factor,
                          size_key=sized, size_ratio=cfg.scheduler.size_bracket_ratio)


# ----------------------------------------------------------------------------------------------
# Resume: the YAML must still describe the search that started
# ----------------------------------------------------------------------------------------------
