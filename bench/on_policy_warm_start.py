"""Does warm-started on-policy distillation beat off-policy? Several seeds on a realistic world.

    python bench/on_policy_warm_start.py [--seeds 0 1 2] [--epochs 4] [--examples 16000] [--fraction 0.5]
                                         [--warm-start 0.5] [--generation-samples 200] [--arms off on0 warm]
                                         [--threads 1]
    python bench/on_policy_warm_start.py --smoke    # seconds: a toy world in a scratch folder (tests/bench)

Measured (docs/methods.md, "The warm-up"): the teacher trains once in about 10 minutes, the three
arms x three seeds then take 30 minutes on a busy 2-core CPU; --seeds 0 1 2 3 4 adds 20 more.

The world (under --world, default results/minimind-digits-world/, git-ignored), built once and
reused while its settings (world.json) stay the same:

    tokenizer/          a copy of MiniMind's tokenizer (../shared/tokenizers/minimind: the real
                        6,400-id byte-level BPE, whose merges make digit strings 1- to 4-digit
                        tokens, and its chat template with an empty <think> block before each reply)
    data/train.jsonl    tune_kd.search.demo.make_conversations (the embedded default's task: reverse or
    data/val.jsonl      sort 3-7 digits, 15% with a system prompt, 15% with two turns; exact answers)
    teacher/            Llama, hidden 128 x 4 layers, trained on data/train.jsonl by tune_kd's own loop
                        (loop.train with alpha 1, plain SFT, float32 on CPU), saved by checkpoint.save_student

The arms, each trained once per seed from the same freshly initialised student (Llama, hidden 64 x
2 layers, as in search_spaces/kd.yaml) with kd.yaml's settings (lr 3e-3, T 2, alpha 0.5, batch 64,
forward KL, generation temperature 1), the same --epochs on the same --examples conversations, the
teacher cache at auto (as a search would run it), and judged on the same validation prompts:

    off                 off-policy:                       on_policy_fraction 0
    on0                 on-policy from step 0:            on_policy_fraction --fraction, on_policy_start 0
    warm                warm-started on-policy:           on_policy_fraction --fraction, on_policy_start --warm-start
    warm_full           (not run unless named in --arms)  on_policy_fraction 1, on_policy_start --warm-start

Each run's result is cached in <world>/runs/<arm>-seed<N>.json (a rerun skips it while its settings
are unchanged). Prints a row per arm and seed, then per arm the mean and the spread (sample standard
deviation) over seeds of the last epoch's val_gen_acc (share of the --generation-samples validation
prompts the student answers exactly, greedy), val_gen_ce (the teacher's per-token CE on those
replies; lower is more plausible to the teacher), val_ce and val_acc (teacher-forced), and the
seconds per run; the last lines compare the arms seed by seed (paired: one seed gives every arm the
same initial student and the same batch order), warm-started vs off-policy last. Everything printed
is also written to <world>/on_policy_warm_start_seeds<S>.json (S: the seeds, e.g. 0-1-2).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "minimind-digits-world"
TOKENIZER_DIR = ROOT.parent / "shared" / "tokenizers" / "minimind"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MAX_SEQ_LEN = 128
COLUMNS = ("val_gen_acc", "val_gen_ce", "val_ce", "val_acc")
LOWER_IS_BETTER = {"val_gen_acc": False, "val_gen_ce": True, "val_ce": True, "val_acc": False}
ARM_TITLES = {"off": "off-policy", "on0": "on-policy from step 0", "warm": "warm-started on-policy",
              "warm_full": "warm-started on-policy, fraction 1"}


# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------

def world_settings(args) -> dict:
    return {"tokenizer": str(Path(args.tokenizer).resolve()), "data_seed": args.data_seed, "conversations": args.conversations,
            "val": args.val, "teacher_hidden": args.teacher_hidden, "teacher_layers": args.teacher_layers,
            "teacher_epochs": args.teacher_epochs, "teacher_lr": args.teacher_lr,
            "teacher_batch_size": args.teacher_batch_size, "max_seq_len": MAX_SEQ_LEN}


def add_world_flags(parser: argparse.ArgumentParser) -> None:
    """--world and the flags world_settings reads (bench/student_init_speed.py reuses the world)."""
    parser.add_argument("--world", default=str(ROOT / "results" / NAME), help="the world's folder (default: %(default)s)")
    world_flags = parser.add_argument_group("the world (a change rebuilds it)")
    world_flags.add_argument("--tokenizer", default=str(TOKENIZER_DIR), help="MiniMind's tokenizer (default: %(default)s)")
    world_flags.add_argument("--data-seed", type=int, default=2024)
    world_flags.add_argument("--conversations", type=int, default=16000, help="training conversations")
    world_flags.add_argument("--val", type=int, default=400, help="validation conversations")
    world_flags.add_argument("--teacher-hidden", type=int, default=128)
    world_flags.add_argument("--teacher-layers", type=int, default=4)
    world_flags.add_argument("--teacher-epochs", type=int, default=8)
    world_flags.add_argument("--teacher-lr", type=float, default=3e-3)
    world_flags.add_argument("--teacher-batch-size", type=int, default=64)


def longest_reply_tokens(raw: dict) -> int:
    """The longest last assistant reply of the training and validation data in tokens, its
    end-of-turn token included, as ingestion tokenized it (in context, after the template's header)."""
    from tune_kd.config.experiment import load_config
    from tune_kd.data.inputs import load_data
    from tune_kd.train.on_policy import prompts_and_replies

    _, train_data, val_data = load_data(load_config(raw=raw))
    return max(len(reply) for split in (train_data, val_data)
               for reply in prompts_and_replies(split, range(len(split)))[1])


def cached(path: Path, key: str, value) -> dict | None:
    """The JSON document at path when its `key` entry equals value (what it was made with), else None."""
    document = json.loads(path.read_text()) if path.is_file() else {}
    return document if document.get(key) == value else None


def build_world(args, world: Path) -> dict:
    """Build the world unless world.json records the same settings; returns world.json's content."""
    settings = world_settings(args)
    record = world / "world.json"
    if (done := cached(record, "settings", settings)) is not None:
        print(f"world: up to date in {world} (delete world.json to rebuild)")
        return done
    from transformers import AutoTokenizer

    from tune_kd.config.experiment import load_config
    from tune_kd.model.checkpoint import save_student
    from tune_kd.model.hardware import quiet_progress_bars
    from tune_kd.search import demo
    from tune_kd.train.loop import train

    tokenizer_dir = Path(args.tokenizer)
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise SystemExit(f"error: MiniMind's tokenizer not found: {tokenizer_dir} lacks {', '.join(missing)}")
    quiet_progress_bars()
    started = time.perf_counter()
    for part in ("tokenizer", "data", "teacher", "cache", "runs"):     # this script's own products
        shutil.rmtree(world / part, ignore_errors=True)
    record.unlink(missing_ok=True)
    shutil.copytree(tokenizer_dir, world / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    train_path, val_path = world / "data" / "train.jsonl", world / "data" / "val.jsonl"
    demo.write_jsonl(train_path, demo.make_conversations(args.conversations, args.data_seed))
    demo.write_jsonl(val_path, demo.make_conversations(args.val, args.data_seed + 1))
    first = json.loads(val_path.read_text().splitlines()[0])["conversations"]
    print("world: a validation conversation as the template renders it:\n"
          + tokenizer.apply_chat_template(first, tokenize=False))
    raw = {"name": f"{NAME}-teacher", "tokenizer": str(world / "tokenizer"), "teacher": None,
           "student": {"arch": {"hidden_size": args.teacher_hidden, "num_hidden_layers": args.teacher_layers,
                                "num_attention_heads": 4, "intermediate_size": 3 * args.teacher_hidden,
                                "max_position_embeddings": MAX_SEQ_LEN}},
           "data": {"path": str(train_path), "val_path": str(val_path), "max_seq_len": MAX_SEQ_LEN,
                    "cache_dir": str(world / "cache")},
           "train": {"epochs": args.teacher_epochs, "batch_size": args.teacher_batch_size,
                     "learning_rate": args.teacher_lr, "warmup_iters": 30, "alpha": 1.0, "dtype": "float32",
                     "device": "cpu", "log_interval": 50, "seed": 0},
           "eval": {"generation_samples": args.generation_samples},
           "teacher_cache": "off", "logging": {"tensorboard": False}}
    longest = longest_reply_tokens(raw)
    raw["train"]["max_new_tokens"] = longest + 2     # val_gen_*: room for the longest reply and a little more
    print(f"world: {args.conversations} + {args.val} conversations, longest reply {longest} tokens with its "
          f"end-of-turn; training the teacher (hidden {args.teacher_hidden} x {args.teacher_layers} layers, "
          f"{args.teacher_epochs} epochs)", flush=True)
    teacher_started = time.perf_counter()
    result = train(load_config(raw=raw), use_wandb=False)
    save_student(result.student, result.tokenizer, world / "teacher")
    document = {"settings": settings, "longest_reply_tokens": longest, "teacher_metrics": result.metrics,
                "teacher_history": result.history, "teacher_seconds": round(time.perf_counter() - teacher_started, 1),
                "build_seconds": round(time.perf_counter() - started, 1)}
    record.write_text(json.dumps(document, indent=1))
    print(f"world: teacher val_ce {result.metrics['val_ce']:.4f}, val_acc {result.metrics['val_acc']:.3f}, "
          f"val_gen_acc {result.metrics['val_gen_acc']:.3f}; trained in {document['teacher_seconds']:.0f} s -> {world}")
    return document


# ----------------------------------------------------------------------------------------------
# The arms
# ----------------------------------------------------------------------------------------------

def arm_overrides(args, arm: str) -> dict:
    return {"off": {"on_policy_fraction": 0.0, "on_policy_start": 0.0},
            "on0": {"on_policy_fraction": args.fraction, "on_policy_start": 0.0},
            "warm": {"on_policy_fraction": args.fraction, "on_policy_start": args.warm_start},
            "warm_full": {"on_policy_fraction": 1.0, "on_policy_start": args.warm_start}}[arm]


def run_config(args, world: Path, built: dict, arm: str, seed: int) -> dict:
    """The raw config of one arm and seed."""
    return {"name": f"{NAME}-{arm}-seed{seed}", "tokenizer": str(world / "tokenizer"),
            "teacher": {"path": str(world / "teacher")},
            "student": {"arch": {"hidden_size": args.student_hidden, "num_hidden_layers": args.student_layers,
                                 "num_attention_heads": 4, "intermediate_size": 3 * args.student_hidden,
                                 "max_position_embeddings": MAX_SEQ_LEN}},
            "data": {"path": str(world / "data" / "train.jsonl"), "val_path": str(world / "data" / "val.jsonl"),
                     "max_seq_len": MAX_SEQ_LEN, "cache_dir": str(world / "cache"),
                     "max_train_examples": args.examples},
            "train": {"epochs": args.epochs, "batch_size": 64, "accumulation_steps": 1, "grad_clip": 1.0,
                      "dtype": "float32", "device": "cpu", "warmup_iters": 10, "learning_rate": args.lr,
                      "alpha": args.alpha, "temperature": args.temperature, "generation_temperature": 1.0,
                      "max_new_tokens": built["longest_reply_tokens"] + 2, "log_interval": 10_000, "seed": seed,
                      **arm_overrides(args, arm)},
            "eval": {"generation_samples": args.generation_samples},
            "teacher_cache": args.teacher_cache, "logging": {"tensorboard": False}}


def run_arm(args, world: Path, built: dict, arm: str, seed: int) -> dict:
    """One arm and seed, from its cache file when the settings match."""
    from tune_kd.config.experiment import load_config
    from tune_kd.train.loop import train

    raw = run_config(args, world, built, arm, seed)
    path = world / "runs" / f"{arm}-seed{seed}.json"
    if (done := cached(path, "config", raw)) is not None:
        return done
    started = time.perf_counter()
    result = train(load_config(raw=raw), use_wandb=False)
    record = {"arm": arm, "seed": seed, "config": raw, "seconds": round(time.perf_counter() - started, 1),
              "final": {k: result.metrics[k] for k in COLUMNS}, "history": result.history}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def compare(runs: dict, better: str, worse: str) -> dict:
    """Per metric: the mean paired difference (better arm minus the other) and on how many seeds
    the first arm is better, tied, worse."""
    out = {}
    for key in COLUMNS:
        pairs = [(a["final"][key], b["final"][key]) for a, b in zip(runs[better], runs[worse])]
        deltas = [a - b for a, b in pairs]
        wins = sum(d < 0 if LOWER_IS_BETTER[key] else d > 0 for d in deltas)
        ties = sum(d == 0 for d in deltas)
        out[key] = {"mean_delta": statistics.fmean(deltas), "better": wins, "tied": ties, "seeds": len(deltas)}
    return out


def comparison_line(title: str, result: dict) -> str:
    parts = []
    for key in ("val_gen_acc", "val_gen_ce", "val_ce"):
        r = result[key]
        tied = f", {r['tied']} tied" if r["tied"] else ""
        parts.append(f"{key} {r['mean_delta']:+.4f} ({r['better']}/{r['seeds']} seeds better{tied})")
    return f"{title}: " + ", ".join(parts)


def print_trajectories(args, runs: dict) -> None:
    """Per arm and epoch, the means over seeds of val_gen_acc / val_gen_ce; and whether the warm
    arms match the off-policy arm exactly where their warm-up ends on an epoch boundary (they train
    the same batches until then)."""
    print("\nper epoch, mean over seeds, val_gen_acc / val_gen_ce:\n")
    print("| arm | " + " | ".join(f"epoch {e}" for e in range(1, args.epochs + 1)) + " |")
    print("|---|" + "---|" * args.epochs)
    for arm, results in runs.items():
        cells = [f"{statistics.fmean(r['history'][e]['val_gen_acc'] for r in results):.3f} / "
                 f"{statistics.fmean(r['history'][e]['val_gen_ce'] for r in results):.2f}" for e in range(args.epochs)]
        print(f"| {ARM_TITLES[arm]} | " + " | ".join(cells) + " |")
    boundary = args.warm_start * args.epochs
    for arm in ("warm", "warm_full"):
        if arm in runs and "off" in runs and boundary == int(boundary) and 1 <= boundary <= args.epochs:
            same = sum(w["history"][int(boundary) - 1]["val_ce"] == o["history"][int(boundary) - 1]["val_ce"]
                       for w, o in zip(runs[arm], runs["off"]))
            print(f"\nwarm-up check: at epoch {int(boundary)}, the warm-up's end, {ARM_TITLES[arm]} has the off-policy "
                  f"arm's val_ce exactly on {same}/{len(runs[arm])} seeds")


def report(args, built: dict, runs: dict, wall: float, world: Path) -> None:
    teacher = built["teacher_metrics"]
    print(f"\nworld {world.name}: teacher val_ce {teacher['val_ce']:.4f}, val_acc {teacher['val_acc']:.3f}, "
          f"val_gen_acc {teacher['val_gen_acc']:.3f} (trained in {built['teacher_seconds']:.0f} s)")
    print(f"arms: student hidden {args.student_hidden} x {args.student_layers} layers, {args.examples} conversations, "
          f"{args.epochs} epochs, lr {args.lr:g}, T {args.temperature:g}, alpha {args.alpha:g}, teacher_cache "
          f"{args.teacher_cache}, {args.generation_samples} validation prompts; last epoch:\n")
    print("| arm | seed | " + " | ".join(COLUMNS) + " | seconds |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for arm, results in runs.items():
        for r in results:
            print(f"| {ARM_TITLES[arm]} | {r['seed']} | " + " | ".join(f"{r['final'][k]:.4f}" for k in COLUMNS)
                  + f" | {r['seconds']:.0f} |")
    summary = {}
    print(f"\nmean +- spread over seeds {args.seeds}:\n")
    print("| arm | " + " | ".join(COLUMNS) + " | seconds per run | seconds all seeds |")
    print("|---|" + "---|" * (len(COLUMNS) + 2))
    for arm, results in runs.items():
        summary[arm] = {k: {"mean": statistics.fmean(r["final"][k] for r in results),
                            "spread": spread([r["final"][k] for r in results])} for k in COLUMNS}
        seconds = [r["seconds"] for r in results]
        summary[arm]["seconds"] = {"mean": statistics.fmean(seconds), "total": sum(seconds)}
        print(f"| {ARM_TITLES[arm]} | " + " | ".join(f"{summary[arm][k]['mean']:.4f} +- {summary[arm][k]['spread']:.4f}"
                                                     for k in COLUMNS)
              + f" | {summary[arm]['seconds']['mean']:.0f} | {summary[arm]['seconds']['total']:.0f} |")
    print_trajectories(args, runs)
    pairs = [(a, b) for a, b in (("on0", "off"), ("warm", "on0"), ("warm_full", "off"), ("warm", "off"))
             if a in runs and b in runs]
    comparisons = {f"{a} vs {b}": compare(runs, a, b) for a, b in pairs}
    document = {"world": world.name, "world_settings": built["settings"], "teacher_metrics": teacher,
                "args": vars(args), "wall_seconds": round(wall, 1), "summary": summary, "comparisons": comparisons,
                "runs": {arm: [{k: r[k] for k in ("seed", "seconds", "final")} for r in results]
                         for arm, results in runs.items()}}
    out = world / f"on_policy_warm_start_seeds{'-'.join(map(str, args.seeds))}.json"
    out.write_text(json.dumps(document, indent=1))
    print(f"\nwall {wall:.0f} s (this invocation; cached runs cost nothing); results -> {out}\n")
    for a, b in pairs:
        print(comparison_line(f"{ARM_TITLES[a]} vs {ARM_TITLES[b]}", comparisons[f"{a} vs {b}"]))


def smoke_settings(args) -> None:
    """--smoke's toy sizes, world and tokenizer (bench/student_init_speed.py's --smoke too)."""
    import _smoke

    folder = _smoke.scratch("digits-world")
    _smoke.digits_bpe(folder / "tokenizer")
    args.world, args.tokenizer, args.conversations, args.val = str(folder / "world"), str(folder / "tokenizer"), 128, 16
    args.teacher_hidden, args.teacher_layers, args.teacher_epochs, args.teacher_batch_size = 64, 1, 1, 32
    args.seeds, args.epochs, args.examples = [0], 2, 128      # 2 batches an epoch: epoch 2 of warm has an on-policy one
    for name, value in (("arms", ["off", "warm"]), ("student_hidden", 32), ("student_layers", 1),
                        ("generation_samples", 8)):
        if hasattr(args, name):      # the flags this script has (student_init_speed.py lacks the arm flags)
            setattr(args, name, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_world_flags(parser)
    arm_flags = parser.add_argument_group("the arms")
    arm_flags.add_argument("--arms", nargs="+", choices=sorted(ARM_TITLES), default=["off", "on0", "warm"])
    arm_flags.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    arm_flags.add_argument("--epochs", type=int, default=4)
    arm_flags.add_argument("--examples", type=int, default=16000, help="training conversations of every arm")
    arm_flags.add_argument("--student-hidden", type=int, default=64)
    arm_flags.add_argument("--student-layers", type=int, default=2)
    arm_flags.add_argument("--lr", type=float, default=3e-3)
    arm_flags.add_argument("--temperature", type=float, default=2.0)
    arm_flags.add_argument("--alpha", type=float, default=0.5)
    arm_flags.add_argument("--fraction", type=float, default=0.5, help="on_policy_fraction of on0 and warm")
    arm_flags.add_argument("--warm-start", type=float, default=0.5, help="on_policy_start of warm (and warm_full)")
    arm_flags.add_argument("--generation-samples", type=int, default=200, help="validation prompts for val_gen_*")
    arm_flags.add_argument("--teacher-cache", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a 2-core machine another job shares, two threads "
                             "spin against each other and a step takes 10-15x longer; speed only, not results)")
    parser.add_argument("--smoke", action="store_true", help="seconds: a toy world (a small BPE in place of "
                        "MiniMind's, a 64 x 1 teacher trained 1 epoch) in a scratch folder, arms off and warm, "
                        "1 seed, 2 epochs on 128 conversations")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke_settings(args)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tune_kd.train.loop").setLevel(logging.INFO)   # the teacher's and every run's epoch lines
    world = Path(args.world).resolve()
    started = time.perf_counter()
    built = build_world(args, world)
    runs = {}
    for arm in args.arms:
        runs[arm] = []
        for seed in args.seeds:
            r = run_arm(args, world, built, arm, seed)
            runs[arm].append(r)
            print(f"# {ARM_TITLES[arm]}, seed {seed}: " + ", ".join(f"{k} {r['final'][k]:.4f}" for k in COLUMNS)
                  + f", {r['seconds']:.0f} s", flush=True)
    report(args, built, runs, time.perf_counter() - started, world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
