"""An offline world with a realistic vocabulary, for benches: MiniMind's 6,400-id byte-level BPE
tokenizer, chat data made of installed packages' docstrings, a teacher trained on it and a student
distilled from it for a while. Everything is cached under results/docstring-world/ (git-ignored),
so a rerun skips what is already there:

    data/train.jsonl       user: a short question naming a function, class or method;
                           assistant: the first paragraphs of its docstring (the seed's chat format)
    teacher/               Llama, hidden 256 x 4 layers, plain SFT (alpha 1) with tune_kd's own loop
    distilled_student/     Llama, hidden 128 x 2 layers, distilled from the teacher (alpha 0, T 2)

The tokenizer is read from ../shared/tokenizers/minimind (tokenizer.json, tokenizer_config.json
with the chat template); nothing is downloaded. `python bench/docstring_world.py` builds it and
prints where each part is. `--smoke` builds a toy one in seconds in a scratch folder instead (two
modules' docstrings, a small BPE trained on them in place of MiniMind's, tiny models; tests/bench).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import random
import re
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tune_kd.config.experiment import load_config

WORLD_DIR = ROOT / "results" / "docstring-world"
TOKENIZER_DIR = ROOT.parent / "shared" / "tokenizers" / "minimind"
MAX_SEQ_LEN = 256
CORPUS_SEED = 7
MAX_ANSWER_CHARS = 400

# Standard-library and installed modules whose public functions, classes and methods have
# docstrings worth reading; a module missing on this machine is skipped.
MODULES = (
    "abc argparse ast asyncio base64 bisect calendar codecs collections concurrent.futures configparser contextlib copy "
    "csv dataclasses datetime decimal difflib email email.message enum filecmp fnmatch fractions functools getopt "
    "gettext glob gzip hashlib heapq html http.client imaplib inspect io ipaddress itertools json locale logging "
    "mailbox mimetypes multiprocessing numbers operator optparse os pathlib pickle platform plistlib poplib pprint "
    "pydoc queue random re sched secrets selectors shlex shutil signal smtplib socket sqlite3 ssl stat statistics "
    "string struct subprocess symtable sysconfig tabnanny tarfile tempfile textwrap threading timeit tokenize trace "
    "traceback types typing unittest urllib.parse uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree "
    "zipfile zlib numpy numpy.fft numpy.linalg numpy.ma numpy.random torch torch.distributions torch.fft torch.linalg "
    "torch.nn torch.nn.functional torch.optim torch.utils.data yaml optuna transformers.configuration_utils "
    "transformers.generation.utils transformers.modeling_utils transformers.tokenization_utils_base"
).split()

QUESTIONS = ("What does `{name}` do?", "Explain {name}.", "How is {name} used?", "Describe `{name}` briefly.",
             "What is {name} for?", "Tell me about {name} in {module}.")

TEACHER = {"arch": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "max_position_embeddings": MAX_SEQ_LEN}}
# The teacher sees TRAIN_CONVERSATIONS twice, the student them once: 200 + 100 steps, 33 minutes
# on a busy 2-core CPU (about 180 tokens/s), once: both are cached.
TRAIN_CONVERSATIONS = 1600
TEACHER_TRAIN = {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "warmup_iters": 20, "alpha": 1.0}
STUDENT = {"arch": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "max_position_embeddings": MAX_SEQ_LEN}}
STUDENT_TRAIN = {"epochs": 1, "batch_size": 16, "learning_rate": 3e-3, "warmup_iters": 20, "alpha": 0.0,
                 "temperature": 2.0}

log = logging.getLogger("docstring_world")


def answer_text(doc: str) -> str:
    """The docstring's leading paragraphs, up to MAX_ANSWER_CHARS (whole paragraphs where possible)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    kept = paragraphs[:1]
    for paragraph in paragraphs[1:]:
        if len("\n\n".join(kept + [paragraph])) > MAX_ANSWER_CHARS:
            break
        kept.append(paragraph)
    return "\n\n".join(kept)[:MAX_ANSWER_CHARS]


def documented_objects():
    """(qualified name, module name, docstring) of public functions, classes and their methods; each
    docstring once (inherited ones repeat it)."""
    seen = set()
    for module_name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except Exception:   # noqa: BLE001 - an optional package may be absent or broken here
            continue
        for name, obj in inspect.getmembers(module):
            if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            members = [(f"{module_name}.{name}", obj)]
            if inspect.isclass(obj):
                members += [(f"{module_name}.{name}.{m}", meth) for m, meth in inspect.getmembers(obj)
                            if not m.startswith("_") and inspect.isroutine(meth)]
            for qualified, member in members:
                doc = inspect.getdoc(member)
                if doc and len(doc) > 60 and doc not in seen:
                    seen.add(doc)
                    yield qualified, module_name, doc


def write_corpus(path: Path) -> int:
    """The chat JSONL: one conversation per documented object, in a seeded shuffled order."""
    rng = random.Random(CORPUS_SEED)
    records = []
    for qualified, module_name, doc in documented_objects():
        question = rng.choice(QUESTIONS).format(name=qualified, module=module_name)
        records.append({"conversations": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer_text(doc)}]})
    rng.shuffle(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.rename(path)
    return len(records)


def raw_config(**sections) -> dict:
    """A config for this world on CPU; sections override the defaults (one level deep)."""
    raw = {"name": "docstring-world", "tokenizer": str(TOKENIZER_DIR), "teacher": {"path": str(WORLD_DIR / "teacher")},
           "student": STUDENT,
           "data": {"path": str(WORLD_DIR / "data" / "train.jsonl"), "val_fraction": 0.05, "max_seq_len": MAX_SEQ_LEN,
                    "cache_dir": str(WORLD_DIR / "cache"), "max_train_examples": TRAIN_CONVERSATIONS},
           "train": {"dtype": "float32", "device": "cpu", "log_interval": 20, "seed": 0},
           "logging": {"tensorboard": False}, "teacher_cache": "off"}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


def _train_and_save(raw: dict, out: Path) -> None:
    from tune_kd.model.checkpoint import save_student
    from tune_kd.train.loop import train

    started = time.perf_counter()
    result = train(load_config(raw=raw))
    save_student(result.student, result.tokenizer, out)
    (out / "metrics.json").write_text(json.dumps({**result.metrics, "train_seconds": time.perf_counter() - started}))


def prepare() -> dict:
    """Build what is missing; returns the paths and the teacher's and student's final metrics."""
    data_path = WORLD_DIR / "data" / "train.jsonl"
    if not data_path.is_file():
        log.info("docstring world: %d conversations -> %s", write_corpus(data_path), data_path)
    teacher = WORLD_DIR / "teacher"
    if not (teacher / "metrics.json").is_file():
        log.info("docstring world: training the teacher (once; tens of CPU minutes)")
        _train_and_save(raw_config(teacher=None, student=TEACHER, train=TEACHER_TRAIN), teacher)
    student = WORLD_DIR / "distilled_student"
    if not (student / "metrics.json").is_file():
        log.info("docstring world: distilling a student from it")
        _train_and_save(raw_config(train=STUDENT_TRAIN), student)
    return {"config": raw_config(), "data": data_path, "teacher": teacher, "distilled_student": student,
            "teacher_metrics": json.loads((teacher / "metrics.json").read_text()),
            "student_metrics": json.loads((student / "metrics.json").read_text())}


def smoke() -> None:
    """--smoke: the same steps at toy size in a scratch folder, with a BPE trained on the corpus."""
    global WORLD_DIR, TOKENIZER_DIR, MODULES, TRAIN_CONVERSATIONS, TEACHER, STUDENT, TEACHER_TRAIN, STUDENT_TRAIN
    import _smoke

    WORLD_DIR, MODULES, TRAIN_CONVERSATIONS = _smoke.scratch("docstring-world") / "world", ("json", "textwrap"), 48
    TEACHER = {"arch": dict(_smoke.TEACHER_ARCH, max_position_embeddings=MAX_SEQ_LEN)}
    STUDENT = {"arch": dict(_smoke.TINY_ARCH, max_position_embeddings=MAX_SEQ_LEN)}
    TEACHER_TRAIN, STUDENT_TRAIN = dict(TEACHER_TRAIN, epochs=1), dict(STUDENT_TRAIN, epochs=1)
    data_path = WORLD_DIR / "data" / "train.jsonl"
    write_corpus(data_path)
    TOKENIZER_DIR = WORLD_DIR / "tokenizer"
    _smoke.bpe_tokenizer(TOKENIZER_DIR, _smoke.conversation_texts(data_path), vocab_size=1000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a toy world in seconds, in a scratch folder")
    if parser.parse_args().smoke:
        smoke()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    world = prepare()
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in world.items() if k != "config"}, indent=1))
