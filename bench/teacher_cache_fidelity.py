"""Teacher cache fidelity: the KD loss and its gradient from the cache against the live teacher, by k.

    python bench/teacher_cache_fidelity.py [--space search_spaces/kd.yaml] [--k 2 4 8 ...] [--conversations 512]

On the embedded default's teacher and data (built offline on first use) and its student
architecture, twice: a fresh student (far from the teacher) and the search's exported best
student when results/kd-demo/best_student exists (close to it, where the tail matters most). For
each k it builds a cache over the first --conversations training conversations and, for each T,
compares over those conversations (in batches of train.batch_size):

    loss error      |KD_cache - KD_live| / KD_live          (the kd_loss of the YAML, summed)
    gradient error  ||g_cache - g_live|| / ||g_live||       (w.r.t. every student parameter)

and prints the worst over T in [1, 5] per k with the teacher's mean tail mass at T = 5.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_kd import data, demo, loop, models, teacher_cache  # noqa: E402
from tune_kd.config import load_config  # noqa: E402

TEMPERATURES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default="search_spaces/kd.yaml")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 12, 16, 24, 32, 48, 64, 103])
    parser.add_argument("--conversations", type=int, default=512)
    parser.add_argument("--trained", default="results/kd-demo/best_student")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.space)
    if cfg.embedded_demo:
        demo.prepare()
    precision = models.resolve_precision("float32", torch.device("cpu"))
    tokenizer, train_data, _ = loop.load_data(cfg)
    sample = train_data.subset(np.arange(min(args.conversations, len(train_data))))
    pad_id = tokenizer.pad_token_id
    teacher_lm = models.make_teacher(cfg.teacher, tokenizer, precision)
    teacher = loop.SelectedLogits(teacher_lm)
    vocab = models.vocab_rows(teacher_lm)
    batches = [data.collate(sample, idx, pad_id) for idx in data.epoch_batches(sample, cfg.train.batch_size, 0, 0)]
    students = {"fresh student": models.make_student(cfg.student, tokenizer, precision)}
    if Path(args.trained).is_dir():
        from transformers import AutoModelForCausalLM

        students["trained student"] = AutoModelForCausalLM.from_pretrained(args.trained, dtype=torch.float32)
    print(f"teacher {cfg.teacher.path} (vocab {vocab}), kd_loss {cfg.train.kd_loss}, {len(sample)} conversations "
          f"({int(sample.target_counts.sum())} scored positions), T in {list(TEMPERATURES)}")
    for name, lm in students.items():
        student = loop.SelectedLogits(lm)
        print(f"\n{name}: worst relative error over T (and where), by k")
        print(f"{'k':>5} {'bytes/pos':>9} {'loss error':>11} {'at T':>5} {'grad error':>11} {'at T':>5} "
              f"{'tail mass T=1':>14} {'T=5':>7}")
        for k in args.k:
            with tempfile.TemporaryDirectory() as tmp:
                with torch.inference_mode():
                    teacher_cache.build(loop.teacher_rows(teacher, precision, None), sample, pad_id, k, vocab,
                                        Path(tmp) / "c", {})
                cache = teacher_cache.TeacherCache(Path(tmp) / "c")
                errors = teacher_cache.fidelity(cfg, student, teacher, cache, batches, precision, TEMPERATURES)
                worst_loss = max(errors, key=lambda t: errors[t][0])
                worst_grad = max(errors, key=lambda t: errors[t][1])
                print(f"{min(k, vocab):>5} {teacher_cache.bytes_per_position(k, vocab):>9} "
                      f"{100 * errors[worst_loss][0]:>10.3f}% {worst_loss:>5g} {100 * errors[worst_grad][1]:>10.3f}% "
                      f"{worst_grad:>5g} {teacher_cache.tail_mass(cache, 1.0):>14.2e} "
                      f"{teacher_cache.tail_mass(cache, 5.0):>7.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
