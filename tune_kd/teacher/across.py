"""A teacher whose tokenizer differs from the student's: asked on its own tokens, answered in groups.

Each training example then carries both renderings (data/cross_tokens.py: the student's tokens, the
teacher's, and the groups that spell the same bytes of each reply). AcrossTokenizers wraps the
teacher in whatever form it runs (live, cached or served, on the teacher's tokens: nothing of those
changes) and turns its answer into kd/aligned.AlignedRows, which the divergences read group by
group. The teacher cache in this mode holds the teacher's rows at its own scored positions (the
training split's teacher side), in the cache's usual layout; the served teacher scores the teacher's
token ids as it would for any trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tune_kd.config.errors import UserError
from tune_kd.data.tokenized import tokenizer_fingerprint
from tune_kd.kd import cross_vocab
from tune_kd.kd.aligned import AlignedRows
from tune_kd.kd.cross_vocab import VocabMatch
from tune_kd.kd.scoring import scored_positions
from tune_kd.kd.teacher_rows import Answer, Teacher


log = logging.getLogger(__name__)

MATCH_FORMAT = 1     # bump when match_vocabularies' answer changes meaning

# what needs the student's own token sequences scored by the teacher, or one vocabulary: not across
# tokenizers (the student's samples are not re-tokenised for the teacher yet)
ONE_TOKENIZER_ONLY = {"train.on_policy_fraction": "on-policy batches", "train.seq_kd": "sequence-level KD",
                      "train.feature_weight": "feature distillation", "student.init": "a student started from the "
                      "teacher's weights"}


def check_settings(cfg, across: bool) -> None:
    """A UserError, before any work, for the first setting (set or searched) the run's tokenizers do
    not allow: across tokenizers what needs one (ONE_TOKENIZER_ONLY), on one tokenizer the losses
    that compare two vocabularies."""
    train = cfg.train
    searched = cfg.parameters.get("kd_loss", {}).get("values", []) if isinstance(cfg.parameters.get("kd_loss"), dict) \
        else []
    two = [name for name in [train.kd_loss, *searched] if name in cross_vocab.CROSS_VOCAB_LOSSES]
    if not across:
        if two and cfg.teacher is not None:
            raise UserError(f"train.kd_loss: {two[0]} compares two vocabularies, and teacher and student share one "
                            "tokenizer: use forward_kl, reverse_kl, jsd, skew_kl or tvd, or give the student its own "
                            "tokenizer (student.tokenizer)")
        return
    used = {"train.on_policy_fraction": train.on_policy_fraction > 0, "train.seq_kd": train.seq_kd,
            "train.feature_weight": train.feature_weight > 0, "student.init": cfg.student.init == "teacher"}
    for key, what in ONE_TOKENIZER_ONLY.items():
        if used[key] or key.removeprefix("train.") in cfg.parameters:
            raise UserError(f"{key}: {what} needs teacher and student on one tokenizer, and this student's differs "
                            f"from the teacher's (distilling across tokenizers): drop {key}, or give both one tokenizer")


def vocabularies(student_tokenizer, teacher_tokenizer, cache_dir: str | None) -> VocabMatch:
    """The two vocabularies' correspondence (cross_vocab.match_vocabularies: seconds at a 150k
    vocabulary), built once per tokenizer pair and kept under <cache_dir>/vocab_match/ (written whole
    or not at all), with the coverage audit's line logged when built."""
    key = hashlib.sha256(f"{MATCH_FORMAT}|{tokenizer_fingerprint(student_tokenizer)}|"
                         f"{tokenizer_fingerprint(teacher_tokenizer)}".encode()).hexdigest()[:24]
    path = Path(cache_dir or ".") / "vocab_match" / f"{key}.pt"
    if path.is_file():
        try:
            return VocabMatch(**torch.load(path, weights_only=True))
        except (OSError, RuntimeError, TypeError, ValueError):
            log.warning("vocab match %s unreadable: rebuilding it", path)
    match = cross_vocab.match_vocabularies(student_tokenizer, teacher_tokenizer)
    log.info("%s", cross_vocab.describe_audit(cross_vocab.coverage_audit(student_tokenizer, teacher_tokenizer, match)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(dataclasses.asdict(match), tmp)
    os.replace(tmp, path)
    return match


def scored_groups(labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(N,) the group of each scored position (scoring.scored_positions' order): labels (B, T) with
    -100 off assistant tokens, groups (B, T) each token's group (-1: none); the logit at t predicts t + 1."""
    return groups[:, 1:][labels[:, 1:] != -100]


@dataclass
class AlignedAnswer:
    """The inner teacher's answer on the teacher's tokens, regrouped against the student's rows."""

    answer: Answer
    student_targets: torch.Tensor
    student_groups: torch.Tensor
    teacher_targets: torch.Tensor
    teacher_groups: torch.Tensor
    vocab: VocabMatch

    def result(self):
        rows, _ = self.answer.result()
        return AlignedRows(rows, self.student_targets, self.student_groups, self.teacher_targets,
                           self.teacher_groups, self.vocab), None


@dataclass
class AcrossTokenizers:
    """kd/teacher_rows.Teacher for a teacher on another tokenizer. `inner`: the teacher as it runs on
    its own tokens; `vocab`: the two vocabularies' correspondence (kd/cross_vocab.match_vocabularies).
    Batches carry teacher_input_ids / teacher_labels and both sides' groups (tokenized.collate)."""

    inner: Teacher
    vocab: VocabMatch
    columns = None                 # the student's logits are compared whole, through the groups
    same_tokens = False            # it cannot score the student's own token sequences (generated replies)

    @property
    def lm(self) -> torch.nn.Module | None:
        return self.inner.lm

    @property
    def config(self):
        return self.inner.config

    @property
    def forward_in_step(self) -> bool:
        return self.inner.forward_in_step

    def ask(self, batch: dict, positions: torch.Tensor, from_data: bool = False) -> AlignedAnswer:
        device = positions.device
        student_labels = batch["labels"].to(device, non_blocking=True)
        teacher_labels = batch["teacher_labels"].to(device, non_blocking=True)
        teacher_positions, teacher_targets = scored_positions(teacher_labels)
        teacher_batch = {"input_ids": batch["teacher_input_ids"], "labels": batch["teacher_labels"],
                         "indices": batch.get("indices")}
        answer = self.inner.ask(teacher_batch, teacher_positions, from_data)
        return AlignedAnswer(answer, scored_positions(student_labels)[1],
                             scored_groups(student_labels, batch["student_groups"].to(device)),
                             teacher_targets, scored_groups(teacher_labels, batch["teacher_groups"].to(device)),
                             self.vocab)

    def describe(self) -> str:
        return f"{self.inner.describe()}, on its own tokenizer (aligned by bytes)"
