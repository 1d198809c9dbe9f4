"""Which searcher, pruner and budget reach a good config soonest: every arm replayed over many seeds
against the recorded learning-curve tables (bench/curves/), in seconds instead of hours.

    python bench/search_replay.py [--tables default minimind] [--spaces recorded kd.yaml] [--seeds 20]
                                  [--answers surrogate] [--arms ...] [--budgets 8 16 24 32 48]
                                  [--sweep-seeds 20] [--warm-seeds 20] [--no-warm-start]
                                  [--out results/search-replay] [--processes 2]
    python bench/search_replay.py --smoke    # seconds: one table's kd.yaml keys, 1 seed, one process, the
                                             # nearest recorded run's answers, no held-out error, budgets
                                             # 8 and 24, a scratch folder (tests/bench)

Per table: the answers' error on held-out configs against the recorded training noise, then for each
arm and seed one replayed search (bench/curves/replay.py). A table is searched over every key it
recorded (`recorded`: five, kd_loss categorical) and over the three search_spaces/kd.yaml searches
(`kd.yaml`: the rest held at the YAML's values, Table.subspace). Compute is counted in trial-epochs
(one epoch of one trial), the axis of every figure and ratio:

    regret          (best value so far - the table's best) / (the median run's best - the table's best):
                    1 is a median run, 0 the best value any recorded run reached
    target          random search's median final best: the `random` arm (RANDOM_TRIALS trials, every
                    trial to the last epoch), median over the seeds of its best value
    to target       trial-epochs until a search's best so far first reaches the target; random's own
                    are measured on a longer random search (the same seed: the same first trials)
    ratio           an arm's trial-epochs to target at one seed / random's median trial-epochs to target

Warm starts (WARM_STARTS): the default search started from an earlier replayed search's trials, as
search.warm_start gives them (search/warm_start.py): from the other table's 24-trial search of the same
keys, and from a 12-trial search of the same table at another search.seed. Their trial-epochs are the
new search's only (the earlier search was already paid for).

Every search starts from its searcher's own proposals (--yaml-first: from the recorded YAML's settings,
as search.evaluate_train_first does; on the embedded default's table that point alone already reaches
random search's median final best, so every arm ties there).

Prints per table a markdown table (median and interquartile range over seeds), writes the regret
figure (<out>/search-replay.png) and <out>/search-replay.json, and ends with one line per table:

    default/random trial-epochs to random's final best: X (median of N seeds, IQR A-B), table T (the default there: ARM)

"default" is the arm tune_kd runs on that table's space (default_arm: samplers.sampler_choice's
sampler with search.sampler auto, the scheduler's defaults, search.num_samples' default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "curves")]

from replay import ANSWERS, Arm, Table, held_out_error, replay, replay_search  # noqa: E402

from tune_kd.config.experiment import SchedulerConfig, SearchConfig

# the shipped default: search.num_samples' and the scheduler's defaults, the project's TPE
DEFAULT_TRIALS = SearchConfig().num_samples
RANDOM_TRIALS = DEFAULT_TRIALS   # the reference: random search of the same trial count, every trial to the end
LONG_RANDOM = 4                  # random's own trial-epochs to target: a random search this many times longer
DEFAULT_ARMS = {"tpe": "tpe+asha", "gp": "gp+asha"}   # samplers.sampler_choice's answer -> the arm it runs
_default = Arm("tpe+asha", num_samples=DEFAULT_TRIALS, grace=SchedulerConfig().grace_period,
               reduction=SchedulerConfig().reduction_factor)
BUDGETS = (8, 16, 24, 32, 48)    # default search against random search, trial count for trial count
FROM_OTHER_TABLE = "from the other table"             # the other recorded table's search (24 trials), same keys
FROM_EARLIER_TRIALS = "from 12 trials, another seed"   # a 12-trial search of the same table at another search.seed
WARM_STARTS = (FROM_OTHER_TABLE, FROM_EARLIER_TRIALS)
EARLIER_TRIALS, EARLIER_SEED = 12, 5_000
SIDE_SEEDS = 20   # the budget sweep's and the warm starts' seeds (--sweep-seeds, --warm-seeds): a GP search costs seconds
KD_YAML_KEYS = ["learning_rate", "temperature", "alpha"]   # what search_spaces/kd.yaml searches

ARMS = [
    dataclasses.replace(_default, name="random", searcher="random", scheduler="none"),
    dataclasses.replace(_default, name="random+asha", searcher="random"),
    dataclasses.replace(_default, name="tpe", scheduler="none"),
    _default,
    dataclasses.replace(_default, name="tpe+asha, factor 3", reduction=3),
    dataclasses.replace(_default, name="tpe+asha, grace 2", grace=2),
    dataclasses.replace(_default, name="tpe+asha, 3 brackets (hyperband)", brackets=3),
    dataclasses.replace(_default, name="tpe+optuna median", scheduler="median"),
    dataclasses.replace(_default, name="tpe+optuna sha", scheduler="sha"),
    dataclasses.replace(_default, name="tpe+optuna hyperband (bohb-like)", scheduler="hyperband"),
    dataclasses.replace(_default, name="tpe+asha, startup 2", startup=2),
    dataclasses.replace(_default, name="tpe+asha, startup 10", startup=10),
    dataclasses.replace(_default, name="tpe+asha, independent tpe", multivariate=False, group=False),
    dataclasses.replace(_default, name="tpe+asha, multivariate, no group", group=False),
    dataclasses.replace(_default, name="gp", searcher="gp", scheduler="none"),
    dataclasses.replace(_default, name="gp+asha", searcher="gp"),
    dataclasses.replace(_default, name="gp+optuna median", searcher="gp", scheduler="median"),
    dataclasses.replace(_default, name="gp+optuna sha", searcher="gp", scheduler="sha"),
    dataclasses.replace(_default, name="gp+optuna hyperband", searcher="gp", scheduler="hyperband"),
    dataclasses.replace(_default, name="gp+asha, stopped trials unseen", searcher="gp, stopped trials unseen"),
    dataclasses.replace(_default, name="gp+asha, startup 2", searcher="gp", startup=2),
]
ALWAYS_ARMS = ("random", "random+asha", "tpe", *DEFAULT_ARMS.values())   # run whatever --arms names
FIGURE_ARMS = ("random", "random+asha", "tpe", "tpe+asha", "gp", "gp+asha")

_answers: dict = {}   # recorded table name -> its answers, built before the workers fork
_searched: dict = {}  # searched table name -> (recorded table name, the Table searched: all its keys or a subspace)


def one(job: tuple) -> tuple[str, str, int, list[float]]:
    """One replayed search: (table, arm, seed), or (table, arm, seed, warm start) for a search started
    from an earlier one's trials (WARM_STARTS), the earlier one replayed first in the same worker."""
    import torch

    torch.set_num_threads(1)   # GPSampler's fits: one thread per worker process, not two fighting for two cores
    name, arm, seed, *warm_start = job
    recorded, table = _searched[name]
    if not warm_start:
        return name, arm.name, seed, replay(_answers[recorded], arm, seed, table)
    source = warm_start[0]
    earlier_name = other_table(name) if source == FROM_OTHER_TABLE else name
    earlier_recorded, earlier_table = _searched[earlier_name]
    earlier_arm = arm if source == FROM_OTHER_TABLE else dataclasses.replace(arm, num_samples=EARLIER_TRIALS)
    # another search.seed for the earlier search: not the same proposals replayed twice
    earlier = replay_search(_answers[earlier_recorded], earlier_arm, seed + EARLIER_SEED, earlier_table)
    warm = earlier.earlier_trials(earlier_table.epochs)
    return name, warm_arm_name(arm, source), seed, replay(_answers[recorded], arm, seed, table, warm)


def other_table(name: str) -> str | None:
    """The table a cross-table warm start reads: the other recorded table searched over the same keys
    (None without exactly one)."""
    recorded, table = _searched[name]
    others = [other for other, (rec, view) in _searched.items() if rec != recorded and view.space.keys() == table.space.keys()]
    return others[0] if len(others) == 1 else None


def warm_arm_name(arm: Arm, source: str) -> str:
    return f"{arm.name}, warm start {source}"


def default_arm(table: Table, arms: list[Arm]) -> Arm:
    """The arm tune_kd runs on this table's space: samplers.sampler_choice's sampler (search.sampler
    auto), with the scheduler's defaults (DEFAULT_ARMS)."""
    from tune_kd.search.samplers import sampler_choice

    search = SimpleNamespace(sampler="auto", size_objective=None, algorithm="optuna")
    name = DEFAULT_ARMS[sampler_choice(SimpleNamespace(search=search, parameters=table.space))[0]]
    return next(arm for arm in arms if arm.name == name)


def to_target(values: list[float], target: float) -> float:
    """Trial-epochs up to the first report at or below target; inf if never."""
    hit = np.nonzero(np.asarray(values) <= target)[0]
    return float(hit[0] + 1) if hit.size else float("inf")


def best_so_far(values: list[float], length: int) -> np.ndarray:
    """The running best over `length` trial-epochs (a search that ended keeps its final best)."""
    running = np.minimum.accumulate(np.asarray(values, dtype=float))
    return np.concatenate([running, np.full(max(0, length - running.size), running[-1])])[:length]


def quartiles(values) -> tuple[float, float, float]:
    q1, median, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75], method="inverted_cdf")
    return float(median), float(q1), float(q3)


def fmt(value: float, digits: int = 2) -> str:
    return "not reached" if value == float("inf") else f"{value:.{digits}f}"


def summarise(table: Table, runs: dict[str, dict[int, list[float]]], arms: list[Arm]) -> dict:
    """Per arm: ratio to random's trial-epochs to target, final regret, trial-epochs spent (median, IQR)."""
    best, spread = table.best_and_spread()
    budget = RANDOM_TRIALS * table.epochs
    long_random = runs["random (long)"]
    random_finals = [min(values[:budget]) for values in long_random.values()]
    target = float(np.median(random_finals))
    random_to = float(np.median([to_target(values, target) for values in long_random.values()]))
    out = {"best": best, "spread": spread, "target": target, "random_trial_epochs_to_target": random_to,
           "random_budget": budget, "arms": {}}
    for arm in arms:
        per_seed = runs[arm.name]
        values_of = {seed: (values[:budget] if arm.name == "random" else values) for seed, values in per_seed.items()}
        ratios = [to_target(values, target) / random_to for values in values_of.values()]
        finals = [(min(values) - best) / spread for values in values_of.values()]
        spent = [len(values) for values in values_of.values()]
        out["arms"][arm.name] = {"settings": arm.settings(), "ratio": quartiles(ratios), "final_regret": quartiles(finals),
                                 "trial_epochs": quartiles(spent), "reached": sum(r != float("inf") for r in ratios),
                                 "seeds": len(ratios)}
    return out


def budget_sweep(table: Table, runs: dict[str, dict[int, list[float]]]) -> list[dict]:
    """The default search against random search of the same trial count, for each budget swept."""
    out = []
    for trials in sorted({int(arm.split()[1]) for arm in runs if arm.startswith("default, ")}):
        budget = trials * table.epochs
        long_random = runs["random (long)"].values()
        target = float(np.median([min(values[:budget]) for values in long_random]))
        random_to = float(np.median([to_target(values, target) for values in long_random]))
        ratios = [to_target(values, target) / random_to for values in runs[f"default, {trials} trials"].values()]
        out.append({"trials": trials, "target": target, "random_trial_epochs_to_target": random_to,
                    "ratio": quartiles(ratios), "reached": sum(r != float("inf") for r in ratios), "seeds": len(ratios)})
    return out


def markdown(name: str, summary: dict) -> str:
    lines = [f"**{name}**: target {summary['target']:.4f} (random's median final best after {summary['random_budget']} "
             f"trial-epochs); random reaches it in {summary['random_trial_epochs_to_target']:.0f} trial-epochs (median)",
             "", "| arm | settings | trial-epochs to target / random's | final regret | trial-epochs spent | reached |",
             "|---|---|---|---|---|---|"]
    for arm, row in summary["arms"].items():
        (r, r1, r3), (g, g1, g3), (s, s1, s3) = row["ratio"], row["final_regret"], row["trial_epochs"]
        lines.append(f"| {arm} | {row['settings']} | {fmt(r)} ({fmt(r1)}-{fmt(r3)}) | {g:.3f} ({g1:.3f}-{g3:.3f}) "
                     f"| {s:.0f} ({s1:.0f}-{s3:.0f}) | {row['reached']}/{row['seeds']} |")
    lines += ["", f"**{name}**, the default ({summary['default']}) against random search of as many trials:", "",
              "| trials | random's median final best | random's trial-epochs to it | default / random | reached |",
              "|---|---|---|---|---|"]
    for row in summary["budgets"]:
        r, r1, r3 = row["ratio"]
        lines.append(f"| {row['trials']} | {row['target']:.4f} | {row['random_trial_epochs_to_target']:.0f} "
                     f"| {fmt(r)} ({fmt(r1)}-{fmt(r3)}) | {row['reached']}/{row['seeds']} |")
    return "\n".join(lines)


def figure(tables: dict[str, Table], runs: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(tables))
    rows = -(-len(tables) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.2 * rows), squeeze=False)
    for ax, (name, table) in zip(axes.reshape(-1), tables.items()):
        best, spread = table.best_and_spread()
        length = RANDOM_TRIALS * table.epochs
        for arm in (arm for arm in FIGURE_ARMS if arm in runs[name]):
            curves = np.stack([(best_so_far(v, length) - best) / spread for v in runs[name][arm].values()])
            q1, median, q3 = np.percentile(curves, [25, 50, 75], axis=0)
            x = np.arange(1, length + 1)
            ax.plot(x, median, label=arm)
            ax.fill_between(x, q1, q3, alpha=0.15)
        ax.set_yscale("symlog", linthresh=0.05)
        ax.set_xlabel("trial-epochs")
        ax.set_ylabel("normalised regret (median, IQR)")
        ax.set_title(f"table {name}: {len(table.space)} keys searched; {len(table.configs)} configs x {table.seeds} "
                     f"seeds, {table.epochs} epochs", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "search-replay.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", nargs="+", default=["default", "minimind"])
    parser.add_argument("--spaces", nargs="+", choices=["recorded", "kd.yaml"], default=["recorded", "kd.yaml"],
                        help="recorded: every key a table recorded (kd_loss and warmup_iters too); kd.yaml: the "
                        "keys search_spaces/kd.yaml searches, the rest at the YAML's own values")
    parser.add_argument("--curves", default=str(ROOT / "bench" / "curves"), help="where the tables are")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--answers", choices=list(ANSWERS), default="surrogate")
    parser.add_argument("--arms", nargs="+", help="arm names (default: all)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--no-held-out", action="store_true", help="skip measuring the answers' held-out error")
    parser.add_argument("--yaml-first", action="store_true", help="every search's first trial is the recorded YAML's "
                        "own settings, as search.evaluate_train_first does (default: the searchers alone)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="the default's budget sweep: "
                        "trial counts (random search's long run is LONG_RANDOM times the largest of BUDGETS)")
    parser.add_argument("--sweep-seeds", type=int, default=SIDE_SEEDS, help="seeds of the default's budget sweep "
                        "(at most --seeds; the GP's 48-trial searches cost seconds each)")
    parser.add_argument("--warm-seeds", type=int, default=SIDE_SEEDS, help="seeds of the warm-started searches (at most --seeds)")
    parser.add_argument("--no-warm-start", action="store_true", help="skip the warm-started searches (WARM_STARTS)")
    parser.add_argument("--out", default=str(ROOT / "results" / "search-replay"))
    parser.add_argument("--smoke", action="store_true", help="seconds: the minimind table, --seeds 1 --processes 1 "
                        "--answers nearest --no-held-out (the surrogate's Gaussian processes and the held-out "
                        "measurement take minutes), --out a scratch folder unless given")
    args = parser.parse_args(argv)
    if args.smoke:
        import _smoke

        args.tables, args.seeds, args.processes, args.no_held_out = ["minimind"], 1, 1, True
        args.spaces, args.budgets = ["kd.yaml"], [8, 24]   # the GP's searches are the smoke's seconds
        args.answers, args.arms = "nearest", args.arms or list(ALWAYS_ARMS)
        if args.out == parser.get_default("out"):
            args.out = str(_smoke.scratch("search-replay"))
    started = time.perf_counter()
    arms = [dataclasses.replace(arm, evaluate_first=args.yaml_first) for arm in ARMS
            if not args.arms or arm.name in args.arms or arm.name in ALWAYS_ARMS]
    tables = {}
    for name in args.tables:
        path = Path(args.curves) / f"{name}.csv"
        if not path.is_file():
            print(f"error: {path} does not exist (record it: python bench/curves/record.py --table {name})", file=sys.stderr)
            return 2
        tables[name] = Table.load(path)
        table = tables[name]
        print(f"table {name}: {len(table.configs)} configs x {table.seeds} seeds x {table.epochs} epochs ({path})")
        if not args.no_held_out:
            for method in ANSWERS:
                error = held_out_error(table, method)
                print(f"  {method} answers on held-out configs: median |answer - run| {error['error']:.4f} "
                      f"(p90 {error['error_p90']:.4f}); training noise, median |seed a - seed b| {error['noise']:.4f} "
                      f"(p90 {error['noise_p90']:.4f})")
        _answers[name] = ANSWERS[args.answers](table)
        if "recorded" in args.spaces:
            _searched[name] = (name, table)
        if "kd.yaml" in args.spaces:
            view = table.subspace(KD_YAML_KEYS)
            _searched[view.name] = (name, view)
    tables = {name: view for name, (_, view) in _searched.items()}
    long_random = dataclasses.replace(arms[0], name="random (long)", num_samples=max(BUDGETS) * LONG_RANDOM)
    defaults = {name: default_arm(table, arms) for name, table in tables.items()}
    jobs = [(name, arm, seed) for name in tables for arm in [long_random, *(a for a in arms if a.name != "random")]
            for seed in range(args.seeds)]
    jobs += [(name, dataclasses.replace(defaults[name], name=f"default, {trials} trials", num_samples=trials), seed)
             for name in tables for trials in args.budgets for seed in range(min(args.sweep_seeds, args.seeds))]
    sources = {name: [] if args.no_warm_start else [source for source in WARM_STARTS
                                                    if source != FROM_OTHER_TABLE or other_table(name)]
               for name in tables}
    warm = {name: [dataclasses.replace(defaults[name], name=warm_arm_name(defaults[name], source)) for source in sources[name]]
            for name in tables}
    jobs += [(name, defaults[name], seed, source) for name in tables for source in sources[name]
             for seed in range(min(args.warm_seeds, args.seeds))]
    replay_started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(args.processes) as pool:
        done = pool.map(one, jobs, chunksize=4)
    replay_seconds = time.perf_counter() - replay_started
    runs: dict = {name: {} for name in tables}
    for name, arm, seed, values in done:
        runs[name].setdefault(arm, {})[seed] = values
    for name, values in runs.items():   # the reference arm is the long run's first RANDOM_TRIALS trials
        values["random"] = {seed: v[:RANDOM_TRIALS * tables[name].epochs] for seed, v in values["random (long)"].items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {name: {**summarise(table, runs[name], arms + warm[name]), "default": defaults[name].name,
                        "budgets": budget_sweep(table, runs[name])} for name, table in tables.items()}
    for name, summary in summaries.items():
        print("\n" + markdown(name, summary))
        ranked = sorted(summary["arms"].items(), key=lambda item: (item[1]["ratio"][0], item[1]["final_regret"][0]))
        print(f"\n{name}, fastest to random's final best (median ratio, then final regret): "
              + "; ".join(f"{arm} {fmt(row['ratio'][0])}" for arm, row in ranked[:4]))
    plot = figure(tables, runs, out)
    (out / "search-replay.json").write_text(json.dumps({"answers": args.answers, "seeds": args.seeds,
                                                         "summaries": summaries}, indent=1))
    print(f"\n{len(jobs)} replayed searches ({args.seeds} seeds) in {replay_seconds:.1f} s, "
          f"{time.perf_counter() - started:.1f} s in all; figure {plot}")
    for name, summary in summaries.items():
        row = summary["arms"][summary["default"]]
        ratio, q1, q3 = row["ratio"]
        print(f"default/random trial-epochs to random's final best: {fmt(ratio)} (median of {row['seeds']} seeds, "
              f"IQR {fmt(q1)}-{fmt(q3)}), table {name} (the default there: {summary['default']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
