"""One training step at a real vocabulary: the fused output layer against the materialised logits, in one run.

    python bench/vocab_memory.py                 # CPU: V = 151,936 and 128,256, 4,096 scored positions
    python bench/vocab_memory.py --device cuda   # GPU rows (bench/gpu_check.sh runs this)
    python bench/vocab_memory.py --smoke         # CPU, seconds: V = 8,192, 256 positions, 1 timed step (tests/bench)

Two paths, the same models, batch and objective (forward KL, alpha 0.5, T 2, fp32 loss math), at
train.dtype's default (bfloat16: bf16 autocast on CUDA and on a CPU with native bf16, else fp32):

    full   tune_kd's step before the fused head: both models' (N, V) logits at the scored positions,
           the loss in checkpointed chunks of 2,048 rows (as it stood at commit f5f04c5)
    fused  today's step (step.forward_pair + losses.distillation_loss): hidden rows kept, logits made
           scored.CHUNK_ELEMENTS at a time and each chunk's gradient taken at once

The step is forward + backward (the optimizer's state is the same for both). Each (V, path) runs in
a fresh process: on CPU, peak memory is the peak resident set above what the process held after
building the models and the batch (large tensors are mmap'ed, so freed memory leaves the RSS at
once); on CUDA, torch.cuda.max_memory_allocated above the same point. Step time is the median of
--steps steps after one warm-up step. The decoder is small (student 64 wide, teacher 128, 2 layers
each) so that the output layer dominates, as it does for a small student of a 150k-vocabulary
teacher. The last lines print `fused/full peak memory at V=151936: X` and `fused/full step time at
V=151936: Y`, and the relative loss difference between the paths.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_kd.kd import losses, scored, scoring
from tune_kd.kd.scored import ScoredLM
from tune_kd.model import hardware
from tune_kd.teacher.local import LiveTeacher
from tune_kd.train import step

VOCABS = (151_936, 128_256)
ALPHA, TEMPERATURE = 0.5, 2.0
OLD_CHUNK_ROWS = 2048


def build(vocab: int, device: torch.device, positions: int, seed: int = 0):
    """(student, teacher, input_ids (B, T), labels (B, T)): sequences of 160 tokens whose last 128 are scored."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = lambda width: LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width,  # noqa: E731
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                       tie_word_embeddings=True)
    student = LlamaForCausalLM(config(64)).to(device).train()
    teacher = LlamaForCausalLM(config(128)).to(device).eval().requires_grad_(False)
    rows = positions // 128
    input_ids = torch.randint(0, vocab, (rows, 160), device=device)
    labels = input_ids.clone()
    labels[:, :32] = -100                              # the prompt; the last 128 tokens are scored
    return student, teacher, input_ids, labels


def old_chunked_sum(fn, *rows):
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), device=rows[0].device)
    for lo in range(0, rows[0].shape[0], OLD_CHUNK_ROWS):
        total = total + checkpoint(fn, *(r[lo:lo + OLD_CHUNK_ROWS] for r in rows), use_reentrant=False)
    return total


def full_step(student, teacher, input_ids, labels, precision) -> float:
    """The step as it stood before the fused head: (N, V) logits of both models, chunked loss."""
    positions, targets = scoring.scored_positions(labels)
    with precision.autocast():
        hidden = student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[positions]
        s_logits = student.get_output_embeddings()(hidden)                                  # (N, V)
    with torch.inference_mode(), precision.autocast():
        t_hidden = teacher.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[positions]
        t_logits = teacher.get_output_embeddings()(t_hidden)                                # (N, V)
    t_logits = t_logits.clone()
    n = targets.numel()
    ce = old_chunked_sum(lambda s, y: F.cross_entropy(s.float(), y, reduction="sum"), s_logits, targets) / n
    kd = old_chunked_sum(lambda s, t: losses.forward_kl_sum(s, t, TEMPERATURE), s_logits, t_logits) / n
    loss = ALPHA * ce + (1 - ALPHA) * TEMPERATURE ** 2 * kd
    loss.backward()
    return float(loss)


def fused_step(student, teacher, input_ids, labels, precision) -> float:
    s_out, t_out, targets, _, _ = step.forward_pair(student, LiveTeacher(teacher, precision),
                                                    {"input_ids": input_ids, "labels": labels}, precision)
    parts = losses.distillation_loss(s_out, t_out, targets, ALPHA, TEMPERATURE, targets.numel())
    parts.loss.backward()
    return float(parts.loss)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def one(vocab: int, path: str, device: str, positions: int, steps: int, chunk_elements: int | None) -> dict:
    """One (V, path) in this process: its peak memory above set-up, median step time, loss."""
    if chunk_elements:
        scored.CHUNK_ELEMENTS = chunk_elements
    device = torch.device(device)
    precision = hardware.resolve_precision("bfloat16", device)   # train.dtype's default, as a trial resolves it
    student, teacher, input_ids, labels = build(vocab, device, positions)
    if path == "fused":
        student, teacher = ScoredLM(student), ScoredLM(teacher)
    step = fused_step if path == "fused" else full_step
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    else:
        held = rss_bytes()
    times, loss = [], None
    for i in range(steps + 1):
        student.zero_grad(set_to_none=True)
        sync()
        started = time.perf_counter()
        loss = step(student, teacher, input_ids, labels, precision)
        sync()
        if i:
            times.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - held
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - held
    return {"vocab": vocab, "path": path, "chunk_elements": scored.CHUNK_ELEMENTS, "peak_bytes": peak, "step_seconds": statistics.median(times), "loss": loss,
            "positions": int(scoring.scored_positions(labels)[1].numel())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--positions", type=int, default=4096, help="scored positions per step (multiple of 128)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--vocab", type=int, nargs="*", default=list(VOCABS))
    parser.add_argument("--chunk-elements", type=int, help="the fused path's logits per chunk (default: "
                        "scored.CHUNK_ELEMENTS)")
    parser.add_argument("--paths", nargs="*", default=["full", "fused"], choices=["full", "fused"])
    parser.add_argument("--result-lines", action="store_true",
                        help="also print one `@result {json}` line per vocabulary (bench/gpu_check.sh's table)")
    parser.add_argument("--smoke", action="store_true", help="CPU, seconds: one small vocabulary, both paths")
    parser.add_argument("--one", nargs=2, metavar=("VOCAB", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.device, args.vocab, args.positions, args.steps = "cpu", [8192], 256, 1
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.device, args.positions, args.steps,
                             args.chunk_elements)))
        return 0
    rows = {}
    precision = hardware.resolve_precision("bfloat16", torch.device(args.device))
    print(f"device {device_name(args.device)}, {precision.reason}; {args.positions} scored positions, student 64x2 / "
          "teacher 128x2, forward + backward")
    print(f"{'V':>8} {'path':>6} {'peak GiB':>9} {'step s':>8} {'loss':>12}")
    for vocab in args.vocab:
        for path in args.paths:
            chunk = ["--chunk-elements", str(args.chunk_elements)] if args.chunk_elements else []
            done = subprocess.run([sys.executable, __file__, "--one", str(vocab), path, "--device", args.device,
                                   "--positions", str(args.positions), "--steps", str(args.steps), *chunk],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{vocab:>8} {path:>6} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
                continue
            row = rows[(vocab, path)] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{vocab:>8} {path:>6} {row['peak_bytes'] / 2**30:>9.3f} {row['step_seconds']:>8.2f} {row['loss']:>12.6f}",
                  flush=True)
    for vocab in args.vocab:
        full, fused = rows.get((vocab, "full")), rows.get((vocab, "fused"))
        if full and fused:
            print(f"fused/full peak memory at V={vocab}: {fused['peak_bytes'] / full['peak_bytes']:.3f}")
            print(f"fused/full step time at V={vocab}: {fused['step_seconds'] / full['step_seconds']:.3f}")
            print(f"fused vs full loss, relative difference at V={vocab}: "
                  f"{abs(fused['loss'] - full['loss']) / abs(full['loss']):.2e}")
            if args.result_lines:
                print("@result " + json.dumps({
                    "part": "vocab", "device": device_name(args.device), "vocab": vocab, "positions": args.positions,
                    "memory_ratio": fused["peak_bytes"] / full["peak_bytes"],
                    "time_ratio": fused["step_seconds"] / full["step_seconds"],
                    "fused_gib": fused["peak_bytes"] / 2**30, "full_gib": full["peak_bytes"] / 2**30,
                    "loss_rel_diff": abs(fused["loss"] - full["loss"]) / abs(full["loss"])}), flush=True)
    return 0


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    raise SystemExit(main())
