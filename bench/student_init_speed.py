"""Do students initialised from the teacher converge faster? Epochs to random init's best val_ce.

    python bench/student_init_speed.py [--shape 64x2 128x2] [--seeds 0 1 2] [--epochs 6] [--examples 6000]
                                       [--arms random every_kth first last] [--no-epoch0] [--threads 1]
    python bench/student_init_speed.py --smoke    # seconds: on_policy_warm_start.py --smoke's toy world,
                                                  # shape 32x1, random and every_kth, 1 seed (tests/bench)

Measured (docs/methods.md, "Does it converge faster?"; --examples 6000, 6 epochs, seeds 0 1 2, busy
2-core CPU): random init's best val_ce is always its epoch 6; every_kth reaches it in 2 of 6 epochs
at 64x2 (ratios 0.33, 0.17, 0.33) and 1 of 6 at 128x2 (0.17, 0.17, 0.33); first in 1 (64x2) and
0 (128x2: the copy alone beats 6 random epochs on 2 seeds); last in 3 (0.67, 0.33, 0.50) and 2
(0.33, 0.33, 0.83). A run takes ~85 s at 64x2, ~145 s at 128x2: both shapes, random and
every_kth, 23 min 32 s; first and last added 23 min 17 s (the world cached). The target (<= 1/2
the epochs) holds on every seed for every_kth and first, not for last.

The world is bench/on_policy_warm_start.py's (its build_world, the same flags and defaults, cached
under --world, default results/minimind-digits-world/): MiniMind's real 6,400-id tokenizer, the
embedded demo's digit conversations, a Llama teacher hidden 128 x 4 layers trained by tune_kd's loop.

Per --shape (HIDDENxLAYERS; heads hidden / the teacher's head_dim, so 64x2 has 2 heads of 32: 4
heads of 16, kd.yaml's, cannot start from this teacher, whose heads are 32 wide; intermediate 3 x
hidden, kd.yaml's 192 at 64; 128x2 is the teacher's width, a plain copy of two of its layers) and
seed, one student per arm, each trained by tune_kd.train.loop.train with kd.yaml's settings (lr 3e-3, T 2,
alpha 0.5, batch 64, warmup 10, forward KL, float32 on CPU, the teacher cache at auto as a search
runs it: on_policy_warm_start.py's off-policy config with student.init set, and no generation) on
the same --examples conversations for --epochs epochs, val_ce (teacher-forced, T 1, all 400
validation conversations) recorded after every epoch by the loop's report callback:

    random      student.init: random (the seed's random weights)
    every_kth   student.init: teacher, init_layers every_kth (teacher layers 0, 2 of 4 for 2 layers)
    first       student.init: teacher, init_layers first     (0, 1; not run unless named in --arms)
    last        student.init: teacher, init_layers last      (2, 3; not run unless named in --arms)

Epoch 0 (unless --no-epoch0) is the initial student's val_ce: a copy of the student exactly as the
loop built it (captured by wrapping build.make_models during the run) evaluated afterwards by
train/evaluate.py's evaluate without a teacher (val_ce needs only the student); one validation pass, seconds.

Per shape and seed: B, random init's best val_ce over epochs 1..N, first reached at epoch E_r; E_t,
the first epoch (0..N) at which a teacher-initialised arm's val_ce <= B (or "not within N"); the ratio
E_t / E_r (the target: <= 1/2). Prints a row per arm and seed with its val_ce per epoch, then per
shape and teacher arm the per-seed ratios and their median (a seed that never reaches B counts as
infinite), the last line per shape and arm:

    teacher-init epochs to random-init's best val_ce: X of Y (ratio R, seeds ...)

X and Y the medians of E_t and E_r, R the median ratio, then each seed's E_t/E_r. Each run is cached in
<world>/runs/student_init/<shape>-<arm>-seed<N>.json (a rerun skips it while its config is the same);
everything printed goes to <world>/student_init_speed_<shapes>_<arms>_seeds<S>.json too. One torch thread per
run (--threads), runs one after another; the wall time of the invocation is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import on_policy_warm_start as world_bench  # noqa: E402  (the world: build_world and its flags)

NAME = world_bench.NAME
TEACHER_GENERATION_SAMPLES = 200         # the world's teacher is evaluated as on_policy_warm_start.py does
ARMS = {"random": None, "every_kth": "every_kth", "first": "first", "last": "last"}   # arm -> init_layers


def parse_shape(text: str) -> tuple[int, int]:
    try:
        hidden, layers = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected HIDDENxLAYERS, e.g. 64x2") from None
    return hidden, layers


def run_config(args, world: Path, built: dict, shape: tuple[int, int], arm: str, seed: int) -> dict:
    """The raw config of one shape, arm and seed: on_policy_warm_start.py's off-policy arm with
    student.init and (every arm alike) heads sized to the teacher's head_dim."""
    hidden, layers = shape
    heads = hidden // (args.teacher_hidden // 4)          # the teacher: 4 heads (build_world)
    like = argparse.Namespace(**vars(args), student_hidden=hidden, student_layers=layers, fraction=0.0,
                              warm_start=0.0, generation_samples=0)
    raw = world_bench.run_config(like, world, built, "off", seed)
    raw["name"] = f"{NAME}-init-{hidden}x{layers}-{arm}-seed{seed}"
    raw["student"] = {"arch": {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                               "intermediate_size": 3 * hidden, "max_position_embeddings": world_bench.MAX_SEQ_LEN},
                      "init": "random" if ARMS[arm] is None else "teacher"}
    if ARMS[arm] is not None:
        raw["student"]["init_layers"] = ARMS[arm]
    return raw


class Captured(logging.Handler):
    """Keeps the messages of the loggers it is attached to (the teacher cache's decision)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def initial_val_ce(cfg, student) -> float:
    """val_ce of a copy of the initial student, by train/evaluate.py's evaluate without a teacher."""
    import torch

    from tune_kd.data.inputs import load_data
    from tune_kd.data.tokenized import padding_id
    from tune_kd.kd.scored import ScoredLM
    from tune_kd.model import hardware
    from tune_kd.train.evaluate import evaluate

    tokenizer, _, val_data = load_data(cfg)
    precision = hardware.resolve_precision(cfg.train.dtype, torch.device(cfg.train.device))
    metrics = evaluate(ScoredLM(student), None, val_data, padding_id(tokenizer), cfg, precision)
    return metrics["val_ce"]


def run_arm(args, world: Path, built: dict, shape: tuple[int, int], arm: str, seed: int) -> dict:
    """One run, from its cache file when its config (and whether epoch 0 is measured) match."""
    from tune_kd.config.experiment import load_config
    from tune_kd.model import build
    from tune_kd.train.loop import train

    raw = run_config(args, world, built, shape, arm, seed)
    key = {"raw": raw, "epoch0": args.epoch0}
    path = world / "runs" / "student_init" / f"{shape[0]}x{shape[1]}-{arm}-seed{seed}.json"
    if (done := world_bench.cached(path, "config", key)) is not None:
        return done
    cfg = load_config(raw=raw)
    initial, make_models = {}, build.make_models

    def capturing(*a, **k):
        lm, teacher_lm = make_models(*a, **k)
        initial.setdefault("student", copy.deepcopy(lm))
        return lm, teacher_lm

    per_epoch: list[float] = []
    handler = Captured()
    cache_log = logging.getLogger("tune_kd.teacher.cache_plan")
    cache_log.addHandler(handler)
    build.make_models = capturing
    started = time.perf_counter()
    try:
        result = train(cfg, report=lambda metrics, save: per_epoch.append(metrics["val_ce"]), use_wandb=False)
    finally:
        build.make_models = make_models
        cache_log.removeHandler(handler)
    seconds = time.perf_counter() - started
    epoch0 = initial_val_ce(cfg, initial["student"]) if args.epoch0 else None
    record = {"shape": f"{shape[0]}x{shape[1]}", "arm": arm, "seed": seed, "config": key,
              "seconds": round(seconds, 1), "epoch0_val_ce": epoch0, "val_ce": per_epoch,
              "teacher_cache": [line for line in handler.lines if line.startswith("teacher cache")],
              "student_params": result.metrics.get("student_params"), "history": result.history}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def epochs_to(curve: list[float], epoch0: float | None, target: float) -> int | None:
    """The first epoch (0 when epoch0 is given, then 1..N) whose val_ce <= target; None if none."""
    points = ([(0, epoch0)] if epoch0 is not None else []) + list(enumerate(curve, start=1))
    return next((e for e, v in points if v <= target), None)


def compare(random_run: dict, teacher_run: dict) -> dict:
    best = min(random_run["val_ce"])
    e_r = random_run["val_ce"].index(best) + 1
    e_t = epochs_to(teacher_run["val_ce"], teacher_run["epoch0_val_ce"], best)
    return {"seed": random_run["seed"], "best": best, "E_r": e_r, "E_t": e_t,
            "ratio": e_t / e_r if e_t is not None else math.inf}


def fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}" if x == int(x) else f"{x:.2f}"


def report(args, built: dict, runs: dict, wall: float, world: Path) -> None:
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text)
        lines.append(text)

    teacher = built["teacher_metrics"]
    say(f"\nworld {world.name}: teacher hidden {args.teacher_hidden} x {args.teacher_layers} layers, val_ce "
        f"{teacher['val_ce']:.4f}, val_acc {teacher['val_acc']:.3f}")
    say(f"runs: {args.examples} conversations, {args.epochs} epochs, lr {args.lr:g}, T {args.temperature:g}, alpha "
        f"{args.alpha:g}, batch 64, warmup 10, teacher_cache {args.teacher_cache}, {args.threads} torch thread(s)")
    summary = {}
    n = args.epochs
    for shape, by_arm in runs.items():
        say(f"\nshape {shape} (heads {int(shape.split('x')[0]) // (args.teacher_hidden // 4)}), val_ce per epoch"
            + (" (epoch 0: the initial student)" if args.epoch0 else "") + ":\n")
        first = 0 if args.epoch0 else 1
        say("| arm | seed | " + " | ".join(f"epoch {e}" for e in range(first, n + 1)) + " | seconds |")
        say("|---|---|" + "---|" * (n + 2 - first))
        for arm, results in by_arm.items():
            for r in results:
                cells = ([r["epoch0_val_ce"]] if args.epoch0 else []) + r["val_ce"]
                say(f"| {arm} | {r['seed']} | " + " | ".join(f"{v:.4f}" for v in cells) + f" | {r['seconds']:.0f} |")
        chosen = sorted({line.split(";")[0] for results in by_arm.values() for r in results
                         for line in r["teacher_cache"]})       # the measured errors: in the run files
        for line in chosen:
            say(f"  ({line})")
        summary[shape] = {}
        if "random" not in by_arm:
            continue
        for arm in (a for a in by_arm if a != "random"):
            rows = [compare(rr, tr) for rr, tr in zip(by_arm["random"], by_arm[arm])]
            ratio = statistics.median(r["ratio"] for r in rows)
            x = statistics.median(math.inf if r["E_t"] is None else r["E_t"] for r in rows)
            y = statistics.median(r["E_r"] for r in rows)
            met = sum(r["ratio"] <= 0.5 for r in rows)
            summary[shape][arm] = {"per_seed": rows, "median_ratio": ratio, "median_E_t": x, "median_E_r": y,
                                   "seeds_within_half": met}
            say(f"\n{shape}, random vs teacher-init ({arm}), per seed:\n")
            say("| seed | random's best val_ce | at epoch E_r | teacher-init reaches it at E_t | E_t / E_r |")
            say("|---|---|---|---|---|")
            for r in rows:
                reached = str(r["E_t"]) if r["E_t"] is not None else f"not within {n}"
                say(f"| {r['seed']} | {r['best']:.4f} | {r['E_r']} | {reached} | {fmt(r['ratio'])} |")
            say(f"median ratio {fmt(ratio)}; <= 1/2 on {met}/{len(rows)} seeds")
            seeds = ", ".join(f"{r['seed']}: {r['E_t'] if r['E_t'] is not None else f'>{n}'}/{r['E_r']}" for r in rows)
            say(f"{shape} {arm}: teacher-init epochs to random-init's best val_ce: {fmt(x)} of {fmt(y)} "
                f"(ratio {fmt(ratio)}, seeds {seeds})")
    say(f"\nwall {wall:.0f} s (this invocation; cached runs cost nothing)")
    document = {"world": world.name, "world_settings": built["settings"], "teacher_metrics": teacher,
                "args": vars(args), "wall_seconds": round(wall, 1), "summary": summary,
                "runs": {shape: {arm: [{k: r[k] for k in ("seed", "seconds", "epoch0_val_ce", "val_ce", "teacher_cache",
                                                         "student_params")} for r in results]
                                 for arm, results in by_arm.items()} for shape, by_arm in runs.items()},
                "printed": lines}
    out = world / (f"student_init_speed_{'-'.join(runs)}_{'-'.join(args.arms)}"
                   f"_seeds{'-'.join(map(str, args.seeds))}.json")
    out.write_text(json.dumps(document, indent=1, default=str))
    print(f"results -> {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    world_bench.add_world_flags(parser)
    flags = parser.add_argument_group("the runs")
    flags.add_argument("--shape", type=parse_shape, nargs="+", default=[(64, 2)],
                       help="student HIDDENxLAYERS, one or more (default 64x2)")
    flags.add_argument("--arms", nargs="+", choices=list(ARMS), default=["random", "every_kth"])
    flags.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    flags.add_argument("--epochs", type=int, default=6)
    flags.add_argument("--examples", type=int, default=6000, help="training conversations of every run")
    flags.add_argument("--lr", type=float, default=3e-3)
    flags.add_argument("--temperature", type=float, default=2.0)
    flags.add_argument("--alpha", type=float, default=0.5)
    flags.add_argument("--teacher-cache", choices=("auto", "on", "off"), default="auto")
    flags.add_argument("--no-epoch0", dest="epoch0", action="store_false",
                       help="skip evaluating the initial student (epoch 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; speed only)")
    parser.add_argument("--smoke", action="store_true", help="seconds: a toy world in a scratch folder (see above)")
    args = parser.parse_args(argv)
    if args.smoke:
        world_bench.smoke_settings(args)
        args.shape, args.arms = [(32, 1)], ["random", "every_kth"]
    if "random" not in args.arms:
        parser.error("--arms needs random: the teacher arms are measured against it")
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tune_kd.train.loop").setLevel(logging.INFO)
    logging.getLogger("tune_kd.teacher.cache_plan").setLevel(logging.INFO)
    world = Path(args.world).resolve()
    started = time.perf_counter()
    built = world_bench.build_world(argparse.Namespace(**vars(args), generation_samples=8 if args.smoke else
                                                       TEACHER_GENERATION_SAMPLES), world)
    runs: dict[str, dict[str, list]] = {}
    for shape in args.shape:
        name = f"{shape[0]}x{shape[1]}"
        runs[name] = {}
        for arm in args.arms:
            runs[name][arm] = []
            for seed in args.seeds:
                r = run_arm(args, world, built, shape, arm, seed)
                runs[name][arm].append(r)
                curve = ([r["epoch0_val_ce"]] if r["epoch0_val_ce"] is not None else []) + r["val_ce"]
                print(f"# {name} {arm}, seed {seed}: val_ce " + " ".join(f"{v:.4f}" for v in curve)
                      + f", {r['seconds']:.0f} s", flush=True)
    report(args, built, runs, time.perf_counter() - started, world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
