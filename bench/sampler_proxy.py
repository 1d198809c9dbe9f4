"""Which Optuna sampler for 8-50 trial searches? A seconds-long proxy, not the demo: a smooth,
noisy stand-in for val_ce over the embedded default's space (log lr, T, alpha), asked two at a
time as the 2-core demo runs, with the samplers Optuna ships that need no download.

    python bench/sampler_proxy.py [--trials 12] [--seeds 20]
    python bench/sampler_proxy.py --smoke    # seconds: 4 trials, 1 seed (tests/bench)

Prints the mean best value after the budget and the seconds each sampler spent proposing.
The stand-in's optimum and curvature are guesses shaped like the demo's (lr matters most, alpha
next, T least); it ranks samplers on a small budget, it does not predict the demo's figures.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stand_in(lr: float, temperature: float, alpha: float, rng: np.random.Generator) -> float:
    return (0.9 + 0.25 * (math.log10(lr) - math.log10(3e-3)) ** 2 + 0.01 * (temperature - 2.0) ** 2
            + 0.15 * (alpha - 0.3) ** 2 + 0.15 * (math.log10(lr) - math.log10(3e-3)) * (alpha - 0.3)
            + rng.normal(0.0, 0.01))


def samplers(trials: int, seed: int) -> dict:
    from tune_kd.search.samplers import startup_trials

    startup = startup_trials(trials)
    return {
        "random": optuna.samplers.RandomSampler(seed=seed),
        "tpe (Optuna defaults)": optuna.samplers.TPESampler(seed=seed),
        "tpe (tune_kd: startup from budget, multivariate, group, liar)": optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True),
        "gp": optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup),
        "qmc (sobol)": optuna.samplers.QMCSampler(seed=seed, scramble=True),
    }


def run(sampler, trials: int, seed: int, parallel: int = 2) -> tuple[float, float]:
    study = optuna.create_study(sampler=sampler)
    rng, spent = np.random.default_rng(seed), 0.0
    while len(study.trials) < trials:
        started = time.monotonic()
        asked = [study.ask() for _ in range(min(parallel, trials - len(study.trials)))]   # concurrent asks
        points = [(t.suggest_float("lr", 5e-4, 1e-2, log=True), t.suggest_float("T", 1.0, 5.0),
                   t.suggest_float("alpha", 0.0, 1.0)) for t in asked]
        spent += time.monotonic() - started
        for trial, point in zip(asked, points):
            study.tell(trial, stand_in(*point, rng))
    return study.best_value, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="seconds: --trials 4 --seeds 1")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.seeds = [4], 1
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print("| sampler | trials | mean best (stand-in) | median | proposing, s per search |\n|---|---|---|---|---|")
    for trials in args.trials:
        results: dict[str, list] = {}
        for seed in range(args.seeds):
            for name, sampler in samplers(trials, seed).items():
                results.setdefault(name, []).append(run(sampler, trials, seed))
        for name, rows in results.items():
            bests = [r[0] for r in rows]
            print(f"| {name} | {trials} | {statistics.fmean(bests):.4f} | {statistics.median(bests):.4f} | "
                  f"{statistics.fmean(r[1] for r in rows):.2f} |")


if __name__ == "__main__":
    main()
