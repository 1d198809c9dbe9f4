"""tune_kd against TRL 1.16's distillation trainers on identical inputs: tokens/s, peak memory, first-step loss.

    pip install -e ".[bench]"                  # trl==1.16.0 and what it needs beyond the core
    python bench/vs_trl.py                     # both vocabularies, --steps 6 timed after --warmup 2
    python bench/vs_trl.py --vocab 6400 --steps 20 --warmup 3
    python bench/vs_trl.py --smoke             # tiny models and data, V=6400 only, a few steps; no /work/shared

The arms, each a process of its own (a fresh interpreter, so each peak memory is that arm's alone;
--smoke forks them from one parent that imported everything once, so its memory figures are not
per arm):

    trl_gkd            TRL's GKDTrainer (trl.experimental.gkd): lmbda 0 (never generates), beta 0
                       (forward KL), seq_kd off, its defaults otherwise except those listed below
    tune_kd_live       tune_kd as a trial runs it: build_run(cfg) on a config pointing at the
                       world's model directories and chat files, then per batch what loop.train_epoch
                       does (lr_at, backward_step, optimizer_step, malloc_trim on CPU), live teacher
    tune_kd_cached     the same run reading the teacher cache: teacher_cache on, top_k = V (the full
                       float32 rows, so the loss is exact), built in a process of its own beforehand
                       (as a search's driver builds it before its trials)
    trl_on_policy      TRL's DistillationTrainer (transformers generation), beta 0
    tune_kd_on_policy  train.on_policy_fraction 1: every batch's prompts answered by the student
                       (loop.generated_batch), then backward_step on prompt + reply

What is matched: the teacher and student (Qwen2ForCausalLM, random weights, saved once, loaded by
both), the tokenized chats (tune_kd's tokenization, assistant-only labels; TRL reads the same ids
as a pre-tokenized data set, in tune_kd's batch order, through a sequential sampler), batch size,
sequence length, fp32, AdamW (TRL is handed the torch.optim.AdamW tune_kd builds on this device:
same lr, betas, eps, weight decay) and tune_kd's learning-rate schedule (the seed's cosine, no
warm-up) as a LambdaLR, gradient clipping 1.0, one micro-batch per step, forward KL at T = 1,
alpha 0 (TRL's GKD has no CE term). Both normalise the summed per-token KL by the batch's
assistant-token count (TRL: its num_items_in_batch, labels[:, 1:] != -100; tune_kd: the window's
assistant tokens), with no T^2 needed at T = 1, so their first-step losses must agree within 1e-4
relative or the bench stops with one line. At V = 151,936 the Qwen2.5 tokenizer (151,646 ids) is
given 290 added tokens so it spans the models' rows: tune_kd's divergence compares the tokenizer's
columns only (build.check_vocab) while TRL compares every row, and the padding rows of a random
model carry mass, so without this the two objectives would differ.

TRL defaults turned off, each for the comparison's sake: gradient_checkpointing (TRL's default is
on: it recomputes activations, which tune_kd does not), bf16 (TRL's default is on: fp32 both),
report_to (none) and checkpoint saving (neither side writes checkpoints while timed).

Per arm: training tokens/s over the timed steps (assistant tokens, all real tokens), samples/s for
the on-policy arms, peak RSS (resource.getrusage over the process's life) and peak PSS (a thread
reading /proc/self/smaps_rollup, at most ~5% of a core); on CUDA torch.cuda.max_memory_allocated; the first
optimizer step's loss. Prints a table, then the ratio lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHARED = ROOT.parent / "shared" / "tokenizers"
QWEN_ROWS = 151_936                  # Qwen2.5's embedding rows; its tokenizer has 151,646 ids
MINIMIND_VOCAB = 6_400
LOSS_TOLERANCE = 1e-4                # relative: the first-step losses of the off-policy arms
OFF_POLICY = ("trl_gkd", "tune_kd_live", "tune_kd_cached")
ON_POLICY = ("trl_on_policy", "tune_kd_on_policy")

FULL = {"teacher": (256, 4, 4, 2, 768), "student": (128, 2, 4, 2, 384),   # hidden, layers, heads, kv heads, MLP
        "batch": 16, "max_seq_len": 256, "max_new_tokens": 32, "lr": 5e-4}
SMOKE = {"teacher": (64, 2, 4, 2, 192), "student": (32, 1, 4, 2, 96),
         "batch": 4, "max_seq_len": 128, "max_new_tokens": 8, "lr": 5e-4}


# ----------------------------------------------------------------------------------------------
# Measuring an arm: peak memory and the timed window
# ----------------------------------------------------------------------------------------------

class PeakPss:
    """Samples this process's PSS from /proc/self/smaps_rollup in a thread; .peak in bytes (0 off Linux).

    A read walks the process's page tables: ~20 ms of CPU at 1 GB resident, several times that at
    9 GB. So the thread waits 20x the last read's CPU time (at least `every`): it takes at most ~5%
    of a core from the arm it measures, the same share in every arm."""

    def __init__(self, every: float = 0.05):
        self.peak, self.every, self.cost, self._stop = 0, every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        started = time.thread_time()
        try:
            with open("/proc/self/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
                        break
        except OSError:
            pass
        self.cost = time.thread_time() - started

    def _run(self) -> None:
        while not self._stop.wait(max(self.every, 20 * self.cost)):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


def memory_figures(pss: PeakPss) -> dict:
    import torch

    figures = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_pss": pss.stop()}
    if torch.cuda.is_available():
        figures["cuda_peak"] = torch.cuda.max_memory_allocated()
    return figures


def timed_window(stamps: list[float], counts: list[dict], warmup: int) -> dict:
    """Figures over the steps after the warm-up: stamps[i] is when optimizer step i ended, counts[i]
    what it trained on (assistant tokens, all real tokens, samples)."""
    steps = len(stamps) - warmup
    seconds = stamps[-1] - stamps[warmup - 1]
    totals = {key: sum(c[key] for c in counts[warmup:]) for key in counts[0]}
    return {"steps": steps, "seconds": seconds, **{f"{key}_per_s": value / seconds for key, value in totals.items()},
            **{f"{key}_timed": value for key, value in totals.items()}}


def batch_digest(input_ids, labels) -> str:
    """A fingerprint of a batch's ids and labels: both sides must train on the same tensors."""
    import torch

    h = hashlib.sha256()
    for t in (input_ids, labels):
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The world: tokenizer, models, chats, config (built in a process of its own)
# ----------------------------------------------------------------------------------------------

def tiny_tokenizer(conversations: list[dict], size: int):
    """A byte-level BPE with ChatML built offline from the chats, padded with unused added tokens to
    exactly `size` ids (MiniMind's 6,400 in --smoke, which must not need ../shared)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = [m["content"] for c in conversations for m in c["messages"]]
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(size - len(tokenizer))], special_tokens=True)
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                               "'<|im_end|>' + '\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return tokenizer


def world_tokenizer(vocab: int, smoke: bool, conversations: list[dict]):
    """The tokenizer of a world whose models have `vocab` rows; its length always equals `vocab`."""
    from transformers import AutoTokenizer

    if smoke:
        return tiny_tokenizer(conversations, vocab)
    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / ("qwen2.5" if vocab == QWEN_ROWS else "minimind")))
    if len(tokenizer) < vocab:   # Qwen2.5: rows past its ids become tokens, so both sides compare every row
        tokenizer.add_tokens([f"<|vs_trl_row_{i}|>" for i in range(vocab - len(tokenizer))], special_tokens=True)
    assert len(tokenizer) == vocab, (len(tokenizer), vocab)
    return tokenizer


def qwen2(shape: tuple, tokenizer, vocab: int, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv_heads, intermediate = shape
    torch.manual_seed(seed)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=True,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, eos_token_id=end_of_turn)
    model = Qwen2ForCausalLM(config)
    # both trainers stop generating at the end-of-turn token (TRL reads it from here)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = end_of_turn, tokenizer.pad_token_id
    return model


def build_world(world: Path, vocab: int, smoke: bool, batches: int) -> dict:
    """Write tokenizer, teacher/, student/, train.jsonl, val.jsonl and spec.json into `world`."""
    from real_vocab_world import make_conversations

    size = SMOKE if smoke else FULL
    train = make_conversations(batches * size["batch"], seed=1)
    val = make_conversations(8, seed=2)
    tokenizer = world_tokenizer(vocab, smoke, train)
    sizes = {}
    for role, seed in (("teacher", 1), ("student", 2)):
        model = qwen2(size[role], tokenizer, vocab, seed)
        model.save_pretrained(str(world / role))
        tokenizer.save_pretrained(str(world / role))
        sizes[role] = sum(p.numel() for p in model.parameters())
    for name, rows in (("train", train), ("val", val)):
        with open(world / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return {"vocab": vocab, "sizes": sizes, **size}


def tune_kd_raw(world: Path, spec: dict, arm: str) -> dict:
    """The experiment config (a raw dict for load_config) the tune_kd arms and the preparation run."""
    train = {"epochs": 1, "batch_size": spec["batch"], "accumulation_steps": 1, "grad_clip": 1.0, "dtype": "float32",
             "warmup_iters": 0, "learning_rate": spec["lr"], "weight_decay": 0.0, "alpha": 0.0, "temperature": 1.0,
             "kd_loss": "forward_kl", "seed": 0, "log_interval": 10**6,
             "max_new_tokens": spec["max_new_tokens"], "generation_temperature": 1.0,
             "on_policy_fraction": 1.0 if arm == "tune_kd_on_policy" else 0.0}
    cache = {"mode": "on", "top_k": spec["vocab"], "dtype": "float32"} if arm == "tune_kd_cached" else {"mode": "off"}
    return {"name": "vs-trl", "teacher": {"path": str(world / "teacher")}, "student": {"path": str(world / "student")},
            "data": {"path": str(world / "train.jsonl"), "val_path": str(world / "val.jsonl"),
                     "max_seq_len": spec["max_seq_len"], "cache_dir": str(world / "cache")},
            "train": train, "teacher_cache": cache, "logging": {"wandb": False, "tensorboard": False}}


def prepare(world: Path, spec: dict) -> dict:
    """tune_kd tokenizes the chats once and builds the teacher cache; the rows TRL reads are written
    in tune_kd's batch order (rows.json): ids, assistant mask, the prompt before the last reply."""
    from tune_kd.config.experiment import load_config
    from tune_kd.data import tokenized
    from tune_kd.train import on_policy
    from tune_kd.train.run import build_run
    from tune_kd.train.step import lr_at

    cfg = load_config(raw=tune_kd_raw(world, spec, "tune_kd_cached"))
    run = build_run(cfg)   # tokenizes into data.cache_dir and builds the teacher cache there
    cache = getattr(run.teacher, "cache", None)   # teacher/local.CacheReader's
    assert cache is not None, "the teacher cache was not built"
    batches = tokenized.epoch_batches(run.train_data, cfg.train.batch_size, cfg.train.seed, 0)
    messages = [json.loads(line)["messages"] for line in open(world / "train.jsonl", encoding="utf-8")]
    rows = []
    for index in (int(i) for b in batches for i in b):
        ids, mask = run.train_data.example(index)
        prompt, _ = on_policy.split_last_reply(ids, mask)
        # tune_kd's training split is the whole train.jsonl in file order (val comes from val.jsonl)
        rows.append({"ids": ids.tolist(), "mask": mask.astype(int).tolist(), "prompt": prompt.tolist(),
                     "messages": messages[index]})
    (world / "rows.json").write_text(json.dumps(rows, ensure_ascii=False))
    total = len(batches)
    schedule_ok = all(abs(lr_at(s, total, 1.0, 0) - seed_cosine(s, total)) < 1e-12 for s in range(total))
    return {"batches": total, "pad_id": run.pad_id, "cache": cache.nbytes, "schedule_ok": schedule_ok,
            "cache_layout": f"top_k {spec['vocab']} of {spec['vocab']}: full float32 rows"}


def seed_cosine(step: int, total: int) -> float:
    """The learning-rate factor of tune_kd's schedule with no warm-up (train/step.lr_at / lr; prepare
    checks the two agree): lr/10 + lr/2 * (1 + cos(pi * step / total))."""
    return 0.1 + 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


# ----------------------------------------------------------------------------------------------
# The tune_kd arms
# ----------------------------------------------------------------------------------------------

def tune_kd_arm(world: Path, spec: dict, arm: str, warmup: int) -> dict:
    """loop.train_epoch's per-batch work for one epoch (world size 1, one micro-batch per step)."""
    import torch

    from tune_kd.config.experiment import load_config
    from tune_kd.data import tokenized
    from tune_kd.model.hardware import release_freed_memory
    from tune_kd.train.loop import generated_batch
    from tune_kd.train.run import build_run
    from tune_kd.train.step import MicroStep, backward_step, lr_at, optimizer_step

    cfg = load_config(raw=tune_kd_raw(world, spec, arm))
    run = build_run(cfg)
    if arm == "tune_kd_cached" and getattr(run.teacher, "cache", None) is None:
        raise SystemExit("tune_kd_cached: build_run did not open the teacher cache")
    train_cfg = cfg.train
    batches = tokenized.epoch_batches(run.train_data, train_cfg.batch_size, train_cfg.seed, 0)
    loader = torch.utils.data.DataLoader(tokenized.BatchList(run.train_data, batches, run.pad_id), batch_size=None,
                                         num_workers=train_cfg.num_workers)
    counts_of = run.train_data.target_counts
    on_policy = arm == "tune_kd_on_policy"
    stamps, counts, first = [], [], {}
    for micro, batch in enumerate(loader):
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(micro, len(batches), train_cfg.learning_rate, train_cfg.warmup_iters)
        step = MicroStep(int(counts_of[batch["indices"]].sum()), train_cfg.temperature, on_policy=on_policy)
        if micro == 0 and not on_policy:
            first["digest"] = batch_digest(batch["input_ids"], batch["labels"])
        if on_policy:
            batch, step = generated_batch(run, batch, step, 0, micro)
        parts = backward_step(run, batch, step)
        optimizer_step(run.student, run.optimizer, run.scaler, train_cfg.grad_clip)
        if run.device.type == "cpu":
            release_freed_memory()
        if micro == 0:
            first["loss"] = parts.loss.item()
        stamps.append(time.perf_counter())
        assistant = int((batch["labels"][:, 1:] != -100).sum())
        counts.append({"assistant_tokens": assistant, "tokens": batch["num_tokens"], "samples": len(batch["labels"])})
    return {**timed_window(stamps, counts, warmup), "first_loss": first["loss"], "digest": first.get("digest"),
            "reply_tokens_mean": counts[-1]["assistant_tokens"] / counts[-1]["samples"]}


# ----------------------------------------------------------------------------------------------
# The TRL arms
# ----------------------------------------------------------------------------------------------

def trl_models_and_optimizer(world: Path, spec: dict, steps: int):
    """Student and teacher loaded as tune_kd loads them (fp32), and the optimizer and schedule
    tune_kd's run builds on this device, for TRL's `optimizers=`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(str(world / "student"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(world / "teacher"), dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student.to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec["lr"], weight_decay=0.0, fused=device == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: seed_cosine(s, steps))
    return student, teacher, AutoTokenizer.from_pretrained(str(world / "student")), (optimizer, schedule)


def trl_common(out_dir: str, spec: dict, steps: int) -> dict:
    """TrainingArguments both TRL arms share: the matched settings and the defaults turned off."""
    return {"output_dir": out_dir, "per_device_train_batch_size": spec["batch"], "gradient_accumulation_steps": 1,
            "max_steps": steps, "learning_rate": spec["lr"], "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0,
            "bf16": False, "fp16": False, "gradient_checkpointing": False, "report_to": "none", "save_strategy": "no"}


class StepClock:
    """A TrainerCallback-shaped recorder: when each optimizer step ended."""

    def __init__(self):
        self.stamps = []

    def on_step_end(self, *_, **__):
        self.stamps.append(time.perf_counter())


def trl_gkd_arm(world: Path, spec: dict, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = json.loads((world / "rows.json").read_text())
    pad_id = json.loads((world / "spec.json").read_text())["pad_id"]
    steps = len(rows) // spec["batch"]
    labels = [[t if m else -100 for t, m in zip(r["ids"], r["mask"])] for r in rows]
    data = Dataset.from_dict({"input_ids": [r["ids"] for r in rows], "attention_mask": [[1] * len(r["ids"]) for r in rows],
                              "labels": labels})
    counts, first = [], {}

    def collate(features):
        """Right padding to the batch's longest row, as tune_kd's collate pads (labels -100 on pads)."""
        width = max(len(f["input_ids"]) for f in features)
        pad = lambda key, value: torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])  # noqa: E731
        batch = {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
                 "labels": pad("labels", -100)}
        if not counts:
            first["digest"] = batch_digest(batch["input_ids"], batch["labels"])
        counts.append({"assistant_tokens": int((batch["labels"][:, 1:] != -100).sum()),
                       "tokens": int(batch["attention_mask"].sum()), "samples": len(features)})
        return batch

    class Recording(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            first.setdefault("loss", float((loss[0] if return_outputs else loss).detach()))
            return loss

    student, teacher, tokenizer, optimizers = trl_models_and_optimizer(world, spec, steps)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="vs-trl-gkd-") as out:
        args = GKDConfig(**trl_common(out, spec, steps), lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
                         train_sampling_strategy="sequential")   # tune_kd's batch order, already shuffled
        trainer = Recording(model=student, teacher_model=teacher, args=args, train_dataset=data,
                            data_collator=collate, processing_class=tokenizer, optimizers=optimizers,
                            callbacks=[type("Clock", (TrainerCallback,), {"on_step_end": clock.on_step_end})()])
        trainer.train()
    return {**timed_window(clock.stamps, counts[:len(clock.stamps)], warmup), "first_loss": first["loss"],
            "digest": first["digest"]}


def trl_prompts(rows: list[dict], tokenizer) -> tuple[list, str]:
    """The prompts as TRL's DistillationTrainer takes them, token for token tune_kd's: the chat
    (every turn before the last reply), when its template renders them so; else their text."""
    chats = [r["messages"][:-1] for r in rows]
    ids = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    if all(list(a) == r["prompt"] for a, r in zip(ids, rows)):
        return chats, "identical (TRL renders the chats with the template)"
    texts = [tokenizer.decode(r["prompt"]) for r in rows]
    same = all(tokenizer(t)["input_ids"] == r["prompt"] for t, r in zip(texts, rows))
    return texts, "identical (TRL tokenizes the prompts' text)" if same else "DIFFERENT (TRL retokenizes the text)"


def trl_on_policy_arm(world: Path, spec: dict, warmup: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    rows = json.loads((world / "rows.json").read_text())
    steps = len(rows) // spec["batch"]
    student, teacher, tokenizer, optimizers = trl_models_and_optimizer(world, spec, steps)
    prompts, prompts_match = trl_prompts(rows, tokenizer)
    counts, first = [], {}

    class Recording(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            first.setdefault("loss", float((loss[0] if return_outputs else loss).detach()))
            prompt, reply = int(inputs["prompt_mask"].sum()), int(inputs["completion_mask"].sum())
            counts.append({"assistant_tokens": reply, "tokens": prompt + reply, "samples": len(inputs["prompt_ids"])})
            return loss

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="vs-trl-onp-") as out:
        args = DistillationConfig(**trl_common(out, spec, steps), beta=0.0, temperature=1.0, top_k=0, top_p=1.0,
                                  max_completion_length=spec["max_new_tokens"], shuffle_dataset=False)
        trainer = Recording(model=student, teacher_model=teacher, args=args,
                            train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                            optimizers=optimizers,
                            callbacks=[type("Clock", (TrainerCallback,), {"on_step_end": clock.on_step_end})()])
        trainer.train()
    return {**timed_window(clock.stamps, counts[:len(clock.stamps)], warmup), "first_loss": first["loss"],
            "prompts": prompts_match, "reply_tokens_mean": counts[-1]["assistant_tokens"] / counts[-1]["samples"]}


ARMS = {"trl_gkd": trl_gkd_arm, "trl_on_policy": trl_on_policy_arm,
        **{name: lambda world, spec, warmup, name=name: tune_kd_arm(world, spec, name, warmup)
           for name in ("tune_kd_live", "tune_kd_cached", "tune_kd_on_policy")}}


def run_step(step: str, world: Path, options: dict) -> dict:
    """One step of the bench in this process: 'world', 'prepare' or an arm; returns its figures."""
    pss = PeakPss()
    if step == "world":
        result = build_world(world, options["vocab"], options["smoke"], options["batches"])
    elif step == "prepare":
        result = prepare(world, json.loads((world / "spec.json").read_text()))
    else:
        result = ARMS[step](world, json.loads((world / "spec.json").read_text()), options["warmup"])
    return {**result, **memory_figures(pss)}


# ----------------------------------------------------------------------------------------------
# The driver: each step in a child process, then the table and the ratio lines
# ----------------------------------------------------------------------------------------------

def child_main(step: str, world: Path, options: dict, result: Path, log: Path) -> None:
    """In the child: output to the log file, the step's figures to `result` as JSON."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    result.write_text(json.dumps(run_step(step, world, options)))


def run_child(step: str, world: Path, options: dict) -> dict:
    """Run a step in a child: a fresh interpreter, or with --smoke a fork of this one (which imported
    everything once: seconds instead of an import per arm). Exits with one line when it fails."""
    result, log = world / f"{step}.result.json", world / f"{step}.log"
    result.unlink(missing_ok=True)
    if options["smoke"]:
        import multiprocessing

        child = multiprocessing.get_context("fork").Process(target=child_main, args=(step, world, options, result, log))
        child.start()
        child.join()
        code = child.exitcode
    else:
        code = subprocess.run([sys.executable, __file__, "--child", step, "--world", str(world),
                               "--options", json.dumps(options)], env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
                              ).returncode
    if code != 0 or not result.is_file():
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"vs_trl: {step} at V={options['vocab']} failed (exit {code}); its log: {log}")
    return json.loads(result.read_text())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_table(results: dict) -> None:
    head = (f"{'arm':<18} {'V':>7} {'steps':>5} {'s/step':>7} {'asst tok/s':>10} {'all tok/s':>10} {'samples/s':>9} "
            f"{'RSS GiB':>8} {'PSS GiB':>8} {'first loss':>11}")
    print(head)
    print("-" * len(head))
    for vocab, arms in results.items():
        for name, r in arms.items():
            cuda = f" (CUDA {gib(r['cuda_peak'])})" if "cuda_peak" in r else ""
            print(f"{name:<18} {vocab:>7} {r['steps']:>5} {r['seconds'] / r['steps']:>7.2f} "
                  f"{r['assistant_tokens_per_s']:>10.1f} {r['tokens_per_s']:>10.1f} {r['samples_per_s']:>9.2f} "
                  f"{gib(r['peak_rss']):>8} {gib(r['peak_pss']):>8} {r['first_loss']:>11.6f}{cuda}")


def check_same_objective(vocab: int, arms: dict) -> None:
    """The off-policy arms saw the same first batch and agree on its loss, or the bench stops."""
    trl = arms["trl_gkd"]
    for name in ("tune_kd_live", "tune_kd_cached"):
        ours = arms[name]
        if ours["digest"] != trl["digest"]:
            raise SystemExit(f"vs_trl: at V={vocab} {name}'s first batch differs from TRL GKD's "
                             f"({ours['digest']} vs {trl['digest']}): not identical inputs")
        gap = abs(ours["first_loss"] - trl["first_loss"]) / max(abs(trl["first_loss"]), 1e-12)
        if gap > LOSS_TOLERANCE:
            raise SystemExit(f"vs_trl: first-step loss at V={vocab}: {name} {ours['first_loss']:.8g} vs TRL GKD "
                             f"{trl['first_loss']:.8g} ({gap:.2e} relative > {LOSS_TOLERANCE:g}): not the same objective")


def bench_vocab(vocab: int, args, root: Path) -> dict:
    world = root / f"v{vocab}"
    world.mkdir()
    options = {"vocab": vocab, "smoke": args.smoke, "batches": args.warmup + args.steps, "warmup": args.warmup}
    spec = run_child("world", world, options)
    (world / "spec.json").write_text(json.dumps(spec))
    prepared = run_child("prepare", world, options)
    spec.update(pad_id=prepared["pad_id"])
    (world / "spec.json").write_text(json.dumps(spec))
    if not prepared["schedule_ok"]:
        raise SystemExit("vs_trl: the bench's copy of tune_kd's learning-rate schedule no longer matches lr_at")
    sizes = spec["sizes"]
    print(f"V={vocab}: teacher {sizes['teacher'] / 1e6:.2f}M params {tuple(spec['teacher'])}, student "
          f"{sizes['student'] / 1e6:.2f}M {tuple(spec['student'])} (hidden, layers, heads, kv heads, MLP), tied "
          f"embeddings; batch {spec['batch']}, {prepared['batches']} steps ({args.warmup} warm-up), max_seq_len "
          f"{spec['max_seq_len']}, on-policy max_new_tokens {spec['max_new_tokens']}; teacher cache: "
          f"{prepared['cache_layout']}, {prepared['cache'] / 2**20:.0f} MiB, built before the arms", flush=True)
    arms = {}
    for name in (*OFF_POLICY, *ON_POLICY):
        arms[name] = run_child(name, world, options)
        r = arms[name]
        print(f"  {name}: {r['seconds'] / r['steps']:.2f} s/step, {r['tokens_per_s']:.0f} tokens/s, "
              f"peak RSS {gib(r['peak_rss'])} GiB, first loss {r['first_loss']:.6f}", flush=True)
    check_same_objective(vocab, arms)
    prompts = arms["trl_on_policy"]["prompts"]
    print(f"  on-policy prompts: {prompts}; mean reply tokens (last step): tune_kd "
          f"{arms['tune_kd_on_policy']['reply_tokens_mean']:.1f}, TRL {arms['trl_on_policy']['reply_tokens_mean']:.1f}")
    return arms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models and data, V=6400 only, a few steps")
    p.add_argument("--vocab", default="both", choices=["6400", "151936", "both"])
    p.add_argument("--steps", type=int, help="timed optimizer steps per arm (default 6; --smoke 3)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default 2; --smoke 1)")
    p.add_argument("--keep", help="build the worlds in this folder and keep them (default: a temporary one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--world", help=argparse.SUPPRESS)
    p.add_argument("--options", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:   # one step, in the process the driver started for it
        options = json.loads(args.options)
        child_main(args.child, Path(args.world), options, Path(args.world) / f"{args.child}.result.json",
                   Path(args.world) / f"{args.child}.log")
        return 0
    args.steps = args.steps or (3 if args.smoke else 6)
    args.warmup = args.warmup or (1 if args.smoke else 2)
    vocabs = [MINIMIND_VOCAB] if args.smoke or args.vocab == "6400" else \
        [QWEN_ROWS] if args.vocab == "151936" else [QWEN_ROWS, MINIMIND_VOCAB]
    if not args.smoke and not SHARED.is_dir():
        raise SystemExit(f"vs_trl: {SHARED} is missing (the real tokenizers); --smoke builds its own")
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    if args.smoke:   # imported once here; each forked step inherits them
        import datasets, torch, transformers, trl  # noqa: E401,F401
        from trl.experimental import gkd  # noqa: F401
        import tune_kd.train.loop  # noqa: F401
    import torch
    started = time.perf_counter()
    print(f"vs_trl: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
    random.seed(0)
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        results = {vocab: bench_vocab(vocab, args, root) for vocab in vocabs}
    print()
    print_table(results)
    print(f"first-step losses equal within {LOSS_TOLERANCE:g} relative (tune_kd live and cached vs TRL GKD, "
          f"same first batch): passed")
    print("TRL defaults turned off for the comparison: gradient_checkpointing, bf16, report_to, checkpoint saving; "
          "TRL given tune_kd's AdamW and lr schedule through optimizers=")
    if args.smoke:
        print("--smoke: the arms are forks of one process, so their memory figures are not per arm")
    for vocab in vocabs:
        arms = results[vocab]
        trl = arms["trl_gkd"]["tokens_per_s"]
        print(f"tune_kd live/TRL GKD tokens/s at V={vocab}: {arms['tune_kd_live']['tokens_per_s'] / trl:.2f}")
        print(f"tune_kd cached/TRL GKD tokens/s at V={vocab}: {arms['tune_kd_cached']['tokens_per_s'] / trl:.2f}")
    for vocab in vocabs:
        arms = results[vocab]
        print(f"tune_kd/TRL GKD peak memory at V={vocab}: "
              f"{arms['tune_kd_live']['peak_rss'] / arms['trl_gkd']['peak_rss']:.2f}")
    on_policy = {v: results[v]["tune_kd_on_policy"]["samples_per_s"] / results[v]["trl_on_policy"]["samples_per_s"]
                 for v in vocabs}
    print(f"tune_kd/TRL on-policy samples/s: {min(on_policy.values()):.2f}")
    print(f"(peak memory: peak RSS, live arm; on-policy: the smaller of "
          f"{', '.join(f'V={v} {y:.2f}' for v, y in on_policy.items())}; {time.perf_counter() - started:.0f} s; "
          f"load average now {' '.join(open('/proc/loadavg').read().split()[:3])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
