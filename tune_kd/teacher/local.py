"""The teacher in this process: the model run live, or its rows read from the teacher cache.

Both implement kd/teacher_rows.Teacher (as teacher/served.py's RemoteTeacher does for a teacher
that runs elsewhere); train/run.build_run picks one per run, and nothing downstream asks which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tune_kd.kd.scored import ScoredLM
from tune_kd.kd.scoring import teacher_forward
from tune_kd.kd.teacher_rows import Answer, LiveRows, Ready, Teacher
from tune_kd.teacher.cache_store import TeacherCache


@dataclass
class LiveAnswer:
    """The live teacher's answer: its forward runs when the answer is taken (after the student's
    forward: the same order as a step without a teacher protocol, and nothing runs for a batch
    whose answer is never taken)."""

    teacher: "LiveTeacher"
    input_ids: torch.Tensor
    positions: torch.Tensor

    def result(self):
        scored, features = teacher_forward(self.teacher.scored, self.input_ids, self.positions, self.teacher.precision)
        return LiveRows(scored, self.teacher.columns), features


@dataclass
class LiveTeacher:
    """The teacher model in this process (eval mode, no grad), on the scored positions only (a
    ScoredLM, with the layers feature distillation reads); its logits are made a chunk at a time,
    the first `columns` kept (build.check_vocab)."""

    scored: ScoredLM
    precision: object                 # model/hardware.Precision: the device and autocast it runs under
    columns: int | None = None
    forward_in_step = True
    same_tokens = True

    @property
    def lm(self) -> torch.nn.Module:
        return self.scored.lm

    @property
    def config(self):
        return self.scored.lm.config

    def ask(self, batch: dict, positions: torch.Tensor, from_data: bool = False) -> Answer:
        return LiveAnswer(self, batch["input_ids"].to(positions.device, non_blocking=True), positions)

    def describe(self) -> str:
        return f"teacher {sum(p.numel() for p in self.lm.parameters()) / 1e6:.2f}M"


@dataclass
class CacheReader:
    """The training split's batches answered from the teacher cache, every other batch (generated,
    validation) by `fallback`, the live or served teacher that built it."""

    cache: TeacherCache
    fallback: Teacher
    forward_in_step = False
    same_tokens = True

    @property
    def lm(self) -> torch.nn.Module | None:
        return self.fallback.lm

    @property
    def columns(self) -> int | None:
        return self.fallback.columns

    @property
    def config(self):
        return self.fallback.config

    def ask(self, batch: dict, positions: torch.Tensor, from_data: bool = False) -> Answer:
        if not from_data:
            return self.fallback.ask(batch, positions)
        return Ready(self.cache.rows(batch["indices"]).to(positions.device, non_blocking=True))

    def describe(self) -> str:
        return f"{self.fallback.describe()}, its rows read from the teacher cache"
