"""Distillation step throughput: the seed's step against tune_kd's, in one process, same data.

    python bench/step_throughput.py [--compile on]   # GPU, the seed's sizes (student 512x8, teacher 768x16, vocab 6400)
    python bench/step_throughput.py --quick          # CPU, the embedded default's sizes (student 64x2, teacher 128x4)
    python bench/step_throughput.py --smoke          # CPU, seconds: --quick's shapes, smaller, 2 timed steps (tests/bench)

(a) seed: a faithful re-implementation of MiniMind's step: every row padded to max_seq_len, the
    teacher in fp32 outside autocast, full (B, T, V) logits for both models, CE and KL on the masked
    rows, torch's default (non-fused) AdamW.
(b) tune_kd: the real loop's path (train/step.py's backward_step + optimizer_step) on length-bucketed
    batches of the same sequences: teacher weights in bf16 under inference_mode (on GPU), LM head
    only on assistant positions, chunked fp32 loss math, fused AdamW on CUDA; with --compile on, each
    decoder layer compiled as a trial compiles it (compiling.compile_bodies).
(c) cached: (b) reading the teacher's top-k outputs from the teacher cache (cache_store.py,
    built once over the same sequences before timing) instead of running the teacher.

Prints, per variant: ms/step, real tokens/s, padded tokens/s, model TFLOP/s (6*P_student +
2*P_teacher per real token: useful work), MFU against the device's peak (when known), peak memory,
the warm-up's time beyond the steady pace (torch.compile's one-off cost when compiled, reported
apart from the steady figures), and the ratios b/a and c/b of real-token throughput. --variants
picks which run (bench/gpu_check.sh runs the compiled ones in a process of their own, under their
own timeout); --result-lines adds one machine-readable '@result {json}' line per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_kd.config.experiment import load_config
from tune_kd.data import tokenized
from tune_kd.kd import scoring
from tune_kd.kd.scored import ScoredLM
from tune_kd.model import build, compiling, hardware
from tune_kd.teacher import cache_store, stored_rows
from tune_kd.teacher.local import CacheReader, LiveTeacher
from tune_kd.train.run import Run
from tune_kd.train.step import MicroStep, backward_step, optimizer_step

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16


class VocabStub:
    """What build_model needs of a tokenizer: its size and special ids."""

    def __init__(self, size: int):
        self.size, self.pad_token_id, self.bos_token_id, self.eos_token_id = size, 0, 1, 2

    def __len__(self) -> int:
        return self.size


def random_data(n: int, vocab: int, min_len: int, max_len: int, assistant_share: float, seed: int) -> tokenized.TokenizedData:
    """n sequences with lengths uniform in [min_len, max_len]; the last share of each is the assistant's."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=n)
    tokens = rng.integers(3, vocab, size=int(lengths.sum())).astype(np.int32)
    mask = np.concatenate([np.arange(length) >= int(length * (1 - assistant_share)) for length in lengths])
    return tokenized.TokenizedData.from_arrays(tokens, mask, lengths)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_step(student, teacher_fp32, optimizer, scaler, batch, precision, alpha, temperature, grad_clip):
    """MiniMind's step as the seed runs it (padded rows, full logits, fp32 teacher outside autocast)."""
    ids = batch["input_ids"].to(precision.device)
    labels = batch["labels"].to(precision.device)
    X, Y = ids[:, :-1], labels[:, 1:]
    loss_mask = (Y != -100).float()
    with precision.autocast():
        s_logits = student(input_ids=X).logits                                   # (B, T, V)
    with torch.no_grad():
        t_logits = teacher_fp32(input_ids=X).logits                               # (B, T, V), fp32
    V = s_logits.shape[-1]
    ce = F.cross_entropy(s_logits.float().reshape(-1, V), Y.clamp(min=0).reshape(-1), reduction="none")
    ce = (ce.view(Y.shape) * loss_mask).sum() / loss_mask.sum()
    rows = loss_mask.view(-1) == 1
    kd = F.kl_div(F.log_softmax(s_logits.float().reshape(-1, V)[rows] / temperature, -1),
                  F.softmax(t_logits.reshape(-1, V)[rows] / temperature, -1), reduction="batchmean") * temperature ** 2
    loss = alpha * ce + (1 - alpha) * kd
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def measure(run_step, batches, warmup: int, steps: int, device) -> dict:
    """Time `steps` steps after `warmup`. warmup_s: the warm-up steps' time beyond the steady pace,
    i.e. torch.compile's one-off cost when the step is compiled (allocator and library start-up
    otherwise); graphs: the graphs dynamo compiled so far (one per model and mode when no batch
    shape recompiles)."""
    from torch._dynamo.utils import counters

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for b in batches[:warmup]:
        run_step(b)
    sync(device)
    warmup_seconds = time.perf_counter() - started
    timed = batches[warmup:warmup + steps]
    started = time.perf_counter()
    for b in timed:
        run_step(b)
    sync(device)
    seconds = time.perf_counter() - started
    real = sum(b["num_tokens"] for b in timed)
    padded = sum(b["input_ids"].numel() for b in timed)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": 1000 * seconds / len(timed), "real": real / seconds, "padded": padded / seconds,
            "warmup_s": max(0.0, warmup_seconds - warmup * seconds / len(timed)), "peak_gib": peak,
            "graphs": counters["stats"]["unique_graphs"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, the embedded default's sizes, few steps")
    p.add_argument("--smoke", action="store_true", help="CPU, seconds: every variant at toy sizes (the code path)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--student", default="512,8,8,2", help="hidden,layers,heads,kv_heads")
    p.add_argument("--teacher", default="768,16,8,2", help="hidden,layers,heads,kv_heads")
    p.add_argument("--vocab", type=int, default=6400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=512, help="also the seed's padded length (max_seq_len)")
    p.add_argument("--assistant-share", type=float, default=0.5, help="share of each sequence that is assistant")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", default="off", choices=["on", "off"],
                   help="torch.compile tune_kd's step (compiling.compile_bodies); its cost is reported apart")
    p.add_argument("--variants", default="seed,tune_kd,cached", help="which of seed, tune_kd, cached to run")
    p.add_argument("--result-lines", action="store_true",
                   help="also print each row as '@result {json}' (bench/gpu_check.sh reads them)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    args = p.parse_args()
    variants = set(args.variants.split(","))
    if not variants or variants - {"seed", "tune_kd", "cached"}:
        p.error(f"--variants: give some of seed, tune_kd, cached (got {args.variants})")
    if args.quick:
        args.device, args.student, args.teacher, args.vocab = "cpu", "64,2,4,4", "128,4,4,4", 100
        args.batch, args.min_len, args.max_len, args.assistant_share = 64, 20, 60, 0.2
        args.max_len_pad, args.steps, args.warmup = 128, 10, 3
    elif args.smoke:
        args.device, args.student, args.teacher, args.vocab = "cpu", "32,1,2,2", "64,1,2,2", 100
        args.batch, args.min_len, args.max_len, args.assistant_share = 8, 12, 24, 0.3
        args.max_len_pad, args.steps, args.warmup = 32, 2, 1
    else:
        args.max_len_pad = args.max_len
    torch.manual_seed(0)
    device = hardware.resolve_device(args.device)
    precision = hardware.resolve_precision(args.dtype, device)
    stub = VocabStub(args.vocab)

    def arch(spec: str) -> dict:
        h, layers, heads, kv = (int(x) for x in spec.split(","))
        return {"hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": kv, "max_position_embeddings": args.max_len_pad}

    cfg = load_config(raw={"teacher": {"arch": arch(args.teacher)}, "student": {"arch": arch(args.student)},
                           "train": {"alpha": 0.5, "temperature": 2.0, "batch_size": args.batch,
                                     "dtype": args.dtype, "device": str(device)}})
    n_batches = args.warmup + args.steps
    pool = random_data(args.batch * n_batches, args.vocab, args.min_len, args.max_len, args.assistant_share, seed=1)

    def param_count(spec) -> int:
        with torch.device("meta"):
            return sum(x.numel() for x in build.build_model(spec, stub, "bench").parameters())

    p_student, p_teacher = param_count(cfg.student), param_count(cfg.teacher)
    flops_per_token = 6 * p_student + 2 * p_teacher
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda"
                                     and k in torch.cuda.get_device_name(device)), None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; precision: {precision.reason}")
    print(f"student {args.student} ({p_student / 1e6:.1f} M), teacher {args.teacher} ({p_teacher / 1e6:.1f} M), "
          f"vocab {args.vocab}, batch {args.batch}, lengths U[{args.min_len}, {args.max_len}], "
          f"seed pads to {args.max_len_pad}, {args.steps} timed steps after {args.warmup}")
    print(f"{'variant':<10} {'compile':>7} {'ms/step':>9} {'real tok/s':>11} {'padded tok/s':>13} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>9} {'warm-up s':>9}", flush=True)

    def row(label: str, m: dict, compiled: bool) -> None:
        """One variant's figures, printed as soon as it is measured (a long compile cannot hide the first)."""
        tflops = m["real"] * flops_per_token / 1e12
        mfu = f"{100 * tflops / peak:5.1f}%" if peak else "   n/a"
        mem = f"{m['peak_gib']:9.2f}" if not math.isnan(m["peak_gib"]) else f"{'n/a':>9}"
        print(f"{label:<10} {'on' if compiled else 'off':>7} {m['ms']:9.1f} {m['real']:11.0f} {m['padded']:13.0f} "
              f"{tflops:8.3f} {mfu:>6} {mem} {m['warmup_s']:9.1f}", flush=True)
        if args.result_lines:
            result = {"part": "step", "variant": label, "compile": compiled, "device": name, "ms": m["ms"],
                      "real_tok_s": m["real"], "tflops": tflops, "mfu": tflops / peak if peak else None,
                      "peak_gib": None if math.isnan(m["peak_gib"]) else m["peak_gib"],
                      "compile_s": m["warmup_s"] if compiled else None, "graphs": m["graphs"] if compiled else None}
            print("@result " + json.dumps(result), flush=True)

    measured = {}
    if "seed" in variants:
        # (a) the seed: rows padded to max_seq_len, in the pool's order, on its own models
        seed_batches = []
        for i in range(n_batches):
            b = tokenized.collate(pool, np.arange(i * args.batch, (i + 1) * args.batch), stub.pad_token_id)
            pad = args.max_len_pad - b["input_ids"].shape[1]
            b["input_ids"] = F.pad(b["input_ids"], (0, pad), value=stub.pad_token_id)
            b["labels"] = F.pad(b["labels"], (0, pad), value=-100)
            seed_batches.append(b)
        student = build.make_student(cfg.student, stub, precision)
        teacher = build.make_teacher(cfg.teacher, stub, hardware.resolve_precision("float32", device))
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)
        measured["seed"] = measure(lambda b: seed_step(student, teacher, optimizer, scaler, b, precision, 0.5, 2.0, 1.0),
                                   seed_batches, args.warmup, args.steps, device)
        row("seed", measured["seed"], False)
        del student, teacher, optimizer, seed_batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not variants & {"tune_kd", "cached"}:
        return 0

    # (b) tune_kd: the loop's own step functions on bucketed batches of the same sequences
    lm = build.make_student(cfg.student, stub, precision)
    teacher_lm = build.make_teacher(cfg.teacher, stub, precision)
    compiled = args.compile == "on"
    if compiled:
        compiling.compile_bodies(lm, teacher_lm)
    student_fast, teacher_fast = ScoredLM(lm), ScoredLM(teacher_lm)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)
    fast_batches = [tokenized.collate(pool, idx, stub.pad_token_id)
                    for idx in tokenized.epoch_batches(pool, args.batch, seed=0, epoch=0)][:n_batches]
    if device.type == "cuda":
        fast_batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in fast_batches]

    live = LiveTeacher(teacher_fast, precision)
    run = Run(cfg, 0, 1, precision, stub, pool, pool, stub.pad_token_id, lm, live, student_fast, student_fast, True,
              None, optimizer, scaler)

    def fast_step(b, cache=None):
        normalizer = int((b["labels"][:, 1:] != -100).sum())  # host-side, no device sync
        backward_step(run if cache is None else dataclasses.replace(run, teacher=CacheReader(cache, live)), b,
                      MicroStep(normalizer, cfg.train.temperature))
        optimizer_step(lm, optimizer, scaler, 1.0)

    if "tune_kd" in variants:
        measured["tune_kd"] = ours = measure(fast_step, fast_batches, args.warmup, args.steps, device)
        row("tune_kd", ours, compiled)
        padding = 1 - sum(b["num_tokens"] for b in fast_batches) / sum(b["input_ids"].numel() for b in fast_batches)
        versus = f"ratio tune_kd/seed (real tokens/s): {ours['real'] / measured['seed']['real']:.2f}x; " \
            if "seed" in measured else ""
        print(f"{versus}padding left in tune_kd's batches: {100 * padding:.1f}%; warm-up beyond the steady pace "
              f"(torch.compile {'on' if compiled else 'off'}): {ours['warmup_s']:.1f} s", flush=True)

    if "cached" in variants:
        # (c) tune_kd reading the teacher cache (built once here, as a search's driver does) instead of
        # running the teacher: the same step function, the same batches
        with tempfile.TemporaryDirectory(prefix="tune_kd-bench-cache-") as cache_dir:
            started = time.perf_counter()
            top_k = 128 if cfg.teacher_cache.top_k == "auto" else cfg.teacher_cache.top_k   # auto would measure first
            cache_layout = stored_rows.layout(top_k, args.vocab, cfg.teacher_cache.dtype)
            with torch.inference_mode():
                cache_store.build(scoring.teacher_outputs(teacher_fast, precision), pool, stub.pad_token_id,
                                    cache_layout, Path(cache_dir) / "cache", {})
            build_s = time.perf_counter() - started
            cache = cache_store.TeacherCache(Path(cache_dir) / "cache")
            cached = measure(lambda b: fast_step(b, cache), fast_batches, args.warmup, args.steps, device)
            row("cached", cached, compiled)
            versus = f"ratio cached/tune_kd (real tokens/s): {cached['real'] / measured['tune_kd']['real']:.2f}x; " \
                if "tune_kd" in measured else ""
            print(f"{versus}cache: {cache_layout.describe()}, {cache.nbytes / 2**20:.1f} MB for {len(pool)} sequences, "
                  f"built in {build_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
