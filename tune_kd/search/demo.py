"""The embedded default: a task, a tokenizer and a teacher, all built offline and cached.

`prepare()` writes, under `results/demo/` (each step skipped when its output is already there):

    data/train.jsonl, data/val.jsonl   digit-string conversations in the seed's chat JSONL format: the
                                       task's whole distribution (the teacher's data, and validation)
    data/student.jsonl                 the student's own, smaller SFT set (search_spaces/kd.yaml's data.path)
    tokenizer/                         a character-level Hugging Face tokenizer with a chat template
    student_tokenizer/                 a byte-level BPE of the same template, trained on the student's
                                       data: it packs digits into multi-digit tokens where the teacher's
                                       splits them (search_spaces/kd_cross_tokenizer.yaml's student)
    teacher/                           a small Llama trained on the task with tune_kd's own loop
                                       (alpha = 1: plain SFT), plus teacher.json with its accuracy

The task has checkable answers (reverse or sort a string of digits; some conversations are
multi-turn or carry a system prompt), so `val_acc`, exact match of every assistant turn, shows
what a student really learned. As in real use, the teacher knows more than the student's data: it
is trained on 16,000 conversations of the whole distribution, the student gets 3,000 in which long
strings (6 and 7 digits) are rare (STUDENT_LENGTH_WEIGHTS), and both are validated on the whole
distribution. `python -m tune_kd.demo` prepares it and prints the figures.
"""

from __future__ import annotations

import json
import logging
import random
import string
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_DIR = Path("results/demo")
TRAIN_CONVERSATIONS = 16000
VAL_CONVERSATIONS = 1000
DEMO_SEED = 2024
STUDENT_CONVERSATIONS = 3000
# the student's set draws strings of 3..7 digits with these weights: long strings 1/5 as often as in
# the task (uniform lengths), so the teacher has seen many more of them than the student's data holds
STUDENT_LENGTH_WEIGHTS = (1.0, 1.0, 1.0, 0.2, 0.2)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
ROLE_TOKENS = ["system", "user", "assistant"]
# ChatML-style; the same template every conversation of the demo is rendered with.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM_PROMPTS = ["Be exact.", "Digits only."]
TASKS = {  # name -> (question forms, answer function)
    "reverse": (["reverse {s}", "{s} reversed?"], lambda s: s[::-1]),
    "sort": (["sort {s}", "{s} sorted?"], lambda s: "".join(sorted(s))),
}

# The demo teacher: large enough to learn the task well in a few CPU minutes.
TEACHER_ARCH = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                "intermediate_size": 384, "max_position_embeddings": 128}
TEACHER_TRAIN = {"epochs": 4, "batch_size": 128, "learning_rate": 3e-3, "warmup_iters": 50,
                 "alpha": 1.0, "dtype": "float32", "log_interval": 50, "seed": 0}
MAX_SEQ_LEN = 128


def _question(rng: random.Random, length_weights: tuple[float, ...] | None = None) -> tuple[str, str]:
    """One question (reverse or sort a string of 3-7 digits, lengths uniform or by length_weights)
    and its exact answer."""
    forms, answer = TASKS[rng.choice(sorted(TASKS))]
    length = rng.randint(3, 7) if length_weights is None else rng.choices(range(3, 8), weights=length_weights)[0]
    digits = "".join(rng.choice(string.digits) for _ in range(length))
    return rng.choice(forms).format(s=digits), answer(digits)


def make_conversations(count: int, seed: int, length_weights: tuple[float, ...] | None = None) -> list[dict]:
    """`count` deterministic conversations: 1-2 question/answer turns, sometimes a system prompt;
    digit strings of uniform length 3-7 unless length_weights (one per length) skews them."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        turns = []
        if rng.random() < 0.15:
            turns.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(2 if rng.random() < 0.15 else 1):
            question, answer = _question(rng, length_weights)
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"conversations": turns})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def build_tokenizer(out_dir: Path):
    """A character-level fast tokenizer (printable ASCII + newline, one token per role name) with a
    ChatML chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    core.add_tokens(ROLE_TOKENS)  # one token per role header keeps the chat wrapping short
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def write_inputs(root: Path = DEMO_DIR) -> None:
    """The demo's data and tokenizer (prepare's first steps, without training the teacher)."""
    write_jsonl(root / "data" / "train.jsonl", make_conversations(TRAIN_CONVERSATIONS, DEMO_SEED))
    write_jsonl(root / "data" / "val.jsonl", make_conversations(VAL_CONVERSATIONS, DEMO_SEED + 1))
    write_student_set(root)
    build_tokenizer(root / "tokenizer")
    build_student_tokenizer(root)


def write_student_set(root: Path = DEMO_DIR) -> None:
    """data/student.jsonl: the student's smaller SFT set, long strings rare (STUDENT_LENGTH_WEIGHTS)."""
    write_jsonl(root / "data" / "student.jsonl",
                make_conversations(STUDENT_CONVERSATIONS, DEMO_SEED + 2, STUDENT_LENGTH_WEIGHTS))


STUDENT_BPE_VOCAB = 400   # the student tokenizer's size: room for the data's frequent multi-digit pieces


def build_student_tokenizer(root: Path = DEMO_DIR):
    """A byte-level BPE (STUDENT_BPE_VOCAB ids) trained on data/student.jsonl's text, with the demo's
    special tokens and chat template: another tokenizer for the same conversations, as a student
    from another model family brings (it packs digit runs; the teacher's splits every digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [turn["content"] for line in (root / "data" / "student.jsonl").read_text().splitlines()
             for turn in json.loads(line)["conversations"]]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=STUDENT_BPE_VOCAB, special_tokens=SPECIAL_TOKENS + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(root / "student_tokenizer"))
    return tokenizer


def demo_config_dict(root: Path = DEMO_DIR) -> dict:
    """The raw config (as a YAML would give it) that trains the demo teacher."""
    return {
        "name": "demo-teacher",
        "tokenizer": str(root / "tokenizer"),
        "teacher": None,
        "student": {"arch": TEACHER_ARCH},
        "data": {"path": str(root / "data/train.jsonl"), "val_path": str(root / "data/val.jsonl"),
                 "max_seq_len": MAX_SEQ_LEN, "cache_dir": str(root.parent / "cache")},
        "train": dict(TEACHER_TRAIN, device="cpu"),
        "logging": {"tensorboard": False},
    }


def is_built(root: Path = DEMO_DIR) -> bool:
    """The demo's teacher (its last product) is on disk."""
    return (Path(root) / "teacher" / "teacher.json").is_file()


def prepare(root: Path = DEMO_DIR, force: bool = False) -> dict:
    """Build the demo under `root` unless its teacher is already cached; return the teacher's figures."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    from tune_kd.data.ingest import file_lock

    # concurrent callers (DDP ranks, trials, another search) wait for one build, saying whose
    with file_lock(root / ".prepare.lock", building=f"the embedded demo in {root} (data, tokenizer, teacher)"):
        return _prepare_locked(root, force)


def _prepare_locked(root: Path, force: bool) -> dict:
    from tune_kd.config.experiment import load_config
    from tune_kd.model.checkpoint import save_student
    from tune_kd.train.loop import train

    teacher_dir = root / "teacher"
    if not force and is_built(root):
        if not (root / "data" / "student.jsonl").is_file():   # a demo built before the student had its own set
            write_student_set(root)
        if not (root / "student_tokenizer" / "tokenizer.json").is_file():   # ... or its own tokenizer
            build_student_tokenizer(root)
        return json.loads((teacher_dir / "teacher.json").read_text())
    started = time.perf_counter()
    write_inputs(root)
    log.info("demo: training the teacher (%s) on %d conversations", TEACHER_ARCH, TRAIN_CONVERSATIONS)
    cfg = load_config(raw=demo_config_dict(root))
    result = train(cfg)
    save_student(result.student, result.tokenizer, teacher_dir)
    figures = {"val_acc": result.metrics["val_acc"], "val_ce": result.metrics["val_ce"],
               "prepare_seconds": round(time.perf_counter() - started, 1),
               "arch": TEACHER_ARCH, "train": TEACHER_TRAIN,
               "conversations": {"train": TRAIN_CONVERSATIONS, "val": VAL_CONVERSATIONS, "student": STUDENT_CONVERSATIONS}}
    (teacher_dir / "teacher.json").write_text(json.dumps(figures, indent=1))
    log.info("demo: teacher val_acc %.3f, prepared in %.0f s", figures["val_acc"], figures["prepare_seconds"])
    return figures
