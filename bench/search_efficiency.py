"""What each part of the search contributes: the sampler (TPE against random) and the scheduler
(ASHA against full budget), measured apart on the embedded default's space.

    python bench/search_efficiency.py [--seeds 0 1 2 3 4] [--num-samples 10] [--epochs 3]
                                      [--max-train-examples 600] [--no-yaml-first]
    python bench/search_efficiency.py --smoke    # seconds, no search: each arm's config built on a toy demo
                                                 # and loaded, and the ASHA replay run on fixed curves (tests/bench)

Six arms per seed (--arms picks), with the same space, trial count and seed (used as both search.seed and
train.seed, so every arm of a seed shares its training noise):

    random        Ray's random sampling, every trial runs all its epochs
    random+asha   the same sampling, ASHA stops weak trials (the YAML's grace period and factor)
    tpe           the project's TPE sampler (samplers.make_sampler), every trial runs all its epochs
    tpe+asha      both
    gp, gp+asha   the project's Gaussian process (search/gp_sampler.py) instead: search.sampler auto's
                  choice on this space, so gp+asha is the YAML's own setting

Compute is counted in trial-epochs (epoch reports, in the order they arrived), not wall time, so a
busy machine slows the bench without biasing it. Per seed and arm the table gives the best val_ce
within the compute of the cheapest arm at that seed (equal compute), the trial-epochs to reach the
random arm's final best at that seed, the arm's total trial-epochs and its final best.

The bench setting is cheaper than the demo's and says so in its output: the demo's 6000 examples x
3 epochs cost about 15 s per trial-epoch on 2 CPU cores; a smaller subset (--max-train-examples)
makes an epoch cheap, and more epochs (--epochs) give ASHA rungs to stop at and let the training
seed matter less against the config. Control arms and the export are off: they are not the search.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.tune import Callback  # noqa: E402

from tune_kd.config.experiment import load_config
from tune_kd.search.runner import run_search

ARMS = {
    "random": {"search.algorithm": "random", "scheduler.type": "none"},
    "random+asha": {"search.algorithm": "random", "scheduler.type": "asha"},
    "tpe": {"search.algorithm": "optuna", "search.sampler": "tpe", "scheduler.type": "none"},
    "tpe+asha": {"search.algorithm": "optuna", "search.sampler": "tpe", "scheduler.type": "asha"},
    "gp": {"search.algorithm": "optuna", "search.sampler": "gp", "scheduler.type": "none"},
    "gp+asha": {"search.algorithm": "optuna", "search.sampler": "gp", "scheduler.type": "asha"},
}


class Reports(Callback):
    """Every epoch report's metric value, in arrival order: report n is the n-th trial-epoch spent."""

    def __init__(self, metric: str):
        self.metric, self.values = metric, []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.values.append(float(result.get(self.metric, float("nan"))))


def run_one(args, arm: str, seed: int, storage: Path, smoke: dict | None = None) -> dict:
    """One arm's search at one seed; with smoke (overrides for a toy demo), only its config, loaded."""
    overrides = {**ARMS[arm], "search.seed": seed, "train.seed": seed, "search.num_samples": args.num_samples,
                 "train.epochs": args.epochs, "data.max_train_examples": args.max_train_examples,
                 "name": f"efficiency-{arm.replace('+', '-')}-seed{seed}", "controls.plain_sft": False,
                 "controls.minimind_defaults": False, "controls.seeds": 0,
                 "search.evaluate_train_first": not args.no_yaml_first}
    if Path(args.space).name == "kd.yaml":   # the figures in docs/ were measured on the demo's train.jsonl
        overrides["data.path"] = "results/demo/data/train.jsonl"
    cfg = load_config(args.space, {**overrides, **(smoke or {})})
    if smoke is not None:
        return {"arm": arm, "seed": seed, "config": cfg}
    reports = Reports(cfg.metric.name)
    started = time.monotonic()
    run_search(cfg, args.space, storage=str(storage), num_cpus=args.num_cpus, callbacks=[reports],
               export_best=False, dashboard_host=None)
    return {"arm": arm, "seed": seed, "values": reports.values, "wall": time.monotonic() - started}


def replay_asha(curves: list[list[float]], parallel: int, grace: int, reduction: int, epochs: int) -> list[float]:
    """random+asha without running it: the random arm's trials (same seed: same configs, same training,
    so the same curves) in their order through Ray's own ASHA bracket, `parallel` at a time, every
    epoch one time unit. Returns the epoch values in the order they would have arrived."""
    import heapq
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket, events, values, queue = _Bracket(grace, epochs, reduction, 0), [], [], list(range(len(curves)))
    start = lambda index, now: heapq.heappush(events, (now + 1, index, 1))  # noqa: E731
    for index in queue[:parallel]:
        start(index, 0)
    queue = queue[parallel:]
    while events:
        now, index, epoch = heapq.heappop(events)
        value = curves[index][epoch - 1]
        values.append(value)
        decision = bracket.on_result(SimpleNamespace(trial_id=index), epoch, -value)   # Ray maximises -val_ce
        if decision == TrialScheduler.STOP or epoch == len(curves[index]):
            if queue:
                start(queue.pop(0), now)
        else:
            heapq.heappush(events, (now + 1, index, epoch + 1))
    return values


def replayed(runs: list[dict], have: set, storage: Path, parallel: int, grace: int, reduction: int,
             epochs: int) -> list[dict]:
    """A replayed random+asha run for every seed whose random run is among `runs` (one runs.json's,
    its folders under `storage`) and whose random+asha is not in `have` (every file's)."""
    import csv

    out = []
    for run in runs:
        if run["arm"] == "random" and (run["seed"], "random+asha") not in have:
            folder = storage / f"efficiency-random-seed{run['seed']}"
            curves = [[float(row["val_ce"]) for row in csv.DictReader((trial / "progress.csv").open())]
                      for trial in sorted(folder.glob("trial_*"))]
            out.append({"arm": "random+asha", "seed": run["seed"], "wall": float("nan"), "replayed": True,
                        "values": replay_asha(curves, parallel, grace, reduction, epochs)})
    return out


def seconds(value: float) -> str:
    return f"{value:.0f} s" if value == value else "-"   # a replayed arm has no wall time


def best(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return min(finite) if finite else float("inf")


def to_target(values: list[float], target: float) -> int | None:
    """Trial-epochs spent up to the first report at or below target; None if never."""
    return next((n for n, v in enumerate(values, start=1) if v <= target), None)


def table(runs: list[dict]) -> str:
    """Per seed and arm, then the mean per arm, and the ratio line."""
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["seed"], r["arm"]): r for r in runs}
    lines = ["| arm | seed | best val_ce at equal compute | trial-epochs to random's best | trial-epochs total "
             "| best val_ce | wall |", "|---|---|---|---|---|---|---|"]
    per_arm: dict[str, list] = {arm: [] for arm in ARMS}
    ratios, wins = [], []
    for seed in seeds:
        present = [by[(seed, a)] for a in ARMS if (seed, a) in by]
        if (seed, "random") not in by:
            continue
        equal = min(len(r["values"]) for r in present)
        target = best(by[(seed, "random")]["values"])
        for run in present:
            at_equal, reached = best(run["values"][:equal]), to_target(run["values"], target)
            per_arm[run["arm"]].append((at_equal, reached, len(run["values"]), best(run["values"]), run["wall"]))
            lines.append(f"| {run['arm']}{' (replayed)' if run.get('replayed') else ''} | {seed} | {at_equal:.4f} ({equal}) | {reached or 'not reached'} | "
                         f"{len(run['values'])} | {best(run['values']):.4f} | {seconds(run['wall'])} |")
        if (seed, "tpe+asha") in by:
            tpe_asha, random = by[(seed, "tpe+asha")], by[(seed, "random")]
            # not reached: its whole spend stands in, a lower bound on what it would have needed
            ratios.append((to_target(tpe_asha["values"], target) or len(tpe_asha["values"]))
                          / to_target(random["values"], target))
            if (seed, "random+asha") in by:
                wins.append(best(tpe_asha["values"][:equal]) < best(by[(seed, "random+asha")]["values"][:equal]))
    fmean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    for arm, rows in per_arm.items():
        if rows:
            reached = [r[1] for r in rows if r[1] is not None]
            lines.append(f"| **{arm}, mean** | {len(rows)} seeds | {fmean([r[0] for r in rows]):.4f} | "
                         f"{fmean(reached):.1f} ({len(reached)}/{len(rows)} reached) | {fmean([r[2] for r in rows]):.1f} | "
                         f"{fmean([r[3] for r in rows]):.4f} | {seconds(fmean([r[4] for r in rows if r[4] == r[4]]))} |")
    lines += ["", f"tpe+asha below random+asha at equal compute: {sum(wins)}/{len(wins)} seeds",
              f"per seed, TPE+ASHA / random to reach random's best: {', '.join(f'{r:.2f}' for r in ratios)}",
              f"trial-epochs ratio (TPE+ASHA / random, to reach random's best): {fmean(ratios):.2f}"]
    return "\n".join(lines)


def smoke(args) -> None:
    """--smoke: every arm's config as run_one builds it, on a toy demo, loaded by tune_kd's config
    loader (no search: a Ray search per arm costs minutes here); then replay_asha, which drives Ray's
    private ASHA bracket, on fixed curves."""
    import _smoke

    folder = _smoke.scratch("search-efficiency")
    overrides = _smoke.demo_overrides(_smoke.tiny_demo(folder / "demo"), "train.jsonl")
    args.num_samples, args.epochs, args.max_train_examples = 2, 2, 32
    for arm in ARMS:
        cfg = run_one(args, arm, 0, folder, smoke=overrides)["config"]
        print(f"# {arm}: config loads: {cfg.search.algorithm}, scheduler {cfg.scheduler.type}, "
              f"{cfg.search.num_samples} trials x {cfg.train.epochs} epochs (search not run under --smoke)")
    curves = [[3.0, 2.0, 1.5], [3.5, 3.4, 3.3], [2.5, 1.8, 1.2], [4.0, 3.9, 3.8]]   # two good, two poor trials
    values = replay_asha(curves, 2, 1, 2, 3)
    print(f"replayed random+asha on {len(curves)} fixed curves: {len(values)} trial-epochs of {3 * len(curves)}, "
          f"best {best(values):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default="search_spaces/kd.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train-examples", type=int, default=600)
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--no-yaml-first", action="store_true", help="the searchers alone: the YAML's own settings "
                        "are not the first trial (as bench/search_replay.py compares them)")
    parser.add_argument("--storage", help="where the searches' folders go (default: a temporary folder)")
    parser.add_argument("--table-from", nargs="+", help="print the table of earlier runs' runs.json files and exit")
    parser.add_argument("--replay-asha", action="store_true", help="with --table-from: replay random+asha from the "
                        "random arm's curves where it was not run (2 at a time, the YAML's grace 1, factor 2)")
    parser.add_argument("--smoke", action="store_true", help="seconds, no search (see above)")
    args = parser.parse_args()
    if args.smoke:
        smoke(args)
        return
    if args.table_from:
        files = {path: json.loads(Path(path).read_text()) for path in args.table_from}
        runs = [run for runs_of_file in files.values() for run in runs_of_file]
        if args.replay_asha:
            have = {(r["seed"], r["arm"]) for r in runs}
            runs += [run for path, runs_of_file in files.items()
                     for run in replayed(runs_of_file, have, Path(path).parent, 2, 1, 2, args.epochs)]
        print(table(runs))
        return
    logging.basicConfig(level=logging.WARNING)
    storage = Path(args.storage or tempfile.mkdtemp(prefix="tune_kd-efficiency-"))
    storage.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(run_one(args, arm, seed, storage))
            (storage / "runs.json").write_text(json.dumps(runs))   # the table can be rebuilt from it
            print(f"# {arm} seed {seed}: {len(runs[-1]['values'])} trial-epochs, best {best(runs[-1]['values']):.4f}, "
                  f"{runs[-1]['wall']:.0f} s", flush=True)
    print(f"\nsearch efficiency: {args.space} with {args.num_samples} trials, train.epochs {args.epochs}, "
          f"data.max_train_examples {args.max_train_examples}, seeds {args.seeds} (folders: {storage})\n")
    print(table(runs))


if __name__ == "__main__":
    main()
