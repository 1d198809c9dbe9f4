"""Record the learning curves of a fixed sample of KD configurations: the table the search replay
(bench/curves/replay.py, bench/search_replay.py) answers proposed configs from.

    python bench/curves/record.py --table default  [--configs 200] [--seeds 2] [--epochs 4]
                                                    [--max-train-examples 600] [--resume]
    python bench/curves/record.py --table minimind [...]   # MiniMind's real tokenizer, a trained teacher
    python bench/curves/record.py --table default --collect    # the table from what is recorded so far
    python bench/curves/record.py --table mine --space my_space.yaml --address auto   # yours, on a cluster

The recorded space is the space YAML's `parameters:` (kd.yaml: learning rate, temperature, alpha) with
kd_loss (all five divergences) and warmup_iters (0-20) added, each config a point of a scrambled Sobol
sequence over it (categorical and integer keys take their cell of the unit interval). Every config is
trained with --seeds training seeds (train.seed 0, 1, ...), for all --epochs, on the first
--max-train-examples training conversations (the YAML's 6,000 x 3 epochs cost ~45 s a run on 2 CPU
cores; 400 runs of that would take hours), validated on the whole validation split after every epoch.

Recording is one tune_kd search whose searcher is a grid over the recorded points (run_search's grid:
the project's trainable, caches, resources and resume), no scheduler, no control arms, no export; a
GPU machine or a cluster records a larger table with the same command (--address, --configs). An
interrupted recording continues with --resume. When it ends, every finished run's epochs go to

    bench/curves/<table>.csv    config, seed, epoch, the sampled keys, val_ce, val_kl, val_acc,
                                val_gen_acc (where generation is on), train_loss, seconds (the epoch's wall time)
    bench/curves/<table>.json   how it was made: world, sizes, recorded space, commit, times, machine, command

Tables: `default` is the embedded default (search_spaces/kd.yaml on the offline demo world: its own
tokenizer, teacher and digit conversations). `minimind` is the same student and search on
MiniMind's real 6,400-id tokenizer with a Llama teacher (hidden 128 x 4) trained by tune_kd's loop on
the demo's conversations (bench/on_policy_warm_start.py's world, built once under --world).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

HERE = Path(__file__).resolve().parent
# added to the YAML's searched keys: the loss and the warm-up, which users search too
ADDED_KEYS = {"kd_loss": {"values": ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]},
              "warmup_iters": {"distribution": "int_uniform", "min": 0, "max": 20}}
METRIC_COLUMNS = ("val_ce", "val_kl", "val_acc", "val_gen_acc", "train_loss")


def recorded_space(parameters: dict) -> dict:
    """The YAML's searched keys (constants left out) and ADDED_KEYS, in a fixed order."""
    searched = {name: spec for name, spec in parameters.items() if "value" not in spec}
    return {**searched, **{name: spec for name, spec in ADDED_KEYS.items() if name not in searched}}


def from_unit(spec: dict, u: float):
    """A value of the spec's distribution at quantile-like position u in [0, 1)."""
    kind = spec.get("distribution", "values" if "values" in spec else "value")
    if kind == "values":
        return spec["values"][min(int(u * len(spec["values"])), len(spec["values"]) - 1)]
    low, high = spec["min"], spec["max"]
    if kind == "log_uniform_values":
        return float(f"{math.exp(math.log(low) + u * (math.log(high) - math.log(low))):.6g}")
    if kind == "int_uniform":
        return min(low + int(u * (high - low + 1)), high)
    if kind == "uniform":
        return float(f"{low + u * (high - low):.6g}")
    raise ValueError(f"cannot record a {kind} parameter")


def sobol_configs(space: dict, count: int, seed: int = 0) -> list[dict]:
    """count configs: the first points of a scrambled Sobol sequence over the space's keys."""
    from torch.quasirandom import SobolEngine

    draws = SobolEngine(dimension=len(space), scramble=True, seed=seed).draw(count).tolist()
    return [{name: from_unit(spec, u) for (name, spec), u in zip(space.items(), row)} for row in draws]


def grid_points(configs: list[dict], seeds: int) -> list[dict]:
    """One point per (config, training seed), config-major: a stopped recording leaves whole configs."""
    return [{**config, "seed": seed} for config in configs for seed in range(seeds)]


# ----------------------------------------------------------------------------------------------
# The worlds
# ----------------------------------------------------------------------------------------------

def default_world(args) -> tuple[str, dict, dict]:
    """(source, raw YAML overrides, description) of the embedded default."""
    return str(ROOT / "search_spaces" / "kd.yaml"), {}, {
        "world": "the embedded default: search_spaces/kd.yaml on the offline demo (results/demo: digit "
                 "conversations, its own tokenizer, the demo teacher)"}


def minimind_world(args) -> tuple[str, dict, dict]:
    """MiniMind's tokenizer and a trained teacher (on_policy_warm_start's world, built once)."""
    import on_policy_warm_start as world_builder

    world = Path(args.world)
    built = world_builder.build_world(args, world)
    overrides = {"embedded_demo": False, "teacher.path": str(world / "teacher"),
                 "data.path": str(world / "data" / "train.jsonl"), "data.val_path": str(world / "data" / "val.jsonl"),
                 "data.cache_dir": str(world / "cache")}
    return str(ROOT / "search_spaces" / "kd.yaml"), overrides, {
        "world": f"MiniMind's real 6,400-id tokenizer ({world_builder.TOKENIZER_DIR.name}), the demo's digit "
                 f"conversations ({args.conversations} train, {args.val} val), a Llama teacher hidden "
                 f"{args.teacher_hidden} x {args.teacher_layers} trained {args.teacher_epochs} epochs by tune_kd's loop",
        "teacher_metrics": {k: built["teacher_metrics"].get(k) for k in ("val_ce", "val_acc", "val_gen_acc")},
        "world_settings": built["settings"]}


WORLDS = {"default": default_world, "minimind": minimind_world}


# ----------------------------------------------------------------------------------------------
# Recording and collecting
# ----------------------------------------------------------------------------------------------

def recording_config(args, source: str, overrides: dict):
    """(config, recorded space, grid points): the YAML with the bench's sizes and a grid searcher."""
    from tune_kd.config.experiment import load_config

    cfg = load_config(source, {**overrides, "name": f"curves-{args.table}", "train.epochs": args.epochs,
                               "data.max_train_examples": args.max_train_examples, "search.algorithm": "random",
                               "search.num_samples": args.configs * args.seeds, "scheduler.type": "none",
                               "search.evaluate_train_first": False, "controls.plain_sft": False,
                               "controls.minimind_defaults": False, "controls.seeds": 0,
                               "logging.tensorboard": False})
    space = recorded_space(cfg.parameters)
    # the training seed rides in the grid as a key of its own (not a searchable setting: set here, after validation)
    parameters = {**space, "seed": {"values": list(range(args.seeds))}}
    cfg = dataclasses.replace(cfg, parameters=parameters)
    return cfg, space, grid_points(sobol_configs(space, args.configs, args.sobol_seed), args.seeds)


def collect(experiment_dir: Path, space: dict, epochs: int) -> list[dict]:
    """Every finished run's epochs (a run with fewer than `epochs` reports is left out), sorted."""
    rows = []
    for trial in sorted(experiment_dir.glob("trial_*")):
        params, results = trial / "params.json", trial / "result.json"
        if not params.is_file() or not results.is_file():
            continue
        point = json.loads(params.read_text())
        reports = {}
        for line in results.read_text().splitlines():
            if line.strip():
                report = json.loads(line)
                reports[int(report["epoch"])] = report
        if sorted(reports) != list(range(1, epochs + 1)):
            continue
        for epoch, report in sorted(reports.items()):
            rows.append({"seed": int(point["seed"]), "epoch": epoch, **{name: point[name] for name in space},
                         **{column: report.get(column, "") for column in METRIC_COLUMNS},
                         "seconds": round(float(report["time_this_iter_s"]), 3)})
    configs = sorted({tuple(row[name] for name in space) for row in rows})
    index = {config: number for number, config in enumerate(configs)}
    for row in rows:
        row["config"] = index[tuple(row[name] for name in space)]
    rows.sort(key=lambda row: (row["config"], row["seed"], row["epoch"]))
    return rows


def write_table(rows: list[dict], space: dict, path: Path) -> None:
    # generation may be off: its columns are then empty or NaN throughout
    keep = [c for c in METRIC_COLUMNS if any(row[c] not in ("", None) and row[c] == row[c] for row in rows)]
    columns = ["config", "seed", "epoch", *space, *keep, "seconds"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tune_kd"], cwd=ROOT, capture_output=True, text=True)
        return head.stdout.strip() + (" (tune_kd/ modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse(argv: list[str] | None) -> argparse.Namespace:
    import on_policy_warm_start as world_builder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", default="default", help=f"the table's name; {' and '.join(WORLDS)} build their "
                        "own world (without --space)")
    parser.add_argument("--space", help="record this search YAML's space on the world it names (yours) instead")
    parser.add_argument("--configs", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per config")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-train-examples", type=int, default=600)
    parser.add_argument("--sobol-seed", type=int, default=0, help="the Sobol sequence's scrambling seed")
    parser.add_argument("--storage", default=str(ROOT / "results" / "curves"), help="where the recording runs")
    parser.add_argument("--out", default=str(HERE), help="where <table>.csv and <table>.json go")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted recording")
    parser.add_argument("--collect", action="store_true", help="write the table from the finished runs and exit")
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--address", help="a running Ray cluster to record on")
    world_builder.add_world_flags(parser)
    # the on-policy bench's world (16,000 conversations, a teacher trained 2,000 steps: fewer leave it at
    # the digit-frequency plateau, val_acc ~0), in its own folder; no generation while the teacher trains
    parser.set_defaults(world=str(ROOT / "results" / "curves-minimind-world"), generation_samples=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started, wall = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.monotonic()
    if args.space:
        source, overrides, world = str(Path(args.space).resolve()), {}, {"world": f"the world {args.space} names"}
    elif args.table in WORLDS:
        source, overrides, world = WORLDS[args.table](args)
    else:
        print(f"error: --table {args.table}: name a world ({', '.join(WORLDS)}) or give --space FILE", file=sys.stderr)
        return 2
    cfg, space, points = recording_config(args, source, overrides)
    experiment_dir = Path(args.storage).resolve() / cfg.name
    if not args.collect:
        from tune_kd.search.runner import run_search

        run_search(cfg, source, storage=args.storage, address=args.address, resume=args.resume,
                   num_cpus=args.num_cpus, export_best=False, dashboard_host=None, grid=points)
    rows = collect(experiment_dir, space, args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, space, out / f"{args.table}.csv")
    import torch

    runs = len({(row["config"], row["seed"]) for row in rows})
    provenance = {
        "table": args.table, **world, "recorded_space": space, "sampling": f"scrambled Sobol, seed {args.sobol_seed}",
        "configs": args.configs, "seeds": args.seeds, "runs_recorded": runs, "epochs": args.epochs,
        "max_train_examples": args.max_train_examples, "fixed_train_settings": {
            k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in space and k != "seed"},
        "yaml_point": {key: getattr(cfg.train, key) for key in space},   # the search's first trial
        "student": cfg.to_dict()["student"], "metric": cfg.metric.name, "commit": commit(),
        "recording_started": started, "recording_wall_s": round(time.monotonic() - wall),
        "run_seconds_total": round(sum(row["seconds"] for row in rows)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "command": "python bench/curves/record.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    provenance_file = out / f"{args.table}.json"
    if args.collect and provenance_file.is_file():   # collecting again keeps when and how long the recording ran
        kept = json.loads(provenance_file.read_text())
        provenance.update({k: kept[k] for k in ("recording_started", "recording_wall_s", "commit", "command") if k in kept})
    provenance_file.write_text(json.dumps(provenance, indent=1, default=str) + "\n")
    print(f"{args.table}: {runs} runs of {args.configs * args.seeds} recorded -> {out / (args.table + '.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
