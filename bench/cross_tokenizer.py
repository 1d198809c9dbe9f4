"""Distillation across tokenizers: how much of same-tokenizer KD's gain does a teacher on another tokenizer give?

    python bench/cross_tokenizer.py [--world DIR] [--seeds 0 1 2] [--methods uld gold_hybrid pkl hkl]
                                    [--alphas 0.2 0.5] [--temperatures 2] [--sft-lrs 0.003 0.006]
                                    [--epochs 3] [--teacher-conversations 2500] [--threads 2]
                                    [--budget-minutes M]
    python bench/cross_tokenizer.py --smoke    # seconds: a toy world in a scratch folder (tests/bench)

The world (under --world, default results/cross-tokenizer-world/, git-ignored), built offline once and
reused while its settings (world.json) stay the same:

    tokenizers/minimind   a copy of ../shared/tokenizers/minimind (6,400 ids, byte-level BPE whose merges
                          pack digit runs into 1- to 4-digit tokens; an empty <think> block before replies)
    tokenizers/qwen       a copy of ../shared/tokenizers/qwen2.5 (151,646 ids, one token per digit; ChatML)
    data/teacher.jsonl    tune_kd.search.demo.make_conversations: the task's whole distribution (reverse or
    data/student.jsonl    sort 3-7 digits); the student's smaller set with 6-7 digit strings rare
    data/val.jsonl        (demo.STUDENT_LENGTH_WEIGHTS), validation on the whole distribution
    teachers/minimind     two Llama teachers of one body (hidden, layers, heads; the embedding and output
    teachers/qwen         layer follow each vocabulary), trained alike on data/teacher.jsonl by tune_kd's own
                          loop (alpha 1), saved by checkpoint.save_student

Every student is on MiniMind's tokenizer and trains on data/student.jsonl. The arms:

    sft           plain SFT, alpha 1 (no teacher); its lr is searched (--sft-lrs) and then used by all arms
    same          same-tokenizer KD: forward_kl from the MiniMind teacher
    uld, gold_hybrid, pkl, hkl
                  cross-tokenizer KD from the Qwen teacher with that loss (kd/cross_vocab.py)

Each KD arm picks its alpha x T (--alphas x --temperatures) at seed 0 by val_ce, then trains at those
settings on every --seeds. The teacher cache is on (each teacher's rows on the student set are
cached once, under <world>/cache). Each run's result is kept in <world>/runs/<name>.json (a rerun
skips it while its config is unchanged). Printed: the uncommon-token measurement (how each
tokenizer writes the data's numerals, and cross_vocab's coverage audit of the pair), one row per
arm (mean and sample std over seeds of val_ce and val_acc), per cross method
`cross/same-tokenizer KD gain: X` (X = (SFT val_ce - cross val_ce) / (SFT val_ce - same val_ce),
means over seeds), and the verdict lines; all of it also in <world>/cross_tokenizer.json.
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

NAME = "cross-tokenizer-world"
SHARED = ROOT.parent / "shared" / "tokenizers"
CROSS = ("uld", "gold_hybrid", "pkl", "hkl")
MAX_SEQ_LEN = 128


# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------

def world_settings(args) -> dict:
    return {"minimind": str(Path(args.minimind).resolve()), "qwen": str(Path(args.qwen).resolve()),
            "data_seed": args.data_seed, "teacher_conversations": args.teacher_conversations,
            "student_conversations": args.student_conversations, "val": args.val,
            "teacher_arch": teacher_arch(args), "teacher_epochs": args.teacher_epochs, "teacher_lr": args.teacher_lr,
            "max_seq_len": MAX_SEQ_LEN}


def teacher_arch(args) -> dict:
    return {"hidden_size": args.teacher_hidden, "num_hidden_layers": args.teacher_layers, "num_attention_heads": 4,
            "intermediate_size": 3 * args.teacher_hidden, "max_position_embeddings": MAX_SEQ_LEN}


def student_arch(args) -> dict:
    return {"hidden_size": args.student_hidden, "num_hidden_layers": args.student_layers, "num_attention_heads": 4,
            "intermediate_size": 3 * args.student_hidden, "max_position_embeddings": MAX_SEQ_LEN}


def cached(path: Path, key: str, value) -> dict | None:
    """The JSON document at path when its `key` entry equals value (what it was made with), else None."""
    document = json.loads(path.read_text()) if path.is_file() else {}
    return document if document.get(key) == value else None


def write_data(args, world: Path) -> None:
    from tune_kd.search import demo

    data = world / "data"
    demo.write_jsonl(data / "teacher.jsonl", demo.make_conversations(args.teacher_conversations, args.data_seed))
    demo.write_jsonl(data / "val.jsonl", demo.make_conversations(args.val, args.data_seed + 1))
    demo.write_jsonl(data / "student.jsonl", demo.make_conversations(args.student_conversations, args.data_seed + 2,
                                                                     demo.STUDENT_LENGTH_WEIGHTS))


def train_teacher(args, world: Path, side: str) -> dict:
    """One teacher on data/teacher.jsonl with tune_kd's loop (alpha 1), saved under teachers/<side>."""
    from tune_kd.config.experiment import load_config
    from tune_kd.model.checkpoint import save_student
    from tune_kd.train.loop import train

    raw = {"name": f"{NAME}-teacher-{side}", "tokenizer": str(world / "tokenizers" / side), "teacher": None,
           "student": {"arch": teacher_arch(args)},
           "data": {"path": str(world / "data" / "teacher.jsonl"), "val_path": str(world / "data" / "val.jsonl"),
                    "max_seq_len": MAX_SEQ_LEN, "cache_dir": str(world / "cache")},
           "train": {"epochs": args.teacher_epochs, "batch_size": 64, "learning_rate": args.teacher_lr,
                     "warmup_iters": 20, "alpha": 1.0, "dtype": "float32", "device": "cpu", "log_interval": 10_000,
                     "seed": 0},
           "teacher_cache": "off", "logging": {"tensorboard": False}}
    started = time.perf_counter()
    result = train(load_config(raw=raw), use_wandb=False)
    save_student(result.student, result.tokenizer, world / "teachers" / side)
    seconds = time.perf_counter() - started
    print(f"world: {side} teacher ({len(result.tokenizer)} ids) val_ce {result.metrics['val_ce']:.4f} (its own tokens), "
          f"val_acc {result.metrics['val_acc']:.3f}; trained in {seconds:.0f} s", flush=True)
    return {"val_ce": result.metrics["val_ce"], "val_acc": result.metrics["val_acc"], "seconds": round(seconds, 1),
            "vocab": len(result.tokenizer)}


def build_world(args, world: Path) -> dict:
    """Build the world unless world.json records the same settings; returns world.json's content."""
    settings = world_settings(args)
    record = world / "world.json"
    if (done := cached(record, "settings", settings)) is not None:
        print(f"world: up to date in {world} (delete world.json to rebuild)")
        return done
    started = time.perf_counter()
    for part in ("tokenizers", "data", "teachers", "cache", "runs"):     # this script's own products
        shutil.rmtree(world / part, ignore_errors=True)
    record.unlink(missing_ok=True)
    write_data(args, world)
    for side, source in (("minimind", Path(args.minimind)), ("qwen", Path(args.qwen))):
        if source.name == "<build>":       # --smoke: built in the world, nothing read from ../shared
            continue
        if not (source / "tokenizer.json").is_file():
            raise SystemExit(f"error: tokenizer not found: {source} has no tokenizer.json")
        shutil.copytree(source, world / "tokenizers" / side)
    if args.smoke:
        smoke_tokenizers(world)
    print(f"world: {args.teacher_conversations} teacher / {args.student_conversations} student / {args.val} val "
          f"conversations; training two teachers (hidden {args.teacher_hidden} x {args.teacher_layers} layers, "
          f"{args.teacher_epochs} epochs, lr {args.teacher_lr})", flush=True)
    teachers = {side: train_teacher(args, world, side) for side in ("minimind", "qwen")}
    document = {"settings": settings, "teachers": teachers, "build_seconds": round(time.perf_counter() - started, 1)}
    record.write_text(json.dumps(document, indent=1))
    return document


def smoke_tokenizers(world: Path) -> None:
    """--smoke's pair, built offline: the demo's student BPE (packs digit runs, as MiniMind's does) as
    the 'minimind' side, the demo's character-level tokenizer (one token per digit, as Qwen2.5's) as 'qwen'."""
    from tune_kd.search import demo

    build = world / "smoke_build"
    demo.write_student_set(build)      # build_student_tokenizer reads <root>/data/student.jsonl
    demo.build_student_tokenizer(build)
    shutil.move(str(build / "student_tokenizer"), str(world / "tokenizers" / "minimind"))
    demo.build_tokenizer(world / "tokenizers" / "qwen")


# ----------------------------------------------------------------------------------------------
# The uncommon-token measurement
# ----------------------------------------------------------------------------------------------

def numerals(world: Path) -> list[str]:
    """How each tokenizer writes numerals, and the coverage audit of the pair (student: MiniMind's)."""
    from transformers import AutoTokenizer

    from tune_kd.kd import cross_vocab

    toks = {side: AutoTokenizer.from_pretrained(str(world / "tokenizers" / side)) for side in ("minimind", "qwen")}
    replies = [turn["content"] for line in (world / "data" / "val.jsonl").read_text().splitlines()
               for turn in json.loads(line)["conversations"] if turn["role"] == "assistant"]
    digits = sum(len(r) for r in replies)
    lines = []
    for side, tok in toks.items():
        vocab = tok.get_vocab()
        texts = tok.batch_decode([[i] for i in sorted(set(vocab.values()))], clean_up_tokenization_spaces=False)
        multi = [t for t in texts if t.strip().isascii() and t.strip().isdigit() and len(t.strip()) > 1]
        longest = max((len(t.strip()) for t in multi), default=1)
        tokens = sum(len(ids) for ids in tok(replies, add_special_tokens=False)["input_ids"])
        lines.append(f"numerals: {side} ({len(tok)} ids): {len(multi)} vocabulary entries are multi-digit numerals "
                     f"(longest {longest} digits); the validation answers ({len(replies)}, {digits} digits) take "
                     f"{tokens} tokens: {tokens / digits:.3f} tokens per digit")
    student, teacher = toks["minimind"], toks["qwen"]
    match = cross_vocab.match_vocabularies(student, teacher)
    audit = cross_vocab.coverage_audit(student, teacher, match)
    lines.append(cross_vocab.describe_audit(audit))
    lines.append(f"recommended method for the pair (student minimind, teacher qwen): "
                 f"{cross_vocab.recommended_method(audit)}")
    return lines


# ----------------------------------------------------------------------------------------------
# The arms
# ----------------------------------------------------------------------------------------------

def run_config(args, world: Path, arm: str, seed: int, lr: float, alpha: float = 1.0, temperature: float = 1.0) -> dict:
    minimind = str(world / "tokenizers" / "minimind")
    teacher = None if arm == "sft" else {"path": str(world / "teachers" / ("minimind" if arm == "same" else "qwen"))}
    return {"name": f"{NAME}-{arm}", "tokenizer": minimind if teacher is None else None, "teacher": teacher,
            "student": {"arch": student_arch(args), **({"tokenizer": minimind} if teacher else {})},
            "data": {"path": str(world / "data" / "student.jsonl"), "val_path": str(world / "data" / "val.jsonl"),
                     "max_seq_len": MAX_SEQ_LEN, "cache_dir": str(world / "cache")},
            "train": {"epochs": args.epochs, "batch_size": 64, "grad_clip": 1.0, "dtype": "float32", "device": "cpu",
                      "warmup_iters": 10, "learning_rate": lr, "alpha": 1.0 if arm == "sft" else alpha,
                      "temperature": temperature, "kd_loss": arm if arm in CROSS else "forward_kl",
                      "log_interval": 10_000, "seed": seed},
            "teacher_cache": "off" if teacher is None else "on", "logging": {"tensorboard": False}}


def run_one(args, world: Path, raw: dict) -> dict:
    """One student run, from its cache file when the config matches."""
    from tune_kd.config.experiment import load_config
    from tune_kd.train.loop import train

    t = raw["train"]
    key = f"{raw['name'].removeprefix(NAME + '-')}-lr{t['learning_rate']:g}-a{t['alpha']:g}-T{t['temperature']:g}-s{t['seed']}"
    path = world / "runs" / f"{key}.json"
    if (done := cached(path, "config", raw)) is not None:
        return done
    started = time.perf_counter()
    result = train(load_config(raw=raw), use_wandb=False)
    record = {"key": key, "config": raw, "seconds": round(time.perf_counter() - started, 1),
              "val_ce": result.metrics["val_ce"], "val_acc": result.metrics["val_acc"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"  run {key}: val_ce {record['val_ce']:.4f}, val_acc {record['val_acc']:.3f} ({record['seconds']:.0f} s)",
          flush=True)
    return record


def search_arm(args, world: Path, arm: str, lr: float | None) -> tuple[dict, list[dict]]:
    """(the best seed-0 run by val_ce, every grid run) for one arm."""
    if arm == "sft":
        grid = [run_config(args, world, arm, args.seeds[0], x) for x in args.sft_lrs]
    else:
        grid = [run_config(args, world, arm, args.seeds[0], lr, a, temp) for a in args.alphas for temp in args.temperatures]
    runs = [run_one(args, world, raw) for raw in grid]
    return min(runs, key=lambda r: r["val_ce"]), runs


def settings_of(run: dict) -> dict:
    t = run["config"]["train"]
    return {"lr": t["learning_rate"], "alpha": t["alpha"], "temperature": t["temperature"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def measure(args) -> int:
    import torch

    from tune_kd.model.hardware import quiet_progress_bars

    quiet_progress_bars()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    world = Path(args.world)
    began = time.perf_counter()
    built = build_world(args, world)
    lines = numerals(world)
    print("\n".join(lines), flush=True)
    arms: dict[str, dict] = {}
    sft_best, sft_grid = search_arm(args, world, "sft", None)
    lr = sft_best["config"]["train"]["learning_rate"]
    print(f"search: sft's best lr {lr:g} (val_ce at seed {args.seeds[0]}: "
          + ", ".join(f"lr {r['config']['train']['learning_rate']:g} {r['val_ce']:.4f}" for r in sft_grid)
          + "); every KD arm searches alpha x T at that lr", flush=True)
    # every arm's search first (seed 0), then the other seeds a seed at a time: a run stopped by
    # --budget-minutes still compares every arm, on the seeds all of them finished
    for arm in ["sft", "same", *args.methods]:
        best, grid = (sft_best, sft_grid) if arm == "sft" else search_arm(args, world, arm, lr)
        arms[arm] = {"settings": settings_of(best), "runs": [best], "grid_seconds": sum(r["seconds"] for r in grid)}
        if arm != "sft":
            print(f"search: {arm}: best alpha {arms[arm]['settings']['alpha']:g}, T "
                  f"{arms[arm]['settings']['temperature']:g} (val_ce at seed {args.seeds[0]}: "
                  + ", ".join(f"a{settings_of(r)['alpha']:g}/T{settings_of(r)['temperature']:g} {r['val_ce']:.4f}"
                              for r in grid) + ")", flush=True)
    for seed in args.seeds[1:]:
        if args.budget_minutes and time.perf_counter() - began > 60 * args.budget_minutes:
            print(f"budget: {args.budget_minutes:g} minutes spent: seed {seed} and later not run", flush=True)
            break
        for arm, a in arms.items():
            c = a["settings"]
            a["runs"].append(run_one(args, world, run_config(args, world, arm, seed, c["lr"], c["alpha"],
                                                             c["temperature"])))
    lines += report(args, built, arms)
    wall = time.perf_counter() - began
    lines.append(f"wall time: {wall:.0f} s (world build {built['build_seconds']:.0f} s when built; "
                 f"runs cached in {world / 'runs'} are not re-run)")
    print(lines[-1])
    (world / "cross_tokenizer.json").write_text(json.dumps({"args": vars(args), "world": built, "arms": arms,
                                                            "lines": lines}, indent=1))
    return 0


def report(args, built: dict, arms: dict) -> list[str]:
    out = []
    stats = {arm: {m: mean_std([r[m] for r in a["runs"]]) for m in ("val_ce", "val_acc")} for arm, a in arms.items()}
    t = built["teachers"]
    out.append(f"teachers: minimind val_acc {t['minimind']['val_acc']:.3f} (val_ce {t['minimind']['val_ce']:.4f}), "
               f"qwen val_acc {t['qwen']['val_acc']:.3f} (val_ce {t['qwen']['val_ce']:.4f} on its own tokens); "
               f"student alone (sft) val_acc {stats['sft']['val_acc'][0]:.3f}")
    out.append("")
    out.append(f"| arm | kd_loss | teacher | lr | alpha | T | val_ce mean ± std ({len(arms['sft']['runs'])} seeds) | "
               f"val_acc mean ± std | s per run |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for arm, a in arms.items():
        s, (ce, ce_sd), (acc, acc_sd) = a["settings"], stats[arm]["val_ce"], stats[arm]["val_acc"]
        loss = "-" if arm == "sft" else "forward_kl" if arm == "same" else arm
        teacher = "-" if arm == "sft" else "minimind" if arm == "same" else "qwen"
        alpha, temp = ("1", "-") if arm == "sft" else (f"{s['alpha']:g}", f"{s['temperature']:g}")
        secs = statistics.fmean(r["seconds"] for r in a["runs"])
        out.append(f"| {arm} | {loss} | {teacher} | {s['lr']:g} | {alpha} | {temp} | {ce:.4f} ± {ce_sd:.4f} | "
                   f"{acc:.3f} ± {acc_sd:.3f} | {secs:.0f} |")
    out.append("")
    sft_ce, sft_sd = stats["sft"]["val_ce"]
    same_gain = sft_ce - stats["same"]["val_ce"][0]
    out.append(f"same-tokenizer KD gain (sft val_ce - same val_ce): {same_gain:+.4f} (seed std sft {sft_sd:.4f}, "
               f"same {stats['same']['val_ce'][1]:.4f})")
    cross = [m for m in args.methods if m in arms]
    for m in cross:
        gain = sft_ce - stats[m]["val_ce"][0]
        ratio = gain / same_gain if same_gain > 0 else float("nan")
        out.append(f"{m}: cross/same-tokenizer KD gain: {ratio:.3f} (cross gain {gain:+.4f}, same gain "
                   f"{same_gain:+.4f}; {m} seed std {stats[m]['val_ce'][1]:.4f})")
    if same_gain <= 0:
        out.append("verdict: same-tokenizer KD shows no gain over plain SFT here: the world cannot answer the question")
    if cross:
        best = min(cross, key=lambda m: stats[m]["val_ce"][0])
        ce, sd = stats[best]["val_ce"]
        ratio = (sft_ce - ce) / same_gain if same_gain > 0 else float("nan")
        out.append(f"best cross-tokenizer method: {best} (val_ce {ce:.4f} ± {sd:.4f}, X {ratio:.3f}; target X >= 0.5: "
                   f"{'met' if ratio >= 0.5 else 'not met'})")
        if "gold_hybrid" in stats and best != "gold_hybrid":
            g, gsd = stats["gold_hybrid"]["val_ce"]
            noise = 2 * max(sd, gsd)
            noise_note = ("seed std not measured (1 seed)" if len(arms["sft"]["runs"]) < 2 else
                          f"{'more' if g - ce > noise else 'not more'} than twice the larger seed std, {noise:.4f}")
            out.append(f"{best} vs gold_hybrid: val_ce {ce - g:+.4f} ({'beats' if ce < g else 'does not beat'} it; "
                       f"{noise_note})")
        elif best == "gold_hybrid":
            out.append("gold_hybrid is itself the best cross-tokenizer method: no method beats it")
        noise = 2 * max(sd, sft_sd)
        if len(arms["sft"]["runs"]) < 2:
            out.append(f"cross KD ({best}) vs plain SFT: val_ce gain {sft_ce - ce:+.4f}; seed std not measured "
                       "(1 seed): whether it beats SFT by more than twice the seed std is not known")
        else:
            out.append(f"cross KD ({best}) vs plain SFT: val_ce gain {sft_ce - ce:+.4f}, twice the larger seed std "
                       f"{noise:.4f}: {'beats' if sft_ce - ce > noise else 'does not beat'} SFT by more than twice the "
                       "seed std")
    for line in out:
        print(line)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: a toy world in a scratch folder")
    parser.add_argument("--world", default=str(ROOT / "results" / NAME))
    parser.add_argument("--minimind", default=str(SHARED / "minimind"))
    parser.add_argument("--qwen", default=str(SHARED / "qwen2.5"))
    parser.add_argument("--data-seed", type=int, default=2024)
    parser.add_argument("--teacher-conversations", type=int, default=2500)
    parser.add_argument("--student-conversations", type=int, default=1000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--teacher-hidden", type=int, default=96)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(CROSS), choices=CROSS)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[2.0])
    parser.add_argument("--sft-lrs", type=float, nargs="+", default=[3e-3, 6e-3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-minutes", type=float, default=0.0,
                        help="start no further seed past this many minutes (0: no limit); every arm keeps equal seeds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.smoke:
        sys.path.insert(0, str(ROOT / "bench"))
        import _smoke

        args.world = str(_smoke.scratch("cross-tokenizer"))
        args.minimind = args.qwen = "<build>"
        args.teacher_conversations, args.student_conversations, args.val = 192, 96, 32
        args.teacher_hidden, args.teacher_layers, args.teacher_epochs = 32, 1, 1
        args.student_hidden, args.student_layers, args.epochs = 32, 1, 1
        args.seeds, args.methods, args.alphas, args.temperatures, args.sft_lrs = [0], ["gold_hybrid", "pkl"], [0.5], \
            [2.0], [3e-3]
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
