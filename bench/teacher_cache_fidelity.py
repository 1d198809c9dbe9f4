"""Teacher cache fidelity: the KD loss and its gradient from the cache against the live teacher, by k
and stored dtype, and the k that teacher_cache.top_k auto picks.

    python bench/teacher_cache_fidelity.py --world docstrings     # MiniMind's 6,400-id BPE tokenizer
    python bench/teacher_cache_fidelity.py                        # the embedded default (vocab 103)
    python bench/teacher_cache_fidelity.py --smoke    # seconds: a toy demo (untrained tiny teacher) in a
                                                      # scratch folder, 8 conversations, T 1 and 4 (tests/bench)

Worlds: `docstrings` (bench/docstring_world.py: chat data made of installed packages' docstrings,
a teacher trained on it, a student distilled from it; built and cached under results/ on first
use, tens of CPU minutes the first time) and `demo` (--space's teacher and data, the embedded default unless told
otherwise). For two students (a fresh one, far from the teacher, and a trained one, close to it,
where the tail matters most) and a fixed seeded sample of training conversations, each (k, dtype)
is compared with the live teacher at every T of --temperatures (cache_fidelity.FidelityMeter):

    loss error           |KD_cache - KD_live| / KD_live          (the config's kd_loss, summed)
    grad error (params)  ||g_cache - g_live|| / ||g_live||       w.r.t. every student parameter
    grad error (logits)  the same w.r.t. the student's logits    (what top_k auto measures)

printing the worst over T (and where) with the teacher's mean tail mass (the probability outside
its top k) at T = 1 and T = 5. Every k of auto's ladder is measured in float16 (the default
dtype); --compare-k are measured in float32 and bfloat16 as well. Last, top_k auto's own
decision for the world's config with T searched over the same range (cache_plan.plan_teacher_cache,
against the fresh student).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_kd.config.experiment import load_config
from tune_kd.data import inputs, tokenized
from tune_kd.kd import losses, scoring
from tune_kd.kd.scored import ScoredLM
from tune_kd.model import build, hardware
from tune_kd.search import demo
from tune_kd.teacher import cache_fidelity, cache_plan, stored_rows
from tune_kd.teacher.local import LiveTeacher
from tune_kd.train import step

TEMPERATURES = (1.0, 2.0, 3.0, 4.0, 5.0)


def load_world(args):
    """(config, {student name: language model}) for --world."""
    if args.world == "docstrings":
        import docstring_world

        world = docstring_world.prepare()
        cfg = load_config(raw=world["config"])
        trained_path = world["distilled_student"]
        print(f"docstring world: teacher val_ce {world['teacher_metrics']['val_ce']:.3f} "
              f"({world['teacher_metrics']['train_seconds']:.0f} s of training), distilled student val_ce "
              f"{world['student_metrics']['val_ce']:.3f}, val_kl {world['student_metrics']['val_kl']:.3f}")
    elif args.smoke:
        import _smoke

        root = _smoke.tiny_demo(_smoke.scratch("cache-fidelity") / "demo")
        cfg = load_config(args.space, _smoke.demo_overrides(root, "train.jsonl"))
        trained_path = root / "no-trained-student"    # the fresh student only
    else:
        cfg = load_config(args.space)
        if cfg.embedded_demo:
            demo.prepare()
        trained_path = Path(args.trained)
    return cfg, trained_path


def full_logits(scored) -> torch.Tensor:
    """A Scored output's whole (N, V) fp32 logits (differentiable for the student): the figures
    here compare whole rows, which the sample is small enough to hold."""
    return scored.logits(0, scored.rows)


def tail_mass(teacher_logits: torch.Tensor, k: int, temperature: float) -> float:
    """Mean probability the teacher puts outside its top k at temperature T."""
    probs = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    return float(1.0 - probs.topk(min(k, probs.shape[-1]), dim=-1).values.sum(-1).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", choices=("demo", "docstrings"), default="demo")
    parser.add_argument("--space", default="search_spaces/kd.yaml", help="demo world: the experiment YAML")
    parser.add_argument("--trained", default="results/kd-demo/best_student",
                        help="demo world: the trained student (the search's export), when it exists")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    parser.add_argument("--compare-k", type=int, nargs="+", default=[64, 256, 1024],
                        help="ks also measured in float32 and bfloat16")
    parser.add_argument("--smoke", action="store_true", help="seconds: the demo world at toy size (see above)")
    args = parser.parse_args()
    if args.smoke:
        if args.world != "demo":
            parser.error("--smoke builds its own toy demo world")
        args.conversations, args.temperatures, args.compare_k = 8, [1.0, 4.0], [16]
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    torch.manual_seed(0)
    cfg, trained_path = load_world(args)
    precision = hardware.resolve_precision("float32", torch.device("cpu"))
    torch.manual_seed(cfg.train.seed)   # the fresh student as loop.train would build it
    tokenizer, train_data, _ = inputs.load_data(cfg)
    students = {"fresh student": build.make_student(cfg.student, tokenizer, precision)}
    if trained_path.is_dir():
        from transformers import AutoModelForCausalLM

        students["trained student"] = AutoModelForCausalLM.from_pretrained(trained_path, dtype=torch.float32)
    teacher = ScoredLM(build.make_teacher(cfg.teacher, tokenizer, precision))
    vocab = build.vocab_rows(teacher.lm)
    pad_id = tokenized.padding_id(tokenizer)
    batches = cache_fidelity.sample_batches(train_data, pad_id, conversations=args.conversations)
    teacher_outputs = scoring.teacher_outputs(teacher, precision)
    ks = cache_fidelity.auto_ladder(vocab)
    layouts = [stored_rows.layout(k, vocab, "float16") for k in ks]
    layouts += [stored_rows.layout(k, vocab, dtype) for k in args.compare_k if k < vocab
                for dtype in ("float32", "bfloat16")]
    layouts.sort(key=lambda lay: (lay.k, lay.dtype != "float32", lay.dtype))
    teacher_logits = torch.cat([full_logits(teacher_outputs(b)) for b in batches])
    positions = teacher_logits.shape[0]
    print(f"teacher {cfg.teacher.path} (vocab {vocab}), kd_loss {cfg.train.kd_loss}, {args.conversations} sampled "
          f"conversations ({positions} scored positions), T in {args.temperatures}")
    header = (f"{'k':>5} {'dtype':>8} {'bytes/pos':>9} {'loss error':>10} {'at T':>4} {'grad (params)':>13} "
              f"{'at T':>4} {'grad (logits)':>13} {'at T':>4} {'tail T=1':>9} {'T=5':>8}")
    for name, lm in students.items():
        student = ScoredLM(lm)
        meter = cache_fidelity.FidelityMeter(layouts, args.temperatures, {cfg.train.kd_loss: losses.kd_options(cfg.train)},
                                             list(student.parameters()))
        for batch in batches:
            s_out, t_out, *_ = step.forward_pair(student, LiveTeacher(teacher, precision), batch, precision)
            meter.add(full_logits(s_out), full_logits(t_out.scored), conversations=len(batch["indices"]))
        print(f"\n{name}: worst relative error over T (and where), by k and stored dtype")
        print(header)
        for lay, f in meter.results().items():
            at = lambda t: "-" if t is None else f"{t:g}"  # noqa: E731
            print(f"{lay.k:>5} {lay.value_dtype:>8} {lay.bytes_per_position:>9} {100 * f.loss:>9.3f}% {at(f.loss_at):>4} "
                  f"{100 * f.param_grad:>12.3f}% {at(f.param_grad_at):>4} {100 * f.grad:>12.3f}% {at(f.grad_at):>4} "
                  f"{tail_mass(teacher_logits, lay.k, 1.0):>9.2e} {tail_mass(teacher_logits, lay.k, 5.0):>8.2e}",
                  flush=True)
        del meter

    # top_k auto's own decision: T searched over the same range, against the fresh student
    searched = {"temperature": {"distribution": "uniform", "min": min(args.temperatures),
                                "max": max(args.temperatures)}}
    auto_cfg = cfg.replace(parameters={**cfg.parameters, **searched},
                           teacher_cache=dataclasses.replace(cfg.teacher_cache, mode="auto", top_k="auto"))
    torch.manual_seed(cfg.train.seed)
    fresh = ScoredLM(build.make_student(cfg.student, tokenizer, precision))
    plan, _ = cache_plan.plan_teacher_cache(cache_plan.CacheSource(auto_cfg, tokenizer, train_data,
                                                                   LiveTeacher(teacher, precision), pad_id, fresh))
    print(f"\ntop_k auto on this world (T searched in [{min(args.temperatures):g}, {max(args.temperatures):g}], "
          f"{len(train_data)} training conversations, {int(train_data.target_counts.sum())} positions): {plan.why}")
    print(f"\nbench wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
