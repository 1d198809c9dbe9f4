"""A search's own overhead: where its wall time goes, phase by phase, against its training steps.

    python bench/search_overhead.py --world main       # the main job: search_spaces/kd.yaml as the README runs it
    python bench/search_overhead.py --world minimind   # the same search on MiniMind's 6,400-id tokenizer
    python bench/search_overhead.py --read DIR         # the table again from a finished run's overhead.json
    python bench/search_overhead.py --smoke            # seconds: 1 trial x 1 epoch on a toy demo, no control arms

Each run is a fresh search (control arms, export and report included) under --storage (default
/tmp/search-overhead/<world>-<time>; its data.cache_dir is there too, so the data is tokenized and
the teacher cache built afresh each time, as on a first run). Worlds:

    main       search_spaces/kd.yaml unchanged (the embedded demo, built under results/demo/ when
               missing: run `python -m tune_kd demo` first so its minutes stay out of the figures)
    minimind   kd.yaml's search on bench/on_policy_warm_start.py's world (its build_world, default
               flags, results/minimind-digits-world/: MiniMind's tokenizer, the demo's digit task, a
               Llama teacher 128 x 4, --minimind-teacher-epochs), the student on --minimind-examples of its conversations (3,000:
               the main job's student set size) and validated on its 400

Where the figures come from:

    driver     the search's own timers (runner.run_search's summary["phase_seconds"]): preflight,
               Ray start, size_trials (teacher cache), the trials' fit, summary and export, the
               control arms' fit, the teacher's point, the verdict and report, Ray stop
    trials     per trial (the search's and the control arms'), from its last result.json line:
               phase_seconds (loop.train: build, data, steps, optimizer, eval, gen_speed, report)
               and trial_started_at; plus two times this script takes in the driver by wrapping
               Ray Tune's TuneController._schedule_trial_actor (Tune starts the trial: a new actor
               or a reused one) and _schedule_trial_stop (the trial ends). A trial's wall time is
               stop - scheduled; its start is trial_started_at - scheduled (a fresh worker's
               imports of torch, transformers and tune_kd, or a reused actor's reset); "other" is
               the rest (the last report's checkpoint and Tune's stop of the trial)

Prints the table (markdown) and writes it with every figure to <storage>/overhead.json; the load
average (/proc/loadavg) before and after is in both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TRIAL_PHASES = ("start", "build", "data", "steps", "optimizer", "eval", "gen_speed", "report", "other")
DRIVER_ROWS = ("preflight", "ray_start", "size_trials", "trials", "summary_export", "control_arms", "teacher_point",
               "report", "ray_stop")
DRIVER_MEANING = {
    "preflight": "preflight: inputs checked, data tokenized", "ray_start": "Ray start",
    "size_trials": "teacher cache + trial sizing", "trials": "the search's trials (Tune fit)",
    "summary_export": "summary + export of the best student", "control_arms": "control arms (Tune fit)",
    "teacher_point": "the teacher's own point", "report": "verdict + report.html", "ray_stop": "Ray stop"}
TRIAL_MEANING = {
    "start": "trial start (worker, imports / actor reset)", "build": "build (data, models, teacher cache opened)",
    "data": "data loading (waiting for batches)", "steps": "training steps: forward + backward",
    "optimizer": "training steps: optimizer step", "eval": "evaluation (each epoch)",
    "gen_speed": "generation speed (once per trial)", "report": "report + checkpoint (each epoch)",
    "other": "other (last checkpoint, Tune's stop)"}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class TrialTimes:
    """When Tune starts (schedules an actor for) and stops each trial, by trial id, in the driver."""

    def __init__(self):
        self.scheduled: dict[str, float] = {}
        self.stopped: dict[str, float] = {}

    def install(self) -> None:
        from ray.tune.execution.tune_controller import TuneController

        schedule, stop = TuneController._schedule_trial_actor, TuneController._schedule_trial_stop
        times = self

        def scheduled(controller, trial):
            times.scheduled.setdefault(trial.trial_id, time.time())
            return schedule(controller, trial)

        def stopped(controller, trial, exception=None):
            times.stopped.setdefault(trial.trial_id, time.time())
            return stop(controller, trial, exception)

        TuneController._schedule_trial_actor, TuneController._schedule_trial_stop = scheduled, stopped


def world_config(args, storage: Path):
    from tune_kd.config.experiment import load_config

    source = str(ROOT / "search_spaces" / "kd.yaml")
    if args.world == "main":
        return source, load_config(source, args.overrides, storage=storage)
    import on_policy_warm_start as world_builder

    parser = argparse.ArgumentParser()
    world_builder.add_world_flags(parser)
    world_args = parser.parse_args(["--world", str(Path(args.minimind_world).resolve()),
                                    "--teacher-epochs", str(args.minimind_teacher_epochs)])
    world_args.generation_samples = 0
    world = Path(world_args.world)
    world_builder.build_world(world_args, world)
    overrides = {"name": "kd-minimind", "embedded_demo": False, "teacher.path": str(world / "teacher"),
                 "data.path": str(world / "data" / "train.jsonl"), "data.val_path": str(world / "data" / "val.jsonl"),
                 "data.max_train_examples": args.minimind_examples, **args.overrides}
    return source, load_config(source, overrides, storage=storage)


def trial_rows(experiment_dir: Path, times: TrialTimes, group: str) -> list[dict]:
    """One row per trial folder under experiment_dir: its phases (seconds) from its last report."""
    rows = []
    for result in sorted(experiment_dir.glob("*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        last = next((r for r in reversed(lines) if "phase_seconds" in r), None)
        if last is None:
            continue
        trial_id = last["trial_id"]
        scheduled, stopped = times.scheduled.get(trial_id), times.stopped.get(trial_id)
        if scheduled is None or stopped is None:
            continue
        phases = dict(last["phase_seconds"])
        phases["start"] = last["trial_started_at"] - scheduled
        wall = stopped - scheduled
        phases["other"] = wall - sum(phases.values())
        rows.append({"group": group, "trial_id": trial_id, "epochs": last["epoch"], "wall": wall,
                     "in_process": last.get("trial_in_process"), "phases": phases})
    return rows


def table(document: dict) -> str:
    """The markdown table: driver steps against the search's wall, trial phases against the trials' wall."""
    driver, trials = document["driver"], document["trials"]
    wall = driver["total"]
    trial_wall = sum(t["wall"] for t in trials)
    lines = [f"search wall {wall:.0f} s; {len(trials)} trials ({sum(t['epochs'] for t in trials)} trial-epochs, "
             f"{sum(1 for t in trials if (t['in_process'] or 1) > 1)} on a reused worker), their wall time summed "
             f"{trial_wall:.0f} s; load average before {document['load_before']}, after {document['load_after']}",
             "", "| phase | seconds | share |", "|---|---:|---:|"]
    for name in DRIVER_ROWS:
        if name in driver:
            lines.append(f"| {DRIVER_MEANING[name]} | {driver[name]:.1f} | {100 * driver[name] / wall:.1f}% of the search |")
    for name in TRIAL_PHASES:
        seconds = sum(t["phases"].get(name, 0.0) for t in trials)
        lines.append(f"| trials: {TRIAL_MEANING[name]} | {seconds:.1f} | {100 * seconds / trial_wall:.1f}% of the trials |")
    steps = sum(t["phases"]["steps"] + t["phases"]["optimizer"] for t in trials)
    lines.append(f"| **trials: training steps (forward, backward, optimizer)** | {steps:.1f} | "
                 f"**{100 * steps / trial_wall:.1f}% of the trials** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", choices=("main", "minimind"), default="main")
    parser.add_argument("--storage", help="a fresh results root (default /tmp/search-overhead/<world>-<time>)")
    parser.add_argument("--minimind-world", default=str(ROOT / "results" / "minimind-digits-world"))
    parser.add_argument("--minimind-examples", type=int, default=3000)
    parser.add_argument("--minimind-teacher-epochs", type=int, default=8,
                        help="the world's --teacher-epochs (on_policy_warm_start.py's default 8: about 10 min quiet)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted config overrides (YAML values), e.g. search.num_samples=2 for a smoke run")
    parser.add_argument("--read", help="print the table of a finished run (its storage folder) and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="the main world at toy size in a scratch folder: 1 trial x 1 epoch, no control arms")
    args = parser.parse_args(argv)
    import yaml

    args.overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    if args.smoke:
        import _smoke

        folder = _smoke.scratch("overhead")
        args.world, args.storage = "main", str(folder / "results")
        args.overrides = {**_smoke.demo_overrides(_smoke.tiny_demo(folder / "demo")), "search.num_samples": 1,
                          "train.epochs": 1, "controls.plain_sft": False, "controls.minimind_defaults": False,
                          "controls.seeds": 0, **args.overrides}
    if args.read:
        print(table(json.loads((Path(args.read) / "overhead.json").read_text())))
        return 0
    from tune_kd.model.hardware import setup_logging
    from tune_kd.search.runner import run_search

    setup_logging()
    storage = Path(args.storage or f"/tmp/search-overhead/{args.world}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    source, cfg = world_config(args, storage)
    times = TrialTimes()
    times.install()
    load_before = loadavg()
    summary = run_search(cfg, source, storage=str(storage), dashboard_host=None)
    experiment_dir = storage / cfg.name
    document = {"world": args.world, "storage": str(storage), "load_before": load_before, "load_after": loadavg(),
                "parallel": summary["parallel"], "driver": summary["phase_seconds"],
                "trials": trial_rows(experiment_dir, times, "search") + trial_rows(experiment_dir / "controls", times,
                                                                                  "controls")}
    (storage / "overhead.json").write_text(json.dumps(document, indent=1))
    print(table(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
