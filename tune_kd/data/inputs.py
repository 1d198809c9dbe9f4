"""A run's tokenizers and its train and validation splits.

Teacher and student usually share one tokenizer (the top-level `tokenizer:`, else the teacher's
directory, else the student's): then the data is tokenized once (tokenized.py). A student may bring
its own: `student.tokenizer` (a student built from `arch` names one), or a `student.path` directory
that ships one. When its vocabulary differs from the teacher's, the run distils across tokenizers:
each conversation is rendered and tokenized by both, the replies aligned by bytes, and the student's
splits carry the teacher's side (data/cross_tokens.py; tokenized.TokenizedData.teacher). Both chat
templates are checked before any work.
"""

from __future__ import annotations

import filecmp
import logging
from pathlib import Path
from typing import NamedTuple

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig, ModelSpec
from tune_kd.data import chat_template, cross_tokens
from tune_kd.data.tokenized import fixed_subset, load_tokenizer, tokenize_cached, train_val_split

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_dir(teacher: ModelSpec | None, student: ModelSpec, explicit: str | None) -> str:
    """The teacher's tokenizer (the shared one when the student brings none): explicit, else the
    teacher's directory, else the student's."""
    for candidate in (explicit, teacher.tokenizer if teacher else None, teacher.path if teacher else None,
                      student.tokenizer, student.path):
        if candidate is not None:
            return candidate
    raise UserError("tokenizer: required when neither teacher nor student is a model directory "
                    "(set tokenizer: to a local HF tokenizer dir)")


def student_tokenizer_dir(cfg: ExperimentConfig) -> str:
    """The student's tokenizer: student.tokenizer, else a student.path that ships one, else the teacher's."""
    spec = cfg.student
    if spec.tokenizer is not None:
        return spec.tokenizer
    if spec.path is not None and any((Path(spec.path) / f).is_file() for f in TOKENIZER_FILES):
        return spec.path
    return tokenizer_dir(cfg.teacher, spec, cfg.tokenizer)


class Tokenizers(NamedTuple):
    """A run's tokenizers: the student's, and the teacher's when it differs (None: one shared)."""

    student: object
    teacher: object | None
    student_dir: str
    teacher_dir: str

    @property
    def across(self) -> bool:
        return self.teacher is not None

    @property
    def of_teacher(self):
        return self.teacher if self.teacher is not None else self.student


def same_vocabulary(one, one_dir: str, other_dir: str) -> bool:
    """Whether the tokenizer in other_dir has one's vocabulary (byte-equal tokenizer.json files are
    compared without loading a second copy: ~160 MB at Qwen2.5's)."""
    if Path(one_dir) == Path(other_dir):
        return True
    files = [Path(d) / "tokenizer.json" for d in (one_dir, other_dir)]
    if all(f.is_file() for f in files) and filecmp.cmp(*files, shallow=False):
        return True
    return load_tokenizer(other_dir).get_vocab() == one.get_vocab()


def check_chat_template(tokenizer, tok_dir: str, system_turns: str) -> None:
    """The chat template must be one tune_kd can locate assistant tokens in (chat_template.ChatRenderer's
    probes): checked before any work, the error naming the tokenizer directory."""
    try:
        chat_template.ChatRenderer(tokenizer, system_turns)
    except UserError as exc:
        raise UserError(f"{tok_dir}: {exc}") from None


def run_tokenizers(cfg: ExperimentConfig) -> Tokenizers:
    """The run's tokenizers, their chat templates checked before any work. A teacher.path that ships
    a tokenizer other than the one the teacher is given (the top-level tokenizer:) is refused."""
    teacher_dir = tokenizer_dir(cfg.teacher, cfg.student, cfg.tokenizer)
    teacher = load_tokenizer(teacher_dir)
    spec = cfg.teacher
    if spec is not None and spec.path is not None and any((Path(spec.path) / f).is_file() for f in TOKENIZER_FILES) \
            and not same_vocabulary(teacher, teacher_dir, spec.path):
        raise UserError(f"teacher.path: {spec.path} ships a tokenizer different from {teacher_dir}, which the teacher "
                        "is given (tokenizer:); a teacher reads its own: drop tokenizer:, or point it at the teacher's")
    student_dir = student_tokenizer_dir(cfg)
    if cfg.teacher is None or same_vocabulary(teacher, teacher_dir, student_dir):
        check_chat_template(teacher, teacher_dir, cfg.data.system_turns)
        return Tokenizers(teacher, None, teacher_dir, teacher_dir)
    student = load_tokenizer(student_dir)
    cross_tokens.check_pair(student, teacher, cfg.data.system_turns)
    log.info("tokenizers: the student's (%s, %d ids) differs from the teacher's (%s, %d ids): distilling across "
             "tokenizers, replies aligned by bytes (data/cross_tokens.py)", student_dir, len(student), teacher_dir,
             len(teacher))
    return Tokenizers(student, teacher, student_dir, teacher_dir)


def load_data(cfg: ExperimentConfig, tokenizers: Tokenizers | None = None, verify: bool = False):
    """(the student's tokenizer, train split, val split), tokenized through the on-disk caches; the
    splits are views into their memory-mapped arrays. Across tokenizers the splits carry the teacher's
    side and both sides' aligned groups. verify: as tokenize_cached takes it."""
    tokenizers = tokenizers or run_tokenizers(cfg)
    d = cfg.data

    def tokenize(path: str):
        if not tokenizers.across:
            return tokenize_cached(path, tokenizers.student, d.max_seq_len, d.cache_dir, d.format, d.workers,
                                   d.system_turns, verify)
        return cross_tokens.tokenize_pair_cached(path, tokenizers.student, tokenizers.teacher, d.max_seq_len,
                                                 d.cache_dir, d.format, d.system_turns, verify).joined()

    train_data = tokenize(d.path)
    if d.val_path:
        val_data = tokenize(d.val_path)
    else:
        train_data, val_data = train_val_split(train_data, d.val_fraction)
    if d.max_train_examples is not None and d.max_train_examples < len(train_data):
        train_data = fixed_subset(train_data, d.max_train_examples)
    return tokenizers.student, train_data, val_data


def teacher_side(data):
    """The split as the teacher reads it: its own side across tokenizers, else the split itself."""
    return data.teacher if data.teacher is not None else data

