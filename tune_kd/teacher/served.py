"""The served teacher: loaded once per node, scoring every trial's batches there.

Without it every trial process loads the teacher (4 trials packed on a GPU hold 4 copies of a 7B
teacher), and on-policy batches, which the teacher cache cannot answer (the student's samples are
new sequences), run the teacher alone at each trial's batch size. With `teacher_server: on` (or
`auto`, search/runner.py's rule in `decide`) the search starts a TeacherServer actor group on every node
before the first trial; a trial sends (token ids, scored positions) and gets back the teacher's
rows in the teacher cache's format (teacher_cache.StoredRows: top-k shifted logits, ids and the
tail's mass, or the full row where the vocabulary is small enough that top_k auto keeps it) plus
the exact log-prob of each scored position's next token (val_gen_ce's teacher CE).

The actor, its batching and its lifetime are the search's (search/teacher_actor.py); this module is
what a trial holds, and it never imports Ray.

A teacher too large for one process is served by an inference engine instead:
`teacher_server.url` names an OpenAI-compatible completions endpoint that returns prompt log-probs
(vLLM); teacher/http.py speaks it and RemoteTeacher gives both the same face.
"""

from __future__ import annotations

import concurrent.futures
import logging
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from tune_kd.config.checks import local_teacher_reason
from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.teacher.stored_rows import CachedTeacher, StoredRows

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Whether a search serves its teacher
# ----------------------------------------------------------------------------------------------

def uses_teacher(cfg: ExperimentConfig) -> bool:
    return cfg.teacher is not None and (cfg.train.alpha < 1.0 or "alpha" in cfg.parameters
                                        or on_policy_searched_or_set(cfg))


def on_policy_searched_or_set(cfg: ExperimentConfig) -> bool:
    return cfg.train.on_policy_fraction > 0 or "on_policy_fraction" in cfg.parameters


def decide(cfg: ExperimentConfig, trials_per_node: int, cache_used: bool) -> tuple[bool, str]:
    """(serve through Ray actors, why): `on` serves whenever a trial needs the teacher; `auto` when
    more than one trial runs per node and the teacher would run live in them (no teacher cache, or
    on-policy batches). A url is served by its engine, never by Ray (False here)."""
    s = cfg.teacher_server
    if s.url:
        return False, f"served by {s.url} (teacher_server.url)"
    if s.mode == "off":
        return False, "off (teacher_server: off)"
    if not uses_teacher(cfg):
        return False, "not used: training never runs the teacher (no teacher, or alpha 1)"
    local = local_teacher_reason(cfg)
    if local:
        return False, f"not used: {local}, so each trial loads it"
    if s.mode == "on":
        return True, "on (teacher_server: on)"
    if trials_per_node < 2:
        return False, "auto: not used, one trial at a time per node holds the only copy anyway"
    if cache_used and not on_policy_searched_or_set(cfg):
        return False, "auto: not used, the trials read the teacher cache (the teacher runs only for evaluation)"
    why = "on-policy batches need a live teacher" if cache_used else "the teacher runs live (no teacher cache)"
    return True, f"auto: {trials_per_node} trials per node share one teacher ({why})"


# ----------------------------------------------------------------------------------------------
# The actor
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# What a trial holds: a RemoteTeacher
# ----------------------------------------------------------------------------------------------

class RemoteTeacher:
    """A teacher that runs elsewhere and answers with cache-format rows: rows(input_ids, positions)
    -> (CachedTeacher over the scored positions, target log-probs); request() asks without waiting,
    so the loop runs the student's forward while the teacher works. `config` carries what the loop
    reads from a model's config (max_position_embeddings, for generation's position limit)."""

    teacher_rows: int
    cache_dir: str | None = None
    config: types.SimpleNamespace
    _background: concurrent.futures.ThreadPoolExecutor | None = None

    def score(self, input_ids: np.ndarray, positions: np.ndarray) -> tuple[StoredRows, np.ndarray]:
        raise NotImplementedError

    def request(self, input_ids: torch.Tensor, positions: torch.Tensor) -> "PendingRows":
        """Ask for the rows now, take them with .result() (score() in a background thread)."""
        if self._background is None:
            self._background = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        future = self._background.submit(self.score, input_ids.cpu().numpy(), positions.cpu().numpy())
        return PendingRows(future.result)

    def rows(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[CachedTeacher, torch.Tensor]:
        return self.request(input_ids, positions).result()


@dataclass
class PendingRows:
    """A teacher's answer on its way: result() waits for it -> (CachedTeacher, target log-probs)."""

    wait: object      # () -> (StoredRows, target log-probs as numpy)

    def result(self) -> tuple[CachedTeacher, torch.Tensor]:
        stored, target_logprobs = self.wait()
        return CachedTeacher.from_stored(stored), shared_tensor(target_logprobs)


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of an object-store array (read-only shared memory: torch warns, and the losses
    never write to the teacher's side)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class HttpRemote(RemoteTeacher):
    """teacher_server.url: an inference engine's completions endpoint (teacher/http.py)."""

    def __init__(self, cfg: ExperimentConfig, columns: int):
        from tune_kd.teacher.http import HttpTeacher

        s = cfg.teacher_server
        self.client = HttpTeacher(s.url, s.top_k, columns, s.model)
        self.client.check()
        self.teacher_rows = columns
        self.config = types.SimpleNamespace(max_position_embeddings=None)

    def score(self, input_ids: np.ndarray, positions: np.ndarray) -> tuple[StoredRows, np.ndarray]:
        sequences = [row[:int(np.flatnonzero(scored)[-1]) + 2] for row, scored in zip(input_ids, positions)
                     if scored.any()]
        scored = [np.flatnonzero(row) for row in positions if row.any()]
        return self.client.score(sequences, scored)


NOT_IN_A_SEARCH = ("teacher_server: on, but this run is not part of a search (the search starts the served "
                   "teacher): set teacher_server: off for a single run, which holds its own teacher")


def connect(cfg: ExperimentConfig, columns: int,
            node_teacher: Callable[[], RemoteTeacher] | None = None) -> RemoteTeacher | None:
    """The remote teacher this run reads, or None when it holds its own: the url's engine, or (with
    teacher_server.mode on, which the search sets after deciding) this node's served teacher, which
    only the search can reach: node_teacher() (search/teacher_actor.node_teacher) returns it."""
    if cfg.teacher_server.url:
        return HttpRemote(cfg, columns)
    if cfg.teacher_server.mode != "on":
        return None
    if node_teacher is None:
        raise UserError(NOT_IN_A_SEARCH)
    return node_teacher()


# ----------------------------------------------------------------------------------------------
# Starting and stopping (the search's driver)
# ----------------------------------------------------------------------------------------------


