"""The served teacher: loaded once per node, scoring every trial's batches there.

Without it every trial process loads the teacher (4 trials packed on a GPU hold 4 copies of a 7B
teacher), and on-policy batches, which the teacher cache cannot answer (the student's samples are
new sequences), run the teacher alone at each trial's batch size. With `teacher_server: on` (or
`auto`, search/runner.py's rule in `decide`) the search starts a TeacherServer actor group on every node
before the first trial; a trial sends (token ids, scored positions) and gets back the teacher's
rows in the teacher cache's format (stored_rows.StoredRows: top-k shifted logits, ids and the
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
import dataclasses
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
from tune_kd.kd.teacher_rows import TeacherRows
from tune_kd.teacher.stored_rows import StoredRows

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Whether a search serves its teacher
# ----------------------------------------------------------------------------------------------

def uses_teacher(cfg: ExperimentConfig) -> bool:
    return cfg.teacher is not None and (cfg.train.alpha < 1.0 or "alpha" in cfg.parameters
                                        or on_policy_searched_or_set(cfg))


def on_policy_searched_or_set(cfg: ExperimentConfig) -> bool:
    return cfg.train.on_policy_fraction > 0 or "on_policy_fraction" in cfg.parameters


LOCAL_MEMORY_SHARE = 0.5    # a teacher per trial: the copies may take at most this share of the node's memory


@dataclass(frozen=True)
class TeacherCosts:
    """One training batch's teacher, priced where the trials run (search/teacher_choice.measure):
    the inputs of decide's cost rule. Seconds on the trials' own device and threads."""

    local_forward_s: float      # a trial's own teacher: its forward and output rows as the loss makes them
    served_one_s: float         # the server's answer for one batch: forward, rows compressed to the layout, copied
    served_pair_s: float        # the same for two trials' batches in one forward (what batching costs)
    student_s: float            # the rest of a trial's step: the student's forward, loss, backward, optimizer
    positions: int              # scored positions in the batch
    rows_bytes: int             # bytes of the served rows for the batch (positions x the layout's bytes)
    teacher_bytes: int          # one teacher copy's weights (a teacher per trial holds one each)
    memory_bytes: int           # the memory the node's trials share (GPU: the node's GPUs; CPU: available RAM)
    device: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Estimate:
    """Trial-steps per second on a node, each way of running the teacher (decide's figures)."""

    local: float
    served: float
    served_round_s: float       # the server's work for one request of each trial (batched as it batches)
    local_step_s: float
    served_step_s: float


def estimate(costs: TeacherCosts, local_trials: int, served_trials: int, shared_compute: bool) -> Estimate:
    """The node's throughput with a teacher per trial against one served teacher.

    Local: each trial runs its teacher itself, in parallel with the others: a step is student_s +
    local_forward_s. Served: one server answers every trial of the node, one request each per round;
    a batched round costs served_one_s plus (served_pair_s - served_one_s) per further trial (on a
    CPU the pair costs about twice one: batching saves nothing; on a GPU far less). The server is
    one queue, so a trial's step is never shorter than the round; where the server shares the
    trials' compute (a CPU node where it holds no CPUs of its own, or a GPU it shares with trials),
    its work is added to theirs rather than taken off: a step is at least student_s plus a trial's
    share of the round. On its own device only the round bounds it (the student runs meanwhile)."""
    local_step = costs.student_s + costs.local_forward_s
    n = max(1, served_trials)
    round_s = costs.served_one_s + (n - 1) * max(costs.served_pair_s - costs.served_one_s, 0.0)
    own_part = costs.student_s + round_s / n if shared_compute else costs.student_s
    served_step = max(own_part, round_s)
    return Estimate(local_trials / local_step, n / served_step, round_s, local_step, served_step)


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB"


def describe_estimate(costs: TeacherCosts, est: Estimate, local_trials: int, served_trials: int) -> str:
    """The costs behind the choice, for its log line."""
    return (f"estimated {est.local:.3g} trial-steps/s with a teacher in each of {local_trials} trials (a step "
            f"{est.local_step_s:.2f} s: teacher {costs.local_forward_s:.2f} s, student {costs.student_s:.2f} s; "
            f"{local_trials} copies of {_gb(costs.teacher_bytes)} in {_gb(costs.memory_bytes)}) against {est.served:.3g} "
            f"served to {served_trials} (a step {est.served_step_s:.2f} s; the server's round {est.served_round_s:.2f} s: "
            f"{costs.served_one_s:.2f} s per request with its rows, {_gb(costs.rows_bytes)} of rows for "
            f"{costs.positions:,} positions; 2 requests in one forward {costs.served_pair_s:.2f} s)")


def decide(cfg: ExperimentConfig, trials_per_node: int, cache_used: bool, costs: TeacherCosts | None = None,
           served_trials: int | None = None, shared_compute: bool = True) -> tuple[bool, str]:
    """(serve through Ray actors, why): `on` serves whenever a trial needs the teacher; `auto` when
    more than one trial runs per node, the teacher would run live in them (no teacher cache, or
    on-policy batches), and serving is cheaper (estimate(), from the measured costs) or a teacher
    in every trial would not fit the node's memory (LOCAL_MEMORY_SHARE). Without costs (asked
    before they are measured) auto answers whether it may serve. A url is served by its engine,
    never by Ray (False here). served_trials: trials per node when the server takes its share
    (default trials_per_node); shared_compute: as estimate() takes it."""
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
    if costs is None:
        return True, f"auto: {trials_per_node} trials per node may share one teacher ({why})"
    served_trials = served_trials or trials_per_node
    est = estimate(costs, trials_per_node, served_trials, shared_compute)
    figures = describe_estimate(costs, est, trials_per_node, served_trials)
    copies = trials_per_node * costs.teacher_bytes
    if copies > LOCAL_MEMORY_SHARE * costs.memory_bytes:
        return True, (f"auto: served, {trials_per_node} teacher copies ({_gb(copies)}) would take more than "
                      f"{100 * LOCAL_MEMORY_SHARE:.0f}% of the node's {_gb(costs.memory_bytes)} ({why}); {figures}")
    if est.served > est.local:
        return True, f"auto: served, one teacher for {served_trials} trials is faster ({why}); {figures}"
    return False, f"auto: not used, a teacher in each trial is faster ({why}); {figures}"


# ----------------------------------------------------------------------------------------------
# The actor
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# What a trial holds: a RemoteTeacher
# ----------------------------------------------------------------------------------------------

class RemoteTeacher:
    """A teacher that runs elsewhere (kd/teacher_rows.Teacher): ask() sends the batch at once and the
    answer's result() waits for it, so the step runs the student's forward while the teacher works;
    the rows come in the cache's layout with each target's exact log-prob. `config` carries what the
    loop reads from a model's config (max_position_embeddings, for generation's position limit);
    `columns`: the vocabulary columns the divergence compares (build.check_vocab, set by connect)."""

    teacher_rows: int
    cache_dir: str | None = None
    config: types.SimpleNamespace
    columns: int | None = None
    lm = None                          # the weights are not in this process
    forward_in_step = False
    same_tokens = True
    _background: concurrent.futures.ThreadPoolExecutor | None = None

    def score(self, input_ids: np.ndarray, positions: np.ndarray) -> tuple[StoredRows, np.ndarray]:
        raise NotImplementedError

    def request(self, input_ids: torch.Tensor, positions: torch.Tensor) -> "PendingRows":
        """Ask for the rows now, take them with .result() (score() in a background thread)."""
        if self._background is None:
            self._background = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        future = self._background.submit(self.score, input_ids.cpu().numpy(), positions.cpu().numpy())
        return PendingRows(future.result)

    def ask(self, batch: dict, positions: torch.Tensor, from_data: bool = False) -> "PendingRows":
        pending = self.request(batch["input_ids"], positions)
        pending.device = positions.device
        return pending

    def rows(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[TeacherRows, None]:
        return self.request(input_ids, positions).result()

    def describe(self) -> str:
        return f"teacher served ({type(self).__name__})"


@dataclass
class PendingRows:
    """A teacher's answer on its way (kd/teacher_rows.Answer): result() waits for it -> (TeacherRows
    with the target log-probs, on `device`; no features: a served teacher gives none)."""

    wait: object      # () -> (StoredRows, target log-probs as numpy)
    device: torch.device | None = None

    def result(self) -> tuple[TeacherRows, None]:
        stored, target_logprobs = self.wait()
        rows = stored.widened(shared_tensor(target_logprobs))
        return (rows if self.device is None else rows.to(self.device)), None


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


