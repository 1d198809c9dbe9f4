"""Does one size/quality search find a better front than a grid of shapes? And what should ASHA do
when trials differ in size?

    python bench/shape_front.py [--seeds 0 1 2] [--num-samples 12] [--max-train-examples 2000]
                                [--num-cpus 2] [--orders 200]
    python bench/shape_front.py --smoke    # seconds, no search: a toy demo in a scratch folder, the search's
                                           # config loaded, a grid of 2 tiny shapes x 2 epochs, 4 ASHA orders

Per seed (used as search.seed and train.seed):

    search   search_spaces/student_shape.yaml (shape, init, lr, T, alpha; two objectives, ASHA within
             size brackets), num_samples trials, control arms off, --max-train-examples conversations
             per epoch (the YAML's 6000 would triple the bench's hours); every epoch report is recorded
             in arrival order (a trial-epoch each)
    grid     GRID's 9 shapes (hidden 32/64/128 x 1/2/4 layers, MLP 3 x hidden, heads of 32), each trained
             once by the loop for the YAML's epochs with its fixed settings (random init, lr 3e-3, T 2,
             alpha 0.5): 27 trial-epochs, two at a time

Equal compute: the search's front is taken over its first 27 trial-epochs only (each trial valued at
its best epoch among those reported by then; front.py's rule), against the grid's 9 points (each at
its best epoch). A grid point is covered when a front point is at least as small and at least as good
(front.covered); the table gives the share per seed and over all seeds (target: >= 80%).

ASHA across sizes: the grid's full learning curves (9 shapes, per seed) replayed through the project's
own scheduler (searcher.PersistentASHA, grace 1, factor 2), two trials at a time, in --orders random
trial orders per seed, as plain ASHA (size_bracket_ratio 0) and within factor-2 size brackets. Per
variant: how often it stops a student on the grid's true front (from the full curves), and the
trial-epochs it spends. Results go to results/shape-front/ (git-ignored); everything printed is also
written to results/shape-front/shape_front.json. Measured: docs/search.md, "Searching the student's shape".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray.tune import Callback  # noqa: E402

from tune_kd.config.experiment import load_config
from tune_kd.results import front

SPACE = ROOT / "search_spaces" / "student_shape.yaml"
GRID = [(hidden, layers) for hidden in (32, 64, 128) for layers in (1, 2, 4)]
OUT = ROOT / "results" / "shape-front"
SMOKE_OVERRIDES: dict = {}     # --smoke: the YAML pointed at a toy demo (bench/_smoke.py), 2 epochs


class Reports(Callback):
    """(trial id, epoch, val_ce, student_params) of every epoch report, in arrival order."""

    def __init__(self):
        self.rows = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.rows.append((trial.trial_id, result["epoch"], result.get("val_ce"), result.get("student_params")))


def run_search(seed: int, num_samples: int, num_cpus: int, examples: int) -> list[tuple]:
    from tune_kd.search.runner import run_search as search

    cfg = load_config(SPACE, {"search.seed": seed, "train.seed": seed, "search.num_samples": num_samples,
                              "name": f"shape-search-seed{seed}", "controls.plain_sft": False,
                              "data.max_train_examples": examples, **SMOKE_OVERRIDES})
    if SMOKE_OVERRIDES:
        print(f"search: not run under --smoke (its config loads: {cfg.name}, objectives {cfg.search.objectives})")
        return []
    reports = Reports()
    search(cfg, str(SPACE), storage=str(OUT), num_cpus=num_cpus, callbacks=[reports], export_best=False,
           dashboard_host=None)
    return reports.rows


def train_grid_shape(seed: int, examples: int, smoke: dict, hidden: int, layers: int) -> dict:
    """One grid shape trained by the loop with the YAML's fixed settings (in a worker process)."""
    import torch

    from tune_kd.train import loop

    torch.set_num_threads(1)
    arch = {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": 3 * hidden,
            "num_attention_heads": hidden // 32, "head_dim": 32}
    cfg = load_config(SPACE, {"train.seed": seed, "parameters": {}, "search.objectives": None,
                              "data.max_train_examples": examples,
                              **smoke, **{f"student.arch.{k}": v for k, v in arch.items()}})
    curve = []
    loop.train(cfg, report=lambda metrics, save: curve.append((metrics["val_ce"], metrics["student_params"])))
    return {"hidden": hidden, "layers": layers, "val_ce": [v for v, _ in curve], "student_params": curve[0][1]}


def run_grid(seed: int, examples: int) -> list[dict]:
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        # the smoke overrides go with each job: a spawned worker imports this module afresh
        return list(pool.map(train_grid_shape, [seed] * len(GRID), [examples] * len(GRID),
                             [SMOKE_OVERRIDES] * len(GRID), *zip(*GRID)))


def search_front_at(rows: list[tuple], budget: int) -> list[front.Point]:
    """The front over the first `budget` trial-epochs: each trial at its best value among them."""
    best: dict[str, tuple[float, float]] = {}
    for trial_id, _, value, size in rows[:budget]:
        if value is not None and size is not None and value == value and (trial_id not in best or value < best[trial_id][0]):
            best[trial_id] = (value, size)
    return front.pareto_front([front.Point(t, v, s, {}, {}) for t, (v, s) in best.items()], "min", "min")


def grid_points(grid: list[dict]) -> list[front.Point]:
    return [front.Point(f"{g['hidden']}x{g['layers']}", min(g["val_ce"]), g["student_params"], {}, {}) for g in grid]


def replay_asha(grid: list[dict], order: list[int], ratio: float, epochs: int) -> tuple[set[int], int]:
    """(grid indices stopped early, trial-epochs spent): the grid's curves through PersistentASHA, two at a time."""
    import heapq

    from ray.tune.schedulers import TrialScheduler

    from tune_kd.search.searcher import PersistentASHA

    with tempfile.TemporaryDirectory() as folder:
        asha = PersistentASHA(time_attr="epoch", metric="val_ce", mode="min", max_t=epochs, grace_period=1,
                              reduction_factor=2, size_key="student_params" if ratio else None, size_ratio=ratio or 2.0)
        trial = lambda i: SimpleNamespace(trial_id=str(i), storage=SimpleNamespace(experiment_fs_path=folder))  # noqa: E731
        events, queue, stopped, spent = [], list(order), set(), 0
        def start(now):  # noqa: E306
            index = queue.pop(0)
            asha.on_trial_add(None, trial(index))
            heapq.heappush(events, (now + 1, index, 1))
        for _ in range(2):
            start(0)
        while events:
            now, index, epoch = heapq.heappop(events)
            spent += 1
            result = {"epoch": epoch, "val_ce": grid[index]["val_ce"][epoch - 1],
                      "student_params": grid[index]["student_params"]}
            decision = asha.on_trial_result(None, trial(index), result)
            if epoch < epochs and decision == TrialScheduler.STOP:
                stopped.add(index)
            if epoch == epochs or decision == TrialScheduler.STOP:
                if queue:
                    start(now)
            else:
                heapq.heappush(events, (now + 1, index, epoch + 1))
    return stopped, spent


def smoke(args) -> None:
    """--smoke: toy sizes; the demo, the grid's runs and the record in a scratch folder."""
    global OUT, GRID
    import _smoke

    folder = _smoke.scratch("shape-front")
    OUT, GRID = folder / "out", [(32, 1), (64, 1)]
    SMOKE_OVERRIDES.update(_smoke.demo_overrides(_smoke.tiny_demo(folder / "demo"), "train.jsonl"), **{"train.epochs": 2})
    del SMOKE_OVERRIDES["student.arch"]      # the grid sets the shape (and heads of 32)
    args.seeds, args.num_samples, args.orders, args.max_train_examples = [0], 1, 4, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=12)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--max-train-examples", type=int, default=2000,
                        help="training conversations per epoch (the YAML's 6000 cost ~3x the time)")
    parser.add_argument("--smoke", action="store_true", help="seconds, no search (see above)")
    args = parser.parse_args()
    os.chdir(ROOT)   # the YAML's paths (results/demo/...) are relative to the repository
    if args.smoke:
        smoke(args)
    OUT.mkdir(parents=True, exist_ok=True)
    epochs = load_config(SPACE, SMOKE_OVERRIDES).train.epochs
    budget = len(GRID) * epochs
    lines, record = [], {"seeds": {}, "grid": GRID, "budget": budget, "num_samples": args.num_samples,
                         "max_train_examples": args.max_train_examples}

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    covered_all, asha = [], {0: [], 2.0: []}
    for seed in args.seeds:
        cached = OUT / f"seed{seed}.json"
        if cached.is_file() and not args.smoke:
            run = json.loads(cached.read_text())
        else:
            started = time.monotonic()
            rows = run_search(seed, args.num_samples, args.num_cpus, args.max_train_examples)
            searched = time.monotonic() - started
            grid = run_grid(seed, args.max_train_examples)
            run = {"rows": rows, "grid": grid, "search_s": searched, "grid_s": time.monotonic() - started - searched}
            cached.write_text(json.dumps(run))
        rows, grid = [tuple(r) for r in run["rows"]], run["grid"]
        shape_front = search_front_at(rows, budget)
        points = grid_points(grid)
        covered = [front.covered(p, shape_front, "min", "min") for p in points]
        covered_all += covered
        say(f"seed {seed}: search {len(rows)} trial-epochs in {run['search_s']:.0f} s, grid {budget} in "
            f"{run['grid_s']:.0f} s; search front at {budget} trial-epochs: "
            + ", ".join(f"{p.size:,.0f} params {p.value:.4f}" for p in shape_front))
        say("  grid: " + ", ".join(f"{p.trial_id} {p.size:,.0f} {p.value:.4f}{'' if c else ' (NOT covered)'}"
                                   for p, c in zip(points, covered)))
        say(f"  grid points the search front dominates or ties: {sum(covered)}/{len(covered)}")
        true_front = {int(i) for i, g in enumerate(grid)
                      if not any(front.dominates(q, points[i], "min", "min") for q in points)}
        rng = random.Random(seed)
        for ratio in asha:
            for _ in range(args.orders):
                order = list(range(len(grid)))
                rng.shuffle(order)
                stopped, spent = replay_asha(grid, order, ratio, epochs)
                asha[ratio].append((len(stopped & true_front), len(true_front), spent))
        record["seeds"][seed] = {"front": [(p.size, p.value) for p in shape_front], "covered": covered}
    say(f"search front covers {sum(covered_all)}/{len(covered_all)} grid points = "
        f"{sum(covered_all) / len(covered_all):.0%} over seeds {args.seeds} (target >= 80%)")
    for ratio, runs in asha.items():
        name = "plain ASHA (across sizes)" if not ratio else f"ASHA within factor-{ratio:g} size brackets"
        lost = statistics.fmean(r[0] for r in runs)
        any_lost = sum(r[0] > 0 for r in runs) / len(runs)
        say(f"{name}: stops {lost:.2f} of the grid's {statistics.fmean(r[1] for r in runs):.1f} front students "
            f"on average ({any_lost:.0%} of {len(runs)} replays stop at least one), "
            f"{statistics.fmean(r[2] for r in runs):.1f} trial-epochs of {budget}")
    record["lines"] = lines
    (OUT / "shape_front.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
