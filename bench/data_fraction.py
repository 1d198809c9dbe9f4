"""Soft targets as a regulariser (Hinton et al. 2015): does KD's lead over plain SFT grow as data shrinks?

    python bench/data_fraction.py [--worlds demo minimind] [--fractions 0.03 0.1 0.3 1] [--steps 300]
                                  [--evals 4] [--kd-lrs 3e-3] [--kd-alphas 0.2 0.5] [--kd-temperatures 1 2]
                                  [--sft-lrs 1e-3 3e-3 1e-2] [--seeds 1 2 3] [--cache-top-k 32]
                                  [--jobs 2] [--threads 1] [--quick]
    python bench/data_fraction.py --smoke    # seconds: a toy demo world in a scratch folder (tests/bench)

In the paper a speech model trained on 3% of the data reached 44.5% test frame accuracy with hard
targets and 57.0% with the full-data teacher's soft targets (the full-data model: 58.9%). Here, on
two worlds, a student learns from a fraction of the teacher's training conversations, by KD and by
plain SFT, each with its own small search, at the same compute for every fraction:

    demo        the embedded default (tune_kd.search.demo.prepare, results/demo/): a character
                tokenizer, reverse/sort-digit conversations, a 4-layer Llama teacher trained on all
                16,000 training conversations, 1,000 validation conversations
    minimind    bench/on_policy_warm_start.py's world (its build_world with its default flags,
                results/minimind-digits-world/): MiniMind's real 6,400-id tokenizer, the same task,
                a 4-layer teacher trained on all its 16,000 conversations, 400 validation conversations

The student is search_spaces/kd.yaml's (its student.arch, batch size, grad clip, warmup; float32 on
CPU). The fraction f of a world's training conversations is the first round(f x 16,000) of one
fixed permutation (seed SUBSET_SEED), so the subsets are nested (3% within 10% within 30%).

Same compute per fraction: every run takes exactly --steps optimizer steps of batch 64 (so the same
number of training conversations and about the same tokens) whatever its fraction; a small subset
is passed over many times (3%: 40 passes at 300 steps; 100%: 1.2). The run is one loop epoch over
a file of steps x 64 rows: the subset written out as many whole times as fit, plus a fixed random
choice of its conversations once more for the remainder, so each conversation is seen k or k + 1
times. The loop shuffles the whole file, so two copies of a conversation may share a batch (close
to sampling with replacement). The loop validates at epoch ends only, so the --evals validation
points (evenly spaced, the last at the end) are taken in the loop's step_hook by
tune_kd.train.evaluate.evaluate on the student, over the whole validation set; that reads the
weights and draws no random numbers, so training is the same with or without them (a run's final
val_ce is bit-identical either way). Each run's score is its best validation point's val_ce
(teacher-forced, T = 1; what early stopping on val_ce would keep), with that point's val_acc (the
share of conversations whose every assistant token is the argmax). The lr schedule (warmup, cosine
down to lr/10) spans the run, as in the loop.

KD runs read a teacher cache of the top --cache-top-k (32) logits per position plus the tail's
mass (teacher_cache: on), built once per world and fraction by the first KD run of its group (the
cache is keyed on the training file); 0 runs the teacher live. Measured on 150-step runs: live, a KD
run took 1.8x (demo) and 1.6x (minimind) the CPU of a cached one, and the final val_ce moved by
0.015 (demo) and 0.002 (minimind) between the two.

Per world and fraction (all on train.seed SEARCH_SEED):

    KD search     alpha x temperature over --kd-alphas x --kd-temperatures at lr --kd-lrs (by default
                  one: kd.yaml's 3e-3), forward KL
    SFT search    alpha 1 (no teacher loss) at each of --sft-lrs: SFT gets its own tuned lr

The best of each search (lowest best-point val_ce) is trained again on each of --seeds (fresh
seeds, not the search's: its seed-0 figure is the one the choice was made on, so it would flatter
the winner), validated on the same whole validation set. Per fraction and world it prints

    KD-SFT gap at 3%: X (seed std Y); val_acc gap A (seed std B)

X: the mean over the seeds of KD's best-point val_ce minus SFT's (negative: KD better); Y: the
sample standard deviation (n - 1) over the seeds of the paired per-seed gap KD_s - SFT_s (one seed
gives both arms the same initial student and, the same file, the same batch order). The standard
error of X is Y / sqrt(len(seeds)). A and B the same for val_acc (positive: KD better). The final
table adds each arm's mean and its run-to-run spread (sample std over seeds).

Finished runs are cached in results/data_fraction/runs.json, keyed by their whole config (a rerun
or an interrupted run skips them); everything printed goes to
results/data_fraction/summary_<worlds>_<fractions>[_quick].json as well. --jobs worker processes
(default 2) with --threads torch threads each (default 1) run the runs; the wall time is printed,
and the runs' total CPU seconds (what the wall time would be on idle cores: that sum / --jobs).
--quick: a smoke run (the demo world unless --worlds says otherwise, 3% and 10%, 48 steps, two
KD points, two SFT lrs, two seeds), about two minutes once the world is built.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

OUT = ROOT / "results" / "data_fraction"
KD_YAML = ROOT / "search_spaces" / "kd.yaml"
WORLDS = ("demo", "minimind")
TRAIN_CONVERSATIONS = 16000          # both worlds' teachers trained on all of these
SUBSET_SEED = 35                     # the permutation the nested subsets are prefixes of
SEARCH_SEED = 0                      # train.seed of every search run
PLAN_TOLERANCE = 0.05                # a fraction's steps within 5% of --steps
MAX_SEQ_LEN = 128
METRICS = ("val_ce", "val_acc", "val_kl")


# ----------------------------------------------------------------------------------------------
# The worlds
# ----------------------------------------------------------------------------------------------

def minimind_world_args(world: Path) -> argparse.Namespace:
    """on_policy_warm_start.py's world flags at their defaults (what its build_world records)."""
    import on_policy_warm_start as world_bench

    parser = argparse.ArgumentParser()
    world_bench.add_world_flags(parser)
    args = parser.parse_args(["--world", str(world)])
    args.generation_samples = 200     # its teacher is evaluated as on_policy_warm_start.py and student_init_speed.py do
    return args


def prepare_world(name: str, args) -> dict:
    """Build (or find) a world; returns its paths and its teacher's validation figures."""
    if name == "demo":
        from tune_kd.search import demo

        root = Path(args.demo_dir).resolve()
        if not demo.is_built(root):
            print(f"world demo: building {root} (teacher training: minutes)", flush=True)
        figures = demo.prepare(root)
        return {"name": name, "root": str(root), "tokenizer": str(root / "tokenizer"), "teacher": str(root / "teacher"),
                "train": str(root / "data" / "train.jsonl"), "val": str(root / "data" / "val.jsonl"),
                "teacher_val_ce": figures["val_ce"], "teacher_val_acc": figures["val_acc"]}
    import on_policy_warm_start as world_bench

    root = Path(args.minimind_dir).resolve()
    built = world_bench.build_world(minimind_world_args(root), root)
    return {"name": name, "root": str(root), "tokenizer": str(root / "tokenizer"), "teacher": str(root / "teacher"),
            "train": str(root / "data" / "train.jsonl"), "val": str(root / "data" / "val.jsonl"),
            "teacher_val_ce": built["teacher_metrics"]["val_ce"], "teacher_val_acc": built["teacher_metrics"]["val_acc"]}


def teacher_softness(world: dict, fraction: float, temperatures=(1.0, 2.0)) -> dict:
    """How much a soft target says beyond its label: at the assistant tokens of the validation set
    and of the smallest fraction's training conversations, the teacher's mean probability of the
    label token, its top-1 token accuracy, and per T its mean entropy (nats) and mean mass off the
    label (1 - p_T(label)): what KD adds to the hard target. One teacher pass, no training."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from tune_kd.config.experiment import load_config
    from tune_kd.data import inputs, tokenized
    from tune_kd.model.hardware import quiet_progress_bars

    quiet_progress_bars()
    n = round(fraction * TRAIN_CONVERSATIONS)
    subset = np.sort(np.random.default_rng(SUBSET_SEED).permutation(TRAIN_CONVERSATIONS)[:n])
    raw = {"tokenizer": world["tokenizer"], "teacher": {"path": world["teacher"]}, "student": {"path": world["teacher"]},
           "data": {"path": world["train"], "val_path": world["val"], "max_seq_len": MAX_SEQ_LEN,
                    "cache_dir": str(OUT / world["name"] / "cache"), "workers": 1},
           "train": {"alpha": 1.0, "device": "cpu", "dtype": "float32"}, "logging": {"tensorboard": False}}
    tokenizer, train_data, val_data = inputs.load_data(load_config(raw=raw))
    pad_id = tokenized.padding_id(tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(world["teacher"], dtype=torch.float32).eval()
    out = {}
    for split, data, rows in (("val", val_data, np.arange(len(val_data))), (f"train {fraction_label(fraction)}",
                                                                            train_data, subset)):
        sums = {"tokens": 0, "p_label": 0.0, "top1": 0.0, **{f"entropy_T{t:g}": 0.0 for t in temperatures},
                **{f"off_label_T{t:g}": 0.0 for t in temperatures}}
        with torch.inference_mode():
            for lo in range(0, len(rows), 64):
                batch = tokenized.collate(data, rows[lo:lo + 64], pad_id)
                logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
                labels = batch["labels"][:, 1:]
                mask = labels != -100
                logits, labels = logits[mask].float(), labels[mask]
                sums["tokens"] += len(labels)
                p1 = logits.softmax(-1)
                sums["p_label"] += float(p1.gather(1, labels[:, None]).sum())
                sums["top1"] += float((logits.argmax(-1) == labels).sum())
                for t in temperatures:
                    logp = (logits / t).log_softmax(-1)
                    sums[f"entropy_T{t:g}"] += float(-(logp.exp() * logp).sum())
                    sums[f"off_label_T{t:g}"] += float((1 - logp.gather(1, labels[:, None]).exp()).sum())
        tokens = sums.pop("tokens")
        out[split] = {"tokens": tokens, **{k: v / tokens for k, v in sums.items()}}
    return out


# ----------------------------------------------------------------------------------------------
# Fractions: nested subsets, each written out to exactly --steps batches of training conversations
# ----------------------------------------------------------------------------------------------

def fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def plan_fraction(n: int, steps: int, evals: int, batch_size: int) -> dict:
    """A run on n conversations: one loop epoch over a file of steps x batch_size rows (the subset
    `copies` times, plus `extra` of its conversations once more), validated after `eval_steps`."""
    rows = steps * batch_size
    copies, extra = divmod(rows, n)
    eval_steps = sorted({max(1, round(steps * i / evals)) for i in range(1, evals + 1)})
    return {"conversations": n, "rows": rows, "copies": copies, "extra": extra, "steps": steps,
            "passes": rows / n, "eval_steps": eval_steps}


def subset_file(world: dict, fraction: float, plan: dict) -> Path:
    """The training file of a run on `fraction` of the world's conversations (written once): the
    first round(fraction x 16,000) of one fixed permutation (so the fractions are nested), repeated
    to plan["rows"] rows; the `extra` conversations that appear once more are a fixed random choice."""
    import numpy as np

    lines = Path(world["train"]).read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) != TRAIN_CONVERSATIONS:
        raise SystemExit(f"error: {world['train']} has {len(lines)} conversations, expected {TRAIN_CONVERSATIONS}")
    n = plan["conversations"]
    subset = [lines[i] for i in sorted(np.random.default_rng(SUBSET_SEED).permutation(len(lines))[:n])]
    extra = [subset[i] for i in sorted(np.random.default_rng(SUBSET_SEED + 1).permutation(n)[:plan["extra"]])]
    path = OUT / world["name"] / "data" / f"train-n{n}-rows{plan['rows']}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(subset) * plan["copies"] + "".join(extra), encoding="utf-8")
        tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

def kd_yaml() -> dict:
    import yaml

    return yaml.safe_load(KD_YAML.read_text())


def run_config(world: dict, data_path: Path, lr: float, alpha: float, temperature: float, seed: int,
               cache_top_k: int) -> dict:
    """One run's raw config: kd.yaml's student and training settings on this world's data, one loop
    epoch over the fraction's file (its rows are the run's whole budget)."""
    base = kd_yaml()
    train = base["train"]
    cache = {"mode": "on", "top_k": cache_top_k} if cache_top_k and alpha < 1 else "off"
    return {"name": f"data-fraction-{world['name']}", "tokenizer": world["tokenizer"],
            "teacher": {"path": world["teacher"]},
            "student": {"arch": base["student"]["arch"]},
            "data": {"path": str(data_path), "val_path": world["val"], "max_seq_len": MAX_SEQ_LEN,
                     "cache_dir": str(OUT / world["name"] / "cache"), "workers": 1},
            "train": {"epochs": 1, "batch_size": train["batch_size"],
                      "accumulation_steps": train["accumulation_steps"], "grad_clip": train["grad_clip"],
                      "dtype": "float32", "device": "cpu", "warmup_iters": train["warmup_iters"],
                      "learning_rate": lr, "alpha": alpha, "temperature": temperature, "kd_loss": "forward_kl",
                      "log_interval": 10**6, "seed": seed},
            "teacher_cache": cache, "logging": {"tensorboard": False, "wandb": False}}


def run_key(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:20]


def worker_setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def train_one(job: dict) -> dict:
    """Train one run (in a worker process): job["raw"] by loop.train, validated after each of
    job["eval_steps"]. The last is the loop's own epoch-end validation; the others run in the
    loop's step_hook, by train/evaluate.py's evaluate on the student alone (val_ce and val_acc need
    no teacher), which leaves training untouched: no random draws, the weights read only."""
    import torch

    from tune_kd.config.experiment import load_config
    from tune_kd.data.inputs import load_data
    from tune_kd.data.tokenized import padding_id
    from tune_kd.kd.scored import ScoredLM
    from tune_kd.model import hardware
    from tune_kd.train.evaluate import evaluate
    from tune_kd.train.loop import train

    hardware.quiet_progress_bars()
    cfg = load_config(raw=job["raw"])
    tokenizer, _, val_data = load_data(cfg)
    pad_id = padding_id(tokenizer)
    precision = hardware.resolve_precision(cfg.train.dtype, torch.device(cfg.train.device))
    points: list[dict] = []
    wrapped: dict = {}
    last = job["eval_steps"][-1]
    cpu_started = time.process_time()

    def hook(epoch: int, step: int, lm) -> None:
        if step in job["eval_steps"] and step != last:
            student = wrapped.setdefault("student", ScoredLM(lm))
            m = evaluate(student, None, val_data, pad_id, cfg, precision)
            points.append({"step": step, "val_ce": m["val_ce"], "val_acc": m["val_acc"]})

    cache_lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            cache_lines.append(record.getMessage())

    handler = Keep(logging.INFO)
    cache_log = logging.getLogger("tune_kd.teacher.cache_plan")
    cache_log.addHandler(handler)
    cache_log.setLevel(logging.INFO)
    cache_log.propagate = False      # kept in the record, not printed by every run
    started = time.perf_counter()
    try:
        result = train(cfg, use_wandb=False, step_hook=hook)
    finally:
        cache_log.removeHandler(handler)
        cache_log.propagate = True
    final = result.metrics
    points.append({"step": last, **{k: final[k] for k in METRICS}, "train_loss": final["train_loss"],
                   "s_per_batch": final["off_policy_s_per_batch"]})
    return {"seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "points": points, "teacher_cache": [line for line in cache_lines if line.startswith("teacher cache")][:1]}


def best_point(record: dict) -> dict:
    """The validation point with the lowest val_ce (what early stopping on val_ce keeps) and its figures."""
    best = min(record["points"], key=lambda m: m["val_ce"])
    return {"step": best["step"], "val_ce": best["val_ce"], "val_acc": best["val_acc"],
            "last_val_ce": record["points"][-1]["val_ce"], "last_val_acc": record["points"][-1]["val_acc"],
            "steps": record["points"][-1]["step"]}


class Runs:
    """The JSON of finished runs (key -> record), rewritten atomically after each run."""

    def __init__(self, path: Path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, job: dict) -> dict | None:
        return self.done.get(run_key(job))

    def put(self, job: dict, record: dict) -> None:
        self.done[run_key(job)] = {"job": job, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        tmp.replace(self.path)


# ----------------------------------------------------------------------------------------------
# The experiment: per world and fraction, two searches, then the winners on fresh seeds
# ----------------------------------------------------------------------------------------------

class Group:
    """One world and fraction: its search runs, then its winners' seed runs."""

    def __init__(self, args, world: dict, fraction: float):
        self.world, self.fraction = world, fraction
        batch = kd_yaml()["train"]["batch_size"]
        n = round(fraction * TRAIN_CONVERSATIONS)
        self.plan = plan_fraction(n, args.steps, args.evals, batch)
        self.data = subset_file(world, fraction, self.plan)
        self.args = args
        self.search = {}      # (arm, lr, alpha, T) -> job
        for lr in args.kd_lrs:
            for alpha in args.kd_alphas:
                for temperature in args.kd_temperatures:
                    self.search[("KD", lr, alpha, temperature)] = self.config(lr, alpha, temperature, SEARCH_SEED)
        for lr in args.sft_lrs:
            self.search[("SFT", lr, 1.0, 1.0)] = self.config(lr, 1.0, 1.0, SEARCH_SEED)
        self.winners: dict[str, tuple] = {}

    def config(self, lr, alpha, temperature, seed) -> dict:
        """A run as a job: its raw config and the steps after which it is validated."""
        return {"raw": run_config(self.world, self.data, lr, alpha, temperature, seed, self.args.cache_top_k),
                "eval_steps": self.plan["eval_steps"]}

    def search_order(self) -> list[dict]:
        """The search runs, a KD run first and the SFT runs next: the first KD run builds the teacher
        cache (under a lock) while the other worker trains SFT, not waiting for it."""
        kd = [job for point, job in self.search.items() if point[0] == "KD"]
        sft = [job for point, job in self.search.items() if point[0] == "SFT"]
        return kd[:1] + sft + kd[1:]

    def choose(self, runs: Runs) -> None:
        for arm in ("KD", "SFT"):
            points = [(best_point(runs.get(job))["val_ce"], point) for point, job in self.search.items()
                      if point[0] == arm]
            self.winners[arm] = min(points)[1]

    def seed_configs(self) -> list[dict]:
        return [self.config(*self.winners[arm][1:], seed) for arm in ("KD", "SFT") for seed in self.args.seeds]

    def seed_runs(self, runs: Runs, arm: str) -> list[dict]:
        return [runs.get(self.config(*self.winners[arm][1:], seed)) for seed in self.args.seeds]


def execute(args, groups: list[Group], runs: Runs) -> None:
    """Every missing run, --jobs at a time: all searches first, each group's seed runs once its
    searches are done."""
    label = {}

    def describe(group: Group, job: dict) -> str:
        t = job["raw"]["train"]
        arm = "SFT" if t["alpha"] >= 1 else "KD"
        return (f"{group.world['name']} {fraction_label(group.fraction)} {arm} lr {t['learning_rate']:g} "
                f"alpha {t['alpha']:g} T {t['temperature']:g} seed {t['seed']}")

    def report_done(group: Group, job: dict, record: dict) -> None:
        b = best_point(record)
        print(f"# {describe(group, job)}: best val_ce {b['val_ce']:.4f} at step {b['step']}/{b['steps']} "
              f"(last {b['last_val_ce']:.4f}), val_acc {b['val_acc']:.3f}; {record['seconds']:.0f} s, "
              f"{record['cpu_seconds']:.0f} s CPU", flush=True)

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=worker_setup,
                                                initargs=(args.threads,)) as pool:
        pending: dict[concurrent.futures.Future, tuple[Group, dict, str]] = {}

        def submit(group: Group, job: dict, phase: str) -> None:
            if runs.get(job) is None and run_key(job) not in label:
                label[run_key(job)] = True
                pending[pool.submit(train_one, job)] = (group, job, phase)

        def searched(group: Group) -> bool:
            return all(runs.get(job) is not None for job in group.search.values())

        def start_seeds(group: Group) -> None:
            group.choose(runs)
            for job in group.seed_configs():
                submit(group, job, "seeds")

        for group in groups:
            for job in group.search_order():
                submit(group, job, "search")
        for group in groups:
            if searched(group):
                start_seeds(group)
        while pending:
            finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                group, job, phase = pending.pop(future)
                record = future.result()
                runs.put(job, record)
                report_done(group, job, record)
                if phase == "search" and searched(group):
                    start_seeds(group)
    for group in groups:
        group.choose(runs)


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(group: Group, runs: Runs) -> dict:
    out = {"world": group.world["name"], "fraction": group.fraction, "plan": group.plan, "search": [], "arms": {}}
    for point, job in group.search.items():
        record = runs.get(job)
        out["search"].append({"arm": point[0], "lr": point[1], "alpha": point[2], "temperature": point[3],
                              **best_point(record), "seconds": record["seconds"], "cpu_seconds": record["cpu_seconds"],
                              "teacher_cache": record.get("teacher_cache")})
    for arm in ("KD", "SFT"):
        bests = [best_point(r) for r in group.seed_runs(runs, arm)]
        _, lr, alpha, temperature = group.winners[arm]
        out["arms"][arm] = {"lr": lr, "alpha": alpha, "temperature": temperature,
                            "per_seed": [{"seed": s, **b} for s, b in zip(group.args.seeds, bests)],
                            **{f"{k}_{stat}": f([b[k] for b in bests]) for k in ("val_ce", "val_acc")
                               for stat, f in (("mean", statistics.fmean), ("spread", spread))}}
    for key in ("val_ce", "val_acc"):
        gaps = [k[key] - s[key] for k, s in zip(out["arms"]["KD"]["per_seed"], out["arms"]["SFT"]["per_seed"])]
        out[f"gap_{key}"] = {"per_seed": gaps, "mean": statistics.fmean(gaps), "std": spread(gaps),
                             "stderr": spread(gaps) / math.sqrt(len(gaps))}
    return out


def report(args, worlds: dict, groups: list[Group], runs: Runs, wall: float) -> None:
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text)
        lines.append(text)

    summaries = [summarise(g, runs) for g in groups]
    seeds = ", ".join(map(str, args.seeds))
    say(f"\nsteps per run {args.steps} (batch {kd_yaml()['train']['batch_size']}), validated after steps "
        f"{groups[0].plan['eval_steps']}; "
        f"KD lr {args.kd_lrs} x alpha {args.kd_alphas} x T {args.kd_temperatures}; SFT lr {args.sft_lrs}; "
        f"winners on seeds {seeds}")
    for name, world in worlds.items():
        say(f"\nworld {name}: teacher (all {TRAIN_CONVERSATIONS} conversations) val_ce {world['teacher_val_ce']:.4f}, "
            f"val_acc {world['teacher_val_acc']:.3f}")
        for split, f in world["softness"].items():
            say(f"  its soft targets on {split} ({f['tokens']} assistant tokens): p(label) {f['p_label']:.3f}, top-1 "
                f"{f['top1']:.3f}; mass off the label {f['off_label_T1']:.3f} at T 1, {f['off_label_T2']:.3f} at T 2; "
                f"entropy {f['entropy_T1']:.3f} / {f['entropy_T2']:.3f} nats")
        for s in (s for s in summaries if s["world"] == name):
            p = s["plan"]
            say(f"\n{name} {fraction_label(s['fraction'])}: {p['conversations']} conversations, {p['steps']} steps "
                f"= {p['passes']:.3g} passes; search on seed {SEARCH_SEED}, best validation point by val_ce:\n")
            say("| arm | lr | alpha | T | best val_ce | at step | its val_acc | last val_ce | last val_acc | seconds |")
            say("|---|---|---|---|---|---|---|---|---|---|")
            for r in s["search"]:
                chosen = " *" if (r["arm"], r["lr"], r["alpha"], r["temperature"]) == (
                    r["arm"], s["arms"][r["arm"]]["lr"], s["arms"][r["arm"]]["alpha"],
                    s["arms"][r["arm"]]["temperature"]) else ""
                say(f"| {r['arm']}{chosen} | {r['lr']:g} | {r['alpha']:g} | {r['temperature']:g} | {r['val_ce']:.4f} | "
                    f"{r['step']} | {r['val_acc']:.3f} | {r['last_val_ce']:.4f} | {r['last_val_acc']:.3f} | "
                    f"{r['seconds']:.0f} |")
            for arm in ("KD", "SFT"):
                a = s["arms"][arm]
                cells = "; ".join(f"seed {r['seed']}: {r['val_ce']:.4f} (step {r['step']}), acc {r['val_acc']:.3f}"
                                  for r in a["per_seed"])
                say(f"  {arm} winner (lr {a['lr']:g}, alpha {a['alpha']:g}, T {a['temperature']:g}): {cells}")
            g, h = s["gap_val_ce"], s["gap_val_acc"]
            say(f"{name}: KD-SFT gap at {fraction_label(s['fraction'])}: {g['mean']:+.4f} (seed std {g['std']:.4f}); "
                f"val_acc gap {h['mean']:+.4f} (seed std {h['std']:.4f})")
    say("\nKD-SFT gap: mean over seeds of KD minus SFT (val_ce: negative = KD better; val_acc: positive = KD better); "
        "seed std: sample std over seeds of the paired per-seed gap; spread: sample std of an arm's runs.\n")
    say("| world | fraction | KD val_ce | SFT val_ce | gap | seed std | KD val_acc | SFT val_acc | val_acc gap | "
        "seed std | KD (lr, alpha, T) | SFT lr |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        k, f = s["arms"]["KD"], s["arms"]["SFT"]
        say(f"| {s['world']} | {fraction_label(s['fraction'])} | {k['val_ce_mean']:.4f} ± {k['val_ce_spread']:.4f} | "
            f"{f['val_ce_mean']:.4f} ± {f['val_ce_spread']:.4f} | {s['gap_val_ce']['mean']:+.4f} | "
            f"{s['gap_val_ce']['std']:.4f} | {k['val_acc_mean']:.3f} | {f['val_acc_mean']:.3f} | "
            f"{s['gap_val_acc']['mean']:+.3f} | {s['gap_val_acc']['std']:.3f} | "
            f"{k['lr']:g}, {k['alpha']:g}, {k['temperature']:g} | {f['lr']:g} |")
    say("")
    for name in worlds:
        mine = sorted((s for s in summaries if s["world"] == name), key=lambda s: s["fraction"])
        if len(mine) < 2:
            continue
        lead = [(fraction_label(s["fraction"]), -s["gap_val_ce"]["mean"]) for s in mine]
        grows = all(a[1] >= b[1] for a, b in zip(lead, lead[1:]))
        say(f"{name}: KD's val_ce lead (SFT - KD) by fraction: " + ", ".join(f"{f} {v:+.4f}" for f, v in lead)
            + f"; smallest minus largest fraction {lead[0][1] - lead[-1][1]:+.4f}; grows as data shrinks "
            + ("at every step" if grows else "not at every step" if lead[0][1] > lead[-1][1] else "no"))
    records = [runs.get(job) for g in groups for job in [*g.search.values(), *g.seed_configs()]]
    cpu = sum(r["cpu_seconds"] for r in records)
    say(f"\nwall {wall:.0f} s (this invocation; cached runs cost nothing); the {len(records)} runs took {cpu:.0f} CPU "
        f"seconds in all, {cpu / args.jobs / 60:.1f} min of wall on {args.jobs} idle cores")
    tag = f"{'-'.join(worlds)}_{'-'.join(f'{f:g}' for f in args.fractions)}{'_quick' if args.quick else ''}"
    out = OUT / f"summary_{tag}.json"
    out.write_text(json.dumps({"args": vars(args), "worlds": worlds, "wall_seconds": round(wall, 1),
                               "groups": summaries, "printed": lines}, indent=1, default=str))
    print(f"results -> {out}")


def smoke_settings(args) -> None:
    """--smoke: toy sizes, and the world, the runs and the summary in a scratch folder."""
    global OUT, TRAIN_CONVERSATIONS
    import _smoke

    folder = _smoke.scratch("data-fraction")
    TRAIN_CONVERSATIONS, OUT = 256, folder / "out"       # workers read neither: their jobs carry the paths
    args.demo_dir = str(_smoke.tiny_demo(folder / "demo", conversations=TRAIN_CONVERSATIONS))
    args.worlds, args.fractions, args.steps, args.evals, args.seeds, args.jobs = ["demo"], [0.25], 4, 2, [1], 1
    args.kd_lrs, args.kd_alphas, args.kd_temperatures, args.sft_lrs = [3e-3], [0.5], [2.0], [3e-3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", nargs="+", choices=WORLDS, default=None, help="default: both (--quick: demo)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None, help="default: 0.03 0.1 0.3 1")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run, every fraction (default 300)")
    parser.add_argument("--evals", type=int, default=None, help="validations per run, evenly spaced (default 4)")
    parser.add_argument("--kd-lrs", type=float, nargs="+", default=None,
                        help="the KD search's lr(s) (default: kd.yaml's train.learning_rate, 3e-3)")
    parser.add_argument("--kd-alphas", type=float, nargs="+", default=None, help="default: 0.2 0.5")
    parser.add_argument("--kd-temperatures", type=float, nargs="+", default=None, help="default: 1 2")
    parser.add_argument("--sft-lrs", type=float, nargs="+", default=None, help="default: 1e-3 3e-3 1e-2")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="the winners' seeds (default 1 2 3)")
    parser.add_argument("--cache-top-k", type=int, default=32,
                        help="KD runs read a teacher cache of this many logits per position (0: the live teacher)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (worker processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--demo-dir", default=str(ROOT / "results" / "demo"))
    parser.add_argument("--minimind-dir", default=str(ROOT / "results" / "minimind-digits-world"))
    parser.add_argument("--quick", action="store_true", help="a short run of about two minutes")
    parser.add_argument("--smoke", action="store_true", help="seconds: the demo world at toy size (256 conversations, "
                        "an untrained tiny teacher) in a scratch folder, one fraction, one point per search, "
                        "4 steps, one seed, one worker")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke_settings(args)
    defaults = {"worlds": ["demo"] if args.quick else list(WORLDS), "fractions": [0.03, 0.1] if args.quick
                else [0.03, 0.1, 0.3, 1.0], "steps": 48 if args.quick else 300, "evals": 2 if args.quick else 4,
                "kd_lrs": [kd_yaml()["train"]["learning_rate"]], "kd_alphas": [0.5] if args.quick else [0.2, 0.5],
                "kd_temperatures": [1.0, 2.0], "sft_lrs": [3e-3, 1e-2] if args.quick else [1e-3, 3e-3, 1e-2],
                "seeds": [1, 2] if args.quick else [1, 2, 3]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions: each must be in (0, 1]")
    args.fractions = sorted(set(args.fractions))
    import torch

    torch.set_num_threads(max(args.threads, 1))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tune_kd.search.demo").setLevel(logging.INFO)
    started = time.perf_counter()
    worlds = {name: prepare_world(name, args) for name in args.worlds}
    for world in worlds.values():
        world["softness"] = teacher_softness(world, args.fractions[0])
    groups = [Group(args, worlds[name], fraction) for name in args.worlds for fraction in args.fractions]
    for g in groups:
        p = g.plan
        print(f"plan {g.world['name']} {fraction_label(g.fraction)}: {p['conversations']} conversations, {p['steps']} "
              f"steps of {p['rows'] // p['steps']} = {p['passes']:.3g} passes ({p['copies']} copies + {p['extra']}), "
              f"validated after steps {p['eval_steps']}", flush=True)
        if p["copies"] < 1:
            print(f"  warning: {p['rows']} rows are fewer than the {p['conversations']} conversations: "
                  "raise --steps to see them all", flush=True)
    runs = Runs(OUT / "runs.json")
    execute(args, groups, runs)
    report(args, worlds, groups, runs, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
