"""Replay a search against a recorded table of learning curves instead of training.

A table (bench/curves/<name>.csv with its <name>.json, written by record.py) holds every epoch's
metric of a Sobol sample of configs, each trained with a few seeds. A replayed search runs the
project's own searchers and schedulers (tune_kd.search.samplers.make_sampler's TPE inside
PruneAwareOptunaSearch, Ray's AsyncHyperBandScheduler, Ray's random sampling of the same domains,
Optuna's pruners) in a simulated clock where one epoch of one trial is one time unit and `parallel`
trials run at once, as a search with max_concurrent trials does. A proposed config is answered with
a whole learning curve:

    nearest     the curve of the recorded config nearest to it (unit-cube distance: log scale for
                log-uniform keys, a categorical mismatch costs CATEGORY_DISTANCE), one of its seeds
    surrogate   a Gaussian process per epoch (scikit-learn, Matern 5/2 + white noise, on every
                recorded run) gives the config's mean curve, kept within the range recorded at that
                epoch (a searcher must not find a hole the model dug between the samples); its
                noise is one seed's deviation from its config's mean at the nearest recorded config

The seed is drawn per trial from the replay's seed, so the same seed gives the same search and
different seeds see different training noise. held_out_error() measures either answer on configs
left out of the fit against the noise between a config's own recorded seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

CATEGORY_DISTANCE = 4.0   # a config of another kd_loss is farther than any difference in the numbers


@dataclasses.dataclass(frozen=True)
class Table:
    """Recorded learning curves: runs[config, seed, epoch] of one metric (lower is better)."""
    name: str
    space: dict                 # key -> its W&B-style spec (record.py's recorded space)
    configs: tuple              # config index -> {key: value}
    runs: np.ndarray            # [configs, seeds, epochs]
    metric: str = "val_ce"
    yaml_point: dict | None = None   # the recorded YAML's own settings: a search's first trial
    fixed: dict = dataclasses.field(default_factory=dict)   # keys held at the YAML's value (subspace)

    @classmethod
    def load(cls, csv_path: str | Path, metric: str = "val_ce") -> "Table":
        csv_path = Path(csv_path)
        provenance = json.loads(csv_path.with_suffix(".json").read_text())
        table = cls.from_rows(csv_path.stem, provenance["recorded_space"], list(csv.DictReader(csv_path.open())), metric)
        return dataclasses.replace(table, yaml_point=provenance.get("yaml_point"))

    @classmethod
    def from_rows(cls, name: str, space: dict, rows: list[dict], metric: str = "val_ce") -> "Table":
        """From record.py's rows (config, seed, epoch, the keys, the metric); values may be strings."""
        def typed(key, value):
            spec = space[key]
            if "values" in spec:
                return next(v for v in spec["values"] if str(v) == str(value))
            return int(value) if spec.get("distribution") == "int_uniform" else float(value)

        configs, seeds, epochs = {}, set(), set()
        for row in rows:
            configs.setdefault(int(row["config"]), {key: typed(key, row[key]) for key in space})
            seeds.add(int(row["seed"]))
            epochs.add(int(row["epoch"]))
        runs = np.full((len(configs), len(seeds), len(epochs)), np.nan)
        order = {number: index for index, number in enumerate(sorted(configs))}
        for row in rows:
            value = float(row[metric])
            runs[order[int(row["config"])], int(row["seed"]), int(row["epoch"]) - 1] = value if math.isfinite(value) else np.nan
        worst = np.nanmax(runs)   # a diverged epoch counts as the worst recorded value, as the search's worst
        runs = np.where(np.isnan(runs), worst, runs)
        return cls(name, dict(space), tuple(configs[number] for number in sorted(configs)), runs, metric)

    @property
    def epochs(self) -> int:
        return self.runs.shape[2]

    @property
    def seeds(self) -> int:
        return self.runs.shape[1]

    def subspace(self, keys: list[str]) -> "Table":
        """The same runs searched over `keys` only, every other recorded key held at the YAML's own value
        (a user's smaller space, e.g. kd.yaml's three): answers are asked for the whole config."""
        missing = [key for key in keys if key not in self.space]
        if missing or not self.yaml_point:
            raise ValueError(f"table {self.name}: cannot search {missing or keys} alone (keys {list(self.space)}; "
                             f"a subspace needs the table's yaml_point)")
        return dataclasses.replace(self, name=f"{self.name}, {len(keys)} keys", space={k: self.space[k] for k in keys},
                                   fixed={k: v for k, v in self.yaml_point.items() if k not in keys},
                                   yaml_point={k: self.yaml_point[k] for k in keys})

    def best_and_spread(self) -> tuple[float, float]:
        """The best value any recorded run reached (at any epoch), and the spread that normalises
        regret: the median run's best minus it."""
        per_run = self.runs.min(axis=2).reshape(-1)
        best = float(per_run.min())
        return best, float(np.median(per_run)) - best


# ----------------------------------------------------------------------------------------------
# Answers: a proposed config -> a learning curve
# ----------------------------------------------------------------------------------------------

def unit_features(space: dict, config: dict) -> np.ndarray:
    """The config in the unit cube: numbers scaled to [0, 1] (log scale where searched so), each
    categorical value a one-hot block."""
    out = []
    for key, spec in space.items():
        value = config[key]
        if "values" in spec:
            out.extend(1.0 if value == option else 0.0 for option in spec["values"])
        elif spec.get("distribution") == "log_uniform_values":
            out.append((math.log(value) - math.log(spec["min"])) / (math.log(spec["max"]) - math.log(spec["min"])))
        else:
            out.append((value - spec["min"]) / (spec["max"] - spec["min"]))
    return np.asarray(out)


def category_weights(space: dict) -> np.ndarray:
    """Per feature, its weight in the nearest-config distance (categorical one-hots: CATEGORY_DISTANCE)."""
    return np.concatenate([np.full(len(spec["values"]), CATEGORY_DISTANCE / 2) if "values" in spec else np.ones(1)
                           for spec in space.values()])


class NearestAnswers:
    """A proposed config answered by the nearest recorded config's run of the picked seed."""

    def __init__(self, table: Table, configs: np.ndarray | None = None):
        self.table = table
        self.keep = np.arange(len(table.configs)) if configs is None else np.asarray(configs)
        self.points = np.stack([unit_features(table.space, table.configs[i]) for i in self.keep])
        self.weights = category_weights(table.space)

    def nearest(self, config: dict) -> int:
        distance = (((self.points - unit_features(self.table.space, config)) ** 2) * self.weights).sum(axis=1)
        return int(self.keep[int(np.argmin(distance))])

    def curve(self, config: dict, pick: int) -> np.ndarray:
        return self.table.runs[self.nearest(config), pick % self.table.seeds]


class SurrogateAnswers(NearestAnswers):
    """A Gaussian process per epoch for the mean curve; one recorded seed's deviation for the noise."""

    def __init__(self, table: Table, configs: np.ndarray | None = None):
        super().__init__(table, configs)
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        inputs = np.repeat(self.points, table.seeds, axis=0)
        self.models = []
        for epoch in range(table.epochs):
            target = table.runs[self.keep, :, epoch].reshape(-1)
            kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * Matern(np.full(inputs.shape[1], 0.5), (1e-2, 1e2), nu=2.5)
                      + WhiteKernel(1e-3, (1e-6, 1e1)))
            model = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                self.models.append(model.fit(inputs, target))
        self._means: dict[tuple, np.ndarray] = {}
        recorded = table.runs[self.keep]
        self.low, self.high = recorded.min(axis=(0, 1)), recorded.max(axis=(0, 1))   # per epoch

    def mean_curve(self, config: dict) -> np.ndarray:
        key = tuple(sorted(config.items()))
        if key not in self._means:
            point = unit_features(self.table.space, config)[None, :]
            means = np.array([float(model.predict(point)[0]) for model in self.models])
            self._means[key] = np.clip(means, self.low, self.high)
        return self._means[key]

    def curve(self, config: dict, pick: int) -> np.ndarray:
        near = self.table.runs[self.nearest(config)]
        return self.mean_curve(config) + near[pick % self.table.seeds] - near.mean(axis=0)


ANSWERS = {"nearest": NearestAnswers, "surrogate": SurrogateAnswers}


def held_out_error(table: Table, method: str, folds: int = 5, seed: int = 0) -> dict:
    """How far a replayed answer lands from a recorded run, against how far two recorded runs of one
    config land from each other (the training noise). Each fold's configs are left out of the fit;
    each is asked for with seed k and compared with its own recorded seed k's run, every epoch.
    Returns the medians of |answer - run| and of |run seed a - run seed b| over configs and epochs."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(table.configs))
    errors = []
    for fold in range(folds):
        out = order[fold::folds]
        answers = ANSWERS[method](table, np.setdiff1d(order, out))
        for index in out:
            for pick in range(table.seeds):
                errors.extend(np.abs(answers.curve(table.configs[index], pick) - table.runs[index, pick]))
    pairs = [np.abs(table.runs[:, a] - table.runs[:, b]).reshape(-1)
             for a in range(table.seeds) for b in range(a + 1, table.seeds)]
    return {"method": method, "error": float(np.median(errors)), "noise": float(np.median(np.concatenate(pairs))),
            "error_p90": float(np.percentile(errors, 90)), "noise_p90": float(np.percentile(np.concatenate(pairs), 90))}


# ----------------------------------------------------------------------------------------------
# Arms: a searcher and a scheduler, driven as Tune drives them
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arm:
    """One way to search. searcher: tpe (tune_kd's sampler, or a variant of it), gp (tune_kd's GP: search/gp_sampler.py), "gp, stopped
    trials unseen" (Optuna's GPSampler as it ships) or random;
    scheduler: none, asha (Ray's AsyncHyperBandScheduler; brackets > 1 is its Hyperband form), or
    one of Optuna's pruners (median, sha, hyperband: TPE with Hyperband is Optuna's BOHB-like setting)."""
    name: str
    searcher: str = "tpe"
    scheduler: str = "asha"
    num_samples: int = 16
    startup: int | str = "auto"
    multivariate: bool = True
    group: bool = True
    grace: int = 1
    reduction: int = 2
    brackets: int = 1
    parallel: int = 2
    evaluate_first: bool = True   # the YAML's own settings are the first trial (search.evaluate_train_first)

    def settings(self) -> str:
        parts = [f"{self.num_samples} trials, {self.parallel} at a time"]
        if self.searcher == "tpe":
            kind = "multivariate+group" if self.multivariate and self.group else \
                "multivariate" if self.multivariate else "independent"
            parts.append(f"TPE {kind}, startup {self.startup}")
        elif self.searcher.startswith("gp"):
            parts.append(f"{'GP' if self.searcher == 'gp' else self.searcher}, startup {self.startup}")
        if self.scheduler == "asha":
            parts.append(f"grace {self.grace}, factor {self.reduction}" + (f", {self.brackets} brackets" if self.brackets > 1 else ""))
        return "; ".join(parts)


OPTUNA_PRUNERS = ("median", "sha", "hyperband")


def optuna_sampler(arm: Arm, seed: int):
    """tune_kd's own sampler (samplers.make_sampler: its TPE or GP) for the arm's searcher at the default
    settings, else a TPE that differs only in the arm's settings."""
    import optuna

    from tune_kd.search.samplers import make_sampler, startup_trials

    if arm.searcher == "gp, stopped trials unseen":   # Optuna's GPSampler as it ships: COMPLETE trials only
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False,
                                         n_startup_trials=startup_trials(arm.num_samples, arm.startup))
    if arm.searcher == "gp" or (arm.multivariate and arm.group):
        search = SimpleNamespace(seed=seed, num_samples=arm.num_samples, startup_trials=arm.startup,
                                 sampler=arm.searcher, size_objective=None)
        return make_sampler(SimpleNamespace(search=search, parameters={}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=arm.multivariate, group=arm.group, constant_liar=True,
                                          n_startup_trials=startup_trials(arm.num_samples, arm.startup),
                                          warn_independent_sampling=False)


class RandomSearcher:
    """Ray's random sampling of the space's domains (what BasicVariantGenerator does), seeded."""

    def __init__(self, domains: dict, seed: int, points: list[dict] | None = None):
        self.domains, self.rng, self.points = domains, np.random.default_rng(seed), list(points or [])

    def suggest(self, trial_id: str) -> dict:
        if self.points:
            return self.points.pop(0)
        return {key: domain.sample(random_state=self.rng) for key, domain in self.domains.items()}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


class RayDriver:
    """A Ray Tune searcher and scheduler, called in the order Tune calls them: a result the scheduler
    stops goes to the searcher's on_trial_complete only (Tune withholds it from on_trial_result)."""

    def __init__(self, arm: Arm, space: dict, metric: str, epochs: int, seed: int, first: dict | None = None,
                 warm: list | None = None):
        from ray.tune.schedulers import AsyncHyperBandScheduler

        from tune_kd.search import space as tune_space
        from tune_kd.search.searcher import PruneAwareOptunaSearch

        domains = tune_space.tune_domains(SimpleNamespace(parameters=space))
        self.metric = metric
        if arm.searcher == "random":
            if warm:
                raise ValueError("random search takes no warm start")
            self.searcher = RandomSearcher(domains, seed, [first] if first else None)
        else:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.searcher = PruneAwareOptunaSearch(metric=metric, mode="min", max_epochs=epochs,
                                                   sampler=optuna_sampler(arm, seed), points_to_evaluate=[first] if first else None,
                                                   warm_start=warm_start_of(warm))
            self.searcher.set_search_properties(metric, "min", domains)
        self.scheduler = None if arm.scheduler == "none" else AsyncHyperBandScheduler(
            time_attr="epoch", metric=metric, mode="min", max_t=epochs, grace_period=arm.grace,
            reduction_factor=arm.reduction, brackets=arm.brackets)

    def propose(self, trial_id: str) -> dict:
        config = self.searcher.suggest(trial_id)
        if self.scheduler is not None:
            self.scheduler.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
        return config

    def report(self, trial_id: str, epoch: int, value: float) -> bool:
        """True: the trial goes on."""
        from ray.tune.schedulers import TrialScheduler

        result = {"epoch": epoch, self.metric: value}
        stop = self.scheduler is not None and \
            self.scheduler.on_trial_result(None, SimpleNamespace(trial_id=trial_id), result) == TrialScheduler.STOP
        if not stop:
            self.searcher.on_trial_result(trial_id, result)
        return not stop

    def end(self, trial_id: str, epoch: int, value: float) -> None:
        result = {"epoch": epoch, self.metric: value}
        self.searcher.on_trial_complete(trial_id, result)
        if self.scheduler is not None:   # as Tune ends a stopped or finished trial
            self.scheduler.on_trial_complete(None, SimpleNamespace(trial_id=trial_id), result)


class OptunaDriver:
    """An Optuna study asked and told directly, with one of Optuna's pruners deciding the stops."""

    def __init__(self, arm: Arm, space: dict, metric: str, epochs: int, seed: int, first: dict | None = None,
                 warm: list | None = None):
        import optuna

        from tune_kd.search.searcher import warm_trials

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=arm.grace - 1),
                  "sha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=arm.grace, reduction_factor=arm.reduction),
                  "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=arm.grace, max_resource=epochs,
                                                                      reduction_factor=arm.reduction)}[arm.scheduler]()
        sampler = optuna.samplers.RandomSampler(seed=seed) if arm.searcher == "random" else optuna_sampler(arm, seed)
        # a fixed name: Optuna's Hyperband assigns brackets by hashing it with the trial number
        self.study = optuna.create_study(study_name=f"replay-{seed}", direction="minimize", sampler=sampler, pruner=pruner)
        if first:
            self.study.enqueue_trial(first)
        self.distributions, self.epochs = optuna_distributions(space), epochs
        if warm:
            self.study.add_trials(warm_trials(warm_start_of(warm), self.distributions))
        self.trials, self.values = {}, {}

    def propose(self, trial_id: str) -> dict:
        self.trials[trial_id] = self.study.ask(self.distributions)
        self.values[trial_id] = []
        return dict(self.trials[trial_id].params)

    def report(self, trial_id: str, epoch: int, value: float) -> bool:
        trial = self.trials[trial_id]
        trial.report(value, epoch)
        self.values[trial_id].append(value)
        return not trial.should_prune()

    def end(self, trial_id: str, epoch: int, value: float) -> None:
        import optuna

        if epoch < self.epochs:   # stopped by the pruner: PRUNED, as the search tells an ASHA stop
            self.study.tell(self.trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        else:                     # COMPLETE with its best epoch's value, as the search ranks trials
            self.study.tell(self.trials[trial_id], min(self.values[trial_id]))


def warm_start_of(warm: list | None):
    """An earlier replayed search's trials as the search's WarmStart (search/warm_start.py)."""
    from tune_kd.search.warm_start import WarmStart

    return WarmStart(Path("replay"), list(warm), len(warm)) if warm else None


def optuna_distributions(space: dict) -> dict:
    """The space as Optuna distributions: the search's own Ray domains (space.tune_domains), converted
    as Ray's OptunaSearch converts them."""
    from ray.tune.search.optuna import OptunaSearch

    from tune_kd.search import space as tune_space

    return OptunaSearch.convert_search_space(tune_space.tune_domains(SimpleNamespace(parameters=space)))


def make_driver(arm: Arm, table: Table, seed: int, warm: list | None = None):
    kind = OptunaDriver if arm.scheduler in OPTUNA_PRUNERS else RayDriver
    return kind(arm, table.space, table.metric, table.epochs, seed, table.yaml_point if arm.evaluate_first else None,
                warm)


@dataclasses.dataclass
class Replayed:
    """One replayed search: `values` in report order (report n: the n-th trial-epoch spent) and each
    trial's config and epochs' values (what a later search's warm start reads back)."""
    values: list
    trials: dict   # trial id -> (config, [value per epoch reached])

    def earlier_trials(self, epochs: int) -> list:
        """The trials as search.warm_start gives them to a later search (search/warm_start.EarlierTrial)."""
        from tune_kd.search.warm_start import EarlierTrial

        return [EarlierTrial(trial_id, dict(config), {e: v for e, v in enumerate(values, 1)}, len(values) >= epochs)
                for trial_id, (config, values) in self.trials.items()]


def replay(answers, arm: Arm, seed: int, table: Table | None = None, warm: list | None = None) -> list[float]:
    """One simulated search's values in report order (replay_search's)."""
    return replay_search(answers, arm, seed, table, warm).values


def replay_search(answers, arm: Arm, seed: int, table: Table | None = None, warm: list | None = None) -> Replayed:
    """One simulated search. `parallel` trials run at once; a trial's epoch takes one time unit; a freed
    slot asks the searcher for the next trial until num_samples have started.
    table: the answers' table or a subspace of it (Table.subspace). warm: an earlier search's trials
    (Replayed.earlier_trials) given to the sampler first, as search.warm_start does."""
    table = table or answers.table
    np.random.seed(seed)   # Ray's ASHA draws each trial's bracket from numpy's global generator
    picks = np.random.default_rng(seed + 1_000_003)   # which recorded seed answers each trial
    driver = make_driver(arm, table, seed, warm)
    events, curves, values, started, trials = [], {}, [], 0, {}

    def start(now: int) -> None:
        nonlocal started
        if started >= arm.num_samples:
            return
        trial_id = f"replay_{started:05d}"
        config = driver.propose(trial_id)
        curves[trial_id] = answers.curve({**table.fixed, **config}, int(picks.integers(table.seeds)))
        trials[trial_id] = (config, [])
        started += 1
        heapq.heappush(events, (now + 1, started, trial_id, 1))

    for _ in range(arm.parallel):
        start(0)
    while events:
        now, order, trial_id, epoch = heapq.heappop(events)
        value = float(curves[trial_id][epoch - 1])
        values.append(value)
        trials[trial_id][1].append(value)
        if driver.report(trial_id, epoch, value) and epoch < table.epochs:
            heapq.heappush(events, (now + 1, order, trial_id, epoch + 1))
        else:
            driver.end(trial_id, epoch, value)
            start(now)
    return Replayed(values, trials)
