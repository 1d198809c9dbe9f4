"""One served teacher against a teacher in every trial: memory, step time, batching, on-policy cost.

    python bench/served_teacher.py [--teacher-hidden 1024] [--teacher-layers 16] [--steps 6]
                                   [--trials 4] [--on-policy-examples 960]
    python bench/served_teacher.py --device cuda --teacher-hidden 5120 --teacher-gpu-share 0.3 --steps 3 \
                                   --on-policy-examples 0 --result-lines      # bench/gpu_check.sh part f
    python bench/served_teacher.py --smoke    # seconds: toy sizes in a scratch folder (tests/bench)

Part 1, four concurrent trials of the demo search's shape (its student, data and batch of 64, one
epoch of --steps batches, teacher live: no teacher cache) with a teacher larger than the demo's (a
Llama of --teacher-hidden x --teacher-layers, random weights, saved once under
results/served-bench/), in three runs of --trials Ray tasks each: without a teacher (alpha 1: what a
trial costs by itself), each trial with its own teacher (today's layout), and every trial served by
one TeacherServer actor (served.py; its rows the full distribution of the demo's 103 ids).
Each trial samples its own PSS (/proc/self/smaps_rollup, every 0.2 s) and reports its peak; the
served run also samples the server's. A teacher's memory is what it adds over the teacher-less
trials: local = sum(trial peaks) - sum(teacher-less peaks); served = the same plus the server's peak.
Step time is the loop's off_policy_s_per_batch (from a batch's start to its backward's end, the
teacher's answer included), averaged over the trials.

Part 2, on-policy cost with a served teacher: one trial of search_spaces/kd.yaml with
on_policy_fraction 0.5 over --on-policy-examples conversations, its off-policy batches read from the
teacher cache (built first, as the search's driver does) and its on-policy batches scored by the
served teacher; beside it, the same trial holding its own teacher (bench/on_policy_cost.py's
figure). The loop times each batch by kind.

On a GPU (--device cuda): the trials are Ray tasks holding --trial-gpu of the GPU each (Ray sets
CUDA_VISIBLE_DEVICES; their configs get train.device cuda) and the server holds --server-gpu of it.
Memory is each process's own torch.cuda.max_memory_allocated, trials' and server's summed, so no
teacher-less run is needed. --teacher-gpu-share F sizes the teacher (its layers) to F of the GPU's
memory; where --trials copies of it would not fit (over 90% of the GPU), the own-teacher run is
skipped and its memory is computed instead (--trials x the teacher's parameter bytes). The teacher's
weights are `tiled` on a GPU (one pool of random values repeated through every matrix, written
straight to safetensors: a 24 GiB teacher in seconds, where transformers builds it on CPU in
minutes; speed and memory do not depend on the values) and `random` (built by transformers) on CPU,
unless --teacher-weights says. --on-policy-examples 0 skips part 2, and then the demo's teacher is
never trained (its data and tokenizer suffice). --result-lines adds one `@result {"part": "served",
"group": ...}` line per figure group (run, memory, step, on_policy) for bench/gpu_check.sh's table.

Prints a table and, last:
    served/local teacher memory (4 trials): X
    served/local trial step time: Y
    server batch occupancy: Z requests per teacher forward
    on-policy / cached off-policy batch: A (served teacher), B (own teacher)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tune_kd.config.experiment import absolute_paths, load_config
from tune_kd.search import demo

BENCH_DIR = REPO / "results" / "served-bench"
DEMO_DIR = REPO / "results" / "demo"
SMOKE_OVERRIDES: dict = {}     # --smoke: kd.yaml pointed at a toy demo in a scratch folder (bench/_smoke.py)
SAMPLE_SECONDS = 0.2
TILE_POOL = 2**24 + 3          # the tiled teacher's random values: a length no weight's row divides
SHARD_BYTES = 2 * 2**30        # the tiled teacher's safetensors shards
OWN_FIT = 0.9                  # --trials own teachers fit a GPU when their weights take at most this share


def pss_bytes(pid: str = "self") -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


class PeakPss(threading.Thread):
    """The largest PSS process `pid` reaches while running."""

    def __init__(self, pid: str = "self"):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, pss_bytes(self.pid))
            self.done.wait(SAMPLE_SECONDS)

    def __enter__(self) -> "PeakPss":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


def cuda_peaks(_actor=None) -> dict:
    """This process's peak CUDA memory in bytes (allocated, reserved), {} where CUDA never started;
    the server's through its actor's __ray_call__ (which passes the actor as _actor)."""
    import torch

    if not torch.cuda.is_initialized():
        return {}
    return {"gpu_peak": torch.cuda.max_memory_allocated(), "gpu_reserved": torch.cuda.max_memory_reserved()}


def one_trial(cfg, key: str) -> dict:
    """A trial's loop.train in this Ray task, with its peak PSS (and CUDA memory) and per-kind batch times."""
    from tune_kd.model.hardware import quiet_progress_bars
    from tune_kd.search import teacher_actor
    from tune_kd.train import loop

    logging.basicConfig(level=logging.WARNING)
    quiet_progress_bars()
    with PeakPss() as peak:
        metrics = loop.train(cfg, use_wandb=False, node_teacher=lambda: teacher_actor.node_teacher(cfg, key)).metrics
    return {"peak_pss": peak.peak, "off_policy_s_per_batch": metrics["off_policy_s_per_batch"],
            "on_policy_s_per_batch": metrics["on_policy_s_per_batch"], **cuda_peaks()}


def teacher_config(hidden: int, layers: int, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, intermediate_size=hidden * 8 // 3 // 64 * 64,
                       max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)


def save_big_teacher(hidden: int, layers: int) -> Path:
    """A random Llama teacher with the demo tokenizer's vocabulary, saved once (safetensors) in float32,
    so that a trial loading it for bf16 autocast converts it into a copy of its own, as a GPU trial
    copies it into GPU memory. Saved in bf16, the loaded weights would stay views of the file's pages
    in the kernel's page cache, shared by every process that maps them, and PSS would split them
    among the trials: 4 trials holding a 0.4 GB bf16 teacher added 0.21 GB of PSS in all, hiding the
    copies the GPU case is about."""
    import torch
    from transformers import LlamaForCausalLM

    target = BENCH_DIR / f"teacher-h{hidden}-l{layers}-fp32"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer

    demo_tokenizer = AutoTokenizer.from_pretrained(str(DEMO_DIR / "teacher"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(teacher_config(hidden, layers, demo_tokenizer))
    model.save_pretrained(target)                        # float32: see the docstring
    demo_tokenizer.save_pretrained(target)
    return target


def teacher_shapes(hidden: int, layers: int) -> tuple[dict, object, object]:
    """({weight name: shape}, config, tokenizer) of a bench teacher with the demo tokenizer's vocabulary,
    from a model on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_DIR / "tokenizer"))
    config = teacher_config(hidden, layers, tokenizer)
    with torch.device("meta"):
        return {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}, config, tokenizer


def save_tiled_teacher(hidden: int, layers: int) -> Path:
    """The same Llama with tiled weights: N(0, 0.02) bf16 values from one pool of TILE_POOL, each matrix
    starting at its own offset, norms 1; written shard by shard straight to safetensors, never built."""
    import torch
    from safetensors.torch import save_file

    target = BENCH_DIR / f"teacher-h{hidden}-l{layers}-tiled"
    if (target / "config.json").is_file():
        return target
    shapes, config, tokenizer = teacher_shapes(hidden, layers)
    pool = (torch.randn(TILE_POOL, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)

    def tiled(index: int, shape) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        out, done, source = torch.empty(shape.numel(), dtype=torch.bfloat16), 0, pool[index * 7919 % TILE_POOL:]
        while done < out.numel():
            step = min(source.numel(), out.numel() - done)
            out[done:done + step], done, source = source[:step], done + step, pool
        return out.view(shape)

    shards, used = [[]], 0
    for name, shape in shapes.items():
        if shards[-1] and used + 2 * shape.numel() > SHARD_BYTES:
            shards, used = shards + [[]], 0
        shards[-1].append(name)
        used += 2 * shape.numel()
    target.mkdir(parents=True, exist_ok=True)
    order, weight_map = {name: i for i, name in enumerate(shapes)}, {}
    for number, names in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tiled(order[name], shapes[name]) for name in names}, str(target / file),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(2 * shape.numel() for shape in shapes.values())
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    tokenizer.save_pretrained(target)
    config.save_pretrained(target)     # last: its config.json says the folder is complete
    return target


def layers_for_share(hidden: int, share: float, gpu_bytes: int) -> int:
    """The layers that make a bench teacher's bf16 weights take `share` of a GPU's memory."""
    one, two = (sum(2 * s.numel() for s in teacher_shapes(hidden, n)[0].values()) for n in (1, 2))
    return max(1, round((share * gpu_bytes - (one - (two - one))) / (two - one)))


def weight_bytes(teacher: Path) -> int:
    """A saved teacher's parameter bytes: its safetensors files (bf16; the headers are noise)."""
    return sum(f.stat().st_size for f in teacher.glob("*.safetensors"))


def bench_teacher(args) -> Path:
    if args.teacher_weights == "tiled":
        return save_tiled_teacher(args.teacher_hidden, args.teacher_layers)
    return save_big_teacher(args.teacher_hidden, args.teacher_layers)


def gpu_total() -> tuple[str, int]:
    """(the GPU's name, its memory in bytes)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory


def demo_config(overrides: dict):
    return absolute_paths(load_config(REPO / "search_spaces" / "kd.yaml", {**SMOKE_OVERRIDES, **overrides},
                                      storage=str(REPO / "results")), REPO)


def small_val() -> str:
    """The first 64 validation conversations: an epoch's evaluation that does not dwarf its steps."""
    path = BENCH_DIR / "val64.jsonl"
    if not path.is_file():
        lines = (DEMO_DIR / "data" / "val.jsonl").read_text().splitlines()[:64]
        path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_trials(cfgs: list, serve_cfg=None, layout=None, cache_dir=None, server_cpus: float = 2.0,
               gpus: tuple[float, float] | None = None) -> dict:
    """The trials as concurrent Ray tasks (half a CPU each), with a TeacherServer first when asked;
    gpus: (each trial's GPU share, the server's) on a GPU."""
    import ray

    from tune_kd.search import teacher_actor

    owned = not ray.is_initialized()   # --smoke holds one session for all its runs: Ray's start is most of its time
    if owned:
        start_ray(len(cfgs) // 2 + int(server_cpus) + 1, gpus)
    try:
        served, server_peak = None, None
        if serve_cfg is not None:
            served = teacher_actor.start(serve_cfg, layout, cache_dir, [ray.get_runtime_context().get_node_id()],
                                          gpus[1] if gpus else 0.0, "bench")
            server_peak = PeakPss(str(ray.get(served.handles[0].info.remote())["pid"]))
            server_peak.start()
        task = ray.remote(num_cpus=0.5, num_gpus=gpus[0] if gpus else 0)(one_trial)
        started = time.perf_counter()
        results = ray.get([task.remote(cfg, str(i)) for i, cfg in enumerate(cfgs)])
        out = {"trials": results, "seconds": time.perf_counter() - started}
        if served is not None:
            server_peak.done.set()
            server_peak.join()
            stats = served.stats()[0]
            out.update(server_peak=server_peak.peak, occupancy=stats["requests"] / max(stats["forwards"], 1),
                       stats=stats)
            if gpus:
                out["server_gpu"] = ray.get(served.handles[0].__ray_call__.remote(cuda_peaks))
            served.stop()
        return out
    finally:
        if owned:
            ray.shutdown()


def start_ray(num_cpus: int, gpus=None) -> None:
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             **({"num_gpus": 1} if gpus else {}))


def part_one(args) -> dict:
    from tune_kd.teacher.stored_rows import layout

    teacher = bench_teacher(args)
    base = {"teacher.path": str(teacher), "teacher_cache.mode": "off", "train.epochs": 1,
            "data.max_train_examples": args.steps * 64, "data.val_path": small_val(), "train.log_interval": 10_000,
            "eval.generation_samples": 0, "teacher_server.cpus": 2.0}
    # no teacher at all (with alpha 1 and a teacher section the trial would still load it, for val_kl)
    modes = (("no teacher", {"train.alpha": 1.0, "teacher": None, "tokenizer": str(DEMO_DIR / "teacher")}), ("own teacher", {}),
             ("served teacher", {"teacher_server.mode": "on"}))
    gpus = None
    if args.device == "cuda":   # memory per process: no teacher-less baseline; own teachers only where they fit
        base["train.device"], gpus = "cuda", (args.trial_gpu, args.server_gpu)
        own = args.trials * weight_bytes(teacher) <= OWN_FIT * gpu_total()[1]
        modes = tuple(m for m in modes if m[0] == "served teacher" or own and m[0] == "own teacher")
    runs = {}
    for mode, extra in modes:
        cfgs = [demo_config({**base, **extra}) for _ in range(args.trials)]
        serve_cfg = cfgs[0] if mode == "served teacher" else None
        lay = layout(10**6, 103) if serve_cfg else None   # the demo's 103 ids: the full row
        runs[mode] = run_trials(cfgs, serve_cfg, lay, gpus=gpus)
        peaks = [t["peak_pss"] for t in runs[mode]["trials"]]
        steps = [t["off_policy_s_per_batch"] for t in runs[mode]["trials"]]
        if gpus:
            print(f"  {mode:15s} trial peak GPU {sum(t['gpu_peak'] for t in runs[mode]['trials']) / 2**30:.2f} GiB (sum of "
                  f"{len(peaks)}), server {runs[mode].get('server_gpu', {}).get('gpu_peak', 0) / 2**30:.2f} GiB, step "
                  f"{sum(steps) / len(steps):.2f} s, {runs[mode]['seconds']:.0f} s wall", flush=True)
            continue
        print(f"  {mode:15s} trial peak PSS {sum(peaks) / 1e9:.2f} GB (sum of {len(peaks)}), server "
              f"{runs[mode].get('server_peak', 0) / 1e9:.2f} GB, step {sum(steps) / len(steps):.2f} s, "
              f"{runs[mode]['seconds']:.0f} s wall", flush=True)
    if gpus and "own teacher" not in runs:
        print(f"  own teacher     not run: {args.trials} x {weight_bytes(teacher) / 2**30:.1f} GiB of weights would not fit "
              f"the GPU's {gpu_total()[1] / 2**30:.1f} GiB (computed)", flush=True)
    return runs


def part_two(args) -> dict:
    from tune_kd.search.prepare import prepare_teacher_rows

    base = {"train.epochs": 1, "train.on_policy_fraction": 0.5, "train.max_new_tokens": 12,
            "data.max_train_examples": args.on_policy_examples, "data.val_path": small_val(),
            "train.log_interval": 10_000, "eval.generation_samples": 0, "teacher_cache.mode": "on",
            "teacher_server.cpus": 1.0}
    served_cfg = demo_config({**base, "teacher_server.mode": "on"})
    rows = prepare_teacher_rows(served_cfg, serve=True)
    cache, lay = rows.cache, rows.served_layout
    runs = {"served teacher": run_trials([served_cfg], served_cfg, lay, str(cache.directory), server_cpus=1.0),
            "own teacher": run_trials([demo_config(base)])}
    for mode, run in runs.items():
        trial = run["trials"][0]
        print(f"  {mode:15s} on-policy batch {trial['on_policy_s_per_batch'] * 1000:.0f} ms, cached off-policy "
              f"batch {trial['off_policy_s_per_batch'] * 1000:.0f} ms", flush=True)
    return runs


def mean_step(run: dict) -> float:
    return sum(t["off_policy_s_per_batch"] for t in run["trials"]) / len(run["trials"])


def on_policy_ratio(trial: dict) -> float:
    return trial["on_policy_s_per_batch"] / trial["off_policy_s_per_batch"]


def pss_memory(one: dict) -> tuple[float, float]:
    """(own, served) teacher memory on CPU: the PSS the teachers add over the teacher-less trials."""
    no, own, served = (one[m] for m in ("no teacher", "own teacher", "served teacher"))
    alone = sum(t["peak_pss"] for t in no["trials"])
    return (sum(t["peak_pss"] for t in own["trials"]) - alone,
            sum(t["peak_pss"] for t in served["trials"]) + served["server_peak"] - alone)


def result_records(args, one: dict, two: dict | None) -> list[dict]:
    """The figures by group, as the `@result {"part": "served", ...}` lines carry them."""
    import torch

    served, own = one["served teacher"], one.get("own teacher")
    cuda = args.device == "cuda"
    device = gpu_total()[0] if cuda else f"CPU ({torch.get_num_threads()} threads)"
    teacher_bytes = weight_bytes(bench_teacher(args))
    records = [{"group": "run", "trials": args.trials, "steps": args.steps,
                "teacher": f"Llama h{args.teacher_hidden} x {args.teacher_layers}", "teacher_gib": teacher_bytes / 2**30,
                "served_step_s": mean_step(served), "occupancy": served["occupancy"],
                "requests": served["stats"]["requests"], "forwards": served["stats"]["forwards"],
                "seconds": served["seconds"]}]
    if cuda:
        server = served.get("server_gpu") or {}
        trials = [t["gpu_peak"] / 2**30 for t in served["trials"]]
        records.append({"group": "memory", "measure": "cuda", "trial_peak_gib": trials,
                        "server_peak_gib": server["gpu_peak"] / 2**30 if server else None,
                        "sum_gib": sum(trials) + server.get("gpu_peak", 0) / 2**30,
                        "reserved_sum_gib": (sum(t["gpu_reserved"] for t in served["trials"])
                                             + server.get("gpu_reserved", 0)) / 2**30,
                        "gpu_total_gib": gpu_total()[1] / 2**30, "own_copies_gib": args.trials * teacher_bytes / 2**30,
                        "own_measured_gib": sum(t["gpu_peak"] for t in own["trials"]) / 2**30 if own else None})
    else:
        own_bytes, served_bytes = pss_memory(one)
        records.append({"group": "memory", "measure": "pss", "own_gib": own_bytes / 2**30,
                        "served_gib": served_bytes / 2**30, "ratio": served_bytes / own_bytes})
    records.append({"group": "step", "served_step_s": mean_step(served), "own_step_s": mean_step(own) if own else None,
                    "ratio": mean_step(served) / mean_step(own) if own else None})
    if two:
        records.append({"group": "on_policy", "served": on_policy_ratio(two["served teacher"]["trials"][0]),
                        "own": on_policy_ratio(two["own teacher"]["trials"][0])})
    return [{"part": "served", "device": device, **r} for r in records]


def gpu_summary(args, one: dict, records: list[dict]) -> None:
    """--device cuda's closing lines (and figures.json); the modes' lines above give the step times."""
    run, memory = records[:2]
    (BENCH_DIR / "figures.json").write_text(json.dumps({"records": records, "part1": one, "args": vars(args)},
                                                       indent=1, default=str))
    print(f"peak GPU memory, served ({args.trials} trials + server): {memory['sum_gib']:.2f} of "
          f"{memory['gpu_total_gib']:.1f} GiB; {args.trials} own teachers' weights alone: "
          f"{memory['own_copies_gib']:.1f} GiB")
    print(f"server batch occupancy: {run['occupancy']:.2f} requests per teacher forward")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-hidden", type=int, default=1024)
    parser.add_argument("--teacher-layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="batches of 64 per trial in part 1")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--on-policy-examples", type=int, default=960, help="0: skip part 2")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--teacher-gpu-share", type=float, help="cuda: the teacher's layers chosen so that its "
                        "weights take this share of the GPU's memory (instead of --teacher-layers)")
    parser.add_argument("--teacher-weights", choices=("random", "tiled"), help="default: tiled on cuda, else random")
    parser.add_argument("--trial-gpu", type=float, default=0.15, help="cuda: each trial's GPU share in Ray")
    parser.add_argument("--server-gpu", type=float, default=0.4, help="cuda: the server's GPU share in Ray")
    parser.add_argument("--result-lines", action="store_true",
                        help="also print one `@result {json}` line per figure group (bench/gpu_check.sh's table)")
    parser.add_argument("--smoke", action="store_true", help="seconds on CPU: 2 trials of a toy demo with a Llama "
                        "teacher of 64 x 1, 1 step each, part 2 on 32 conversations, all in a scratch folder "
                        "(the code path, not the figures)")
    args = parser.parse_args()
    if args.smoke:
        smoke(args)
    cuda = args.device == "cuda"
    if cuda and args.on_policy_examples:
        parser.error("--device cuda runs part 1 only: add --on-policy-examples 0")
    if args.teacher_gpu_share and not cuda:
        parser.error("--teacher-gpu-share needs --device cuda")
    args.teacher_weights = args.teacher_weights or ("tiled" if cuda else "random")
    logging.basicConfig(level=logging.WARNING)
    if cuda:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU here: --device cuda needs one")
            return 1
    if args.smoke:
        pass             # smoke() built the toy demo
    elif args.on_policy_examples or args.teacher_weights == "random":
        demo.prepare()   # part 2 and save_big_teacher read the demo's trained teacher
    elif not all((DEMO_DIR / f).is_file() for f in ("data/train.jsonl", "data/val.jsonl", "tokenizer/tokenizer.json")):
        demo.write_inputs(DEMO_DIR)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if args.teacher_gpu_share:
        args.teacher_layers = layers_for_share(args.teacher_hidden, args.teacher_gpu_share, gpu_total()[1])
    print(f"part 1: {args.trials} concurrent trials, teacher Llama h{args.teacher_hidden} x {args.teacher_layers} layers "
          f"(held in the trials' precision), {args.steps} batches of 64 each, teacher live:", flush=True)
    one = part_one(args)
    two = None
    if args.on_policy_examples:
        print("part 2: on-policy cost, one trial of the demo search, on_policy_fraction 0.5:", flush=True)
        two = part_two(args)
    records = result_records(args, one, two) if args.result_lines or cuda else []
    if cuda:
        gpu_summary(args, one, records)
    else:
        cpu_summary(args, one, two)
    for record in records if args.result_lines else []:
        print("@result " + json.dumps(record), flush=True)
    return 0


def smoke(args) -> None:
    """--smoke: toy sizes, and the demo, the bench teacher and figures.json in a scratch folder."""
    global BENCH_DIR, DEMO_DIR
    import _smoke

    from tune_kd.model.hardware import quiet_progress_bars

    if args.device != "cpu":
        raise SystemExit("--smoke runs on CPU")
    folder = _smoke.scratch("served")
    BENCH_DIR, DEMO_DIR = folder / "served-bench", _smoke.tiny_demo(folder / "demo")
    SMOKE_OVERRIDES.update(_smoke.demo_overrides(DEMO_DIR))
    args.teacher_hidden, args.teacher_layers, args.steps, args.trials = 64, 1, 1, 2
    args.on_policy_examples = 32
    quiet_progress_bars()
    # one Ray session for every run (the real bench starts one per run, so that no trial's memory
    # figure includes what an earlier task left in a reused worker; a smoke run's figures mean nothing)
    start_ray(4)


def cpu_summary(args, one: dict, two: dict | None) -> None:
    """The CPU run's closing lines (and figures.json)."""
    own, served = one["own teacher"], one["served teacher"]
    local_memory, served_memory = pss_memory(one)
    on_policy = {"on_policy_served": on_policy_ratio(two["served teacher"]["trials"][0]),
                 "on_policy_own": on_policy_ratio(two["own teacher"]["trials"][0])} if two else {}
    figures = {"local_teacher_gb": local_memory / 1e9, "served_teacher_gb": served_memory / 1e9,
               "memory_ratio": served_memory / local_memory, "step_ratio": mean_step(served) / mean_step(own),
               "occupancy": served["occupancy"], **on_policy, "args": vars(args)}
    (BENCH_DIR / "figures.json").write_text(json.dumps({**figures, "part1": one, "part2": two}, indent=1, default=str))
    print(f"teacher memory: own {figures['local_teacher_gb']:.2f} GB over {args.trials} trials, served "
          f"{figures['served_teacher_gb']:.2f} GB (server {served['server_peak'] / 1e9:.2f} GB)")
    print(f"served/local teacher memory ({args.trials} trials): {figures['memory_ratio']:.3f}")
    print(f"served/local trial step time: {figures['step_ratio']:.3f}")
    print(f"server batch occupancy: {figures['occupancy']:.2f} requests per teacher forward")
    if two:
        print(f"on-policy / cached off-policy batch: {figures['on_policy_served']:.2f} (served teacher), "
              f"{figures['on_policy_own']:.2f} (own teacher)")


if __name__ == "__main__":
    raise SystemExit(main())
