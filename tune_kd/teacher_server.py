"""The served teacher: loaded once per node, scoring every trial's batches there.

Without it every trial process loads the teacher (4 trials packed on a GPU hold 4 copies of a 7B
teacher), and on-policy batches, which the teacher cache cannot answer (the student's samples are
new sequences), run the teacher alone at each trial's batch size. With `teacher_server: on` (or
`auto`, search.py's rule in `decide`) the search starts a TeacherServer actor group on every node
before the first trial; a trial sends (token ids, scored positions) and gets back the teacher's
rows in the teacher cache's format (teacher_cache.StoredRows: top-k shifted logits, ids and the
tail's mass, or the full row where the vocabulary is small enough that top_k auto keeps it) plus
the exact log-prob of each scored position's next token (val_gen_ce's teacher CE).

Requests from concurrent trials are batched: the actor queues them and runs one teacher forward
over as many as arrive within teacher_server.max_wait_ms of the first, up to
teacher_server.max_batch_tokens tokens, while the next requests queue during that forward. The
answer is numpy arrays returned from the actor task, so they travel through Ray's shared-memory
object store and the trial maps them without a copy (ray.get of a numpy array is zero-copy).

Why a plain actor, not Ray Serve: the trials are already actors of the same Ray job, and an actor
call hands numpy results through the object store directly, where Serve adds a controller, HTTP
proxies and replicas that we would have to pin to nodes ourselves; restart-and-retry on a killed
process is two options of an actor (max_restarts, max_task_retries); and Ray Serve is another set
of dependencies (ray[serve]) that ray[tune] does not install.

A teacher too large for one process is served by an inference engine instead:
`teacher_server.url` names an OpenAI-compatible completions endpoint that returns prompt log-probs
(vLLM); teacher_http.py speaks it and RemoteTeacher gives both the same face.

Lifetime: the actors are owned by the search's driver, so they die with it (Ctrl-C, a crash, the
end); a killed actor process is restarted by Ray (MAX_RESTARTS) and the requests in flight are
retried (max_task_retries), so no trial sees the fault; the teacher is deterministic, so the answers
are the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
import types
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from tune_kd.config import ExperimentConfig
from tune_kd.config_checks import local_teacher_reason
from tune_kd.errors import UserError
from tune_kd.teacher_cache import CachedTeacher, Layout, StoredRows, _to_disk, compress

log = logging.getLogger(__name__)

MAX_RESTARTS = 4               # a killed or crashed teacher process is started again this many times
START_TIMEOUT_S = 600.0        # loading a large teacher from disk may take minutes
ACTOR_PREFIX = "tune_kd-teacher"


# ----------------------------------------------------------------------------------------------
# Whether a search serves its teacher
# ----------------------------------------------------------------------------------------------

def uses_teacher(cfg: ExperimentConfig) -> bool:
    return cfg.teacher is not None and (cfg.train.alpha < 1.0 or "alpha" in cfg.parameters
                                        or cfg.train.on_policy_fraction > 0 or "on_policy_fraction" in cfg.parameters)


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

@dataclass
class _Request:
    input_ids: np.ndarray          # (B, T) int64
    positions: np.ndarray          # (B, T) bool: the scored positions
    future: asyncio.Future
    arrived: float

    @property
    def tokens(self) -> int:
        return int(self.input_ids.size)


class TeacherServer:
    """The actor's body (search.py wraps it with ray.remote): the teacher on this node's device, and
    score(), which batches concurrent requests into one forward."""

    def __init__(self, cfg: ExperimentConfig, layout: Layout, cache_dir: str | None, threads: int):
        from tune_kd import data, models
        from tune_kd.scored import ScoredLM

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        models.quiet_progress_bars()
        torch.set_num_threads(max(1, threads))
        import ray

        device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        self.precision = models.resolve_precision(cfg.train.dtype, device)
        tokenizer = data.shared_tokenizer(cfg)
        teacher = models.make_teacher(cfg.teacher, tokenizer, self.precision)
        self.teacher = ScoredLM(teacher)
        rows = models.vocab_rows(teacher)
        self.columns = len(tokenizer) if rows > len(tokenizer) else None   # padding rows past the tokenizer's ids
        self.layout, self.settings = layout, cfg.teacher_server
        self.info_ = {"teacher_rows": rows, "layout": layout, "cache_dir": cache_dir, "pid": os.getpid(),
                      "node_id": ray.get_runtime_context().get_node_id(), "device": str(device),
                      "position_limit": getattr(teacher.config, "max_position_embeddings", None)}
        self.pending: list[_Request] = []
        self.arrival = None                      # asyncio.Event, made on the actor's event loop
        self.batcher = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)   # one forward at a time
        self.forwards = self.requests = 0
        self.busy_s = 0.0

    def info(self) -> dict:
        return dict(self.info_)

    def stats(self) -> dict:
        """forwards, requests and busy seconds since start: requests / forwards is the batch occupancy."""
        return {"forwards": self.forwards, "requests": self.requests, "busy_s": self.busy_s}

    async def score(self, input_ids: np.ndarray, positions: np.ndarray) -> dict:
        """The teacher's rows at the scored positions (row-major, as scoring.scored_positions orders
        them): {"values", "ids", "tail"} in the layout's stored dtypes (ids/tail absent for full
        rows), and "target_logprobs" (N,) float32, log p(next token) at T = 1."""
        loop = asyncio.get_running_loop()
        if self.arrival is None:
            self.arrival = asyncio.Event()
        request = _Request(np.asarray(input_ids), np.asarray(positions, dtype=bool), loop.create_future(),
                           time.perf_counter())
        self.pending.append(request)
        self.arrival.set()
        if self.batcher is None or self.batcher.done():
            self.batcher = asyncio.ensure_future(self._serve_pending())
        return await request.future

    async def _serve_pending(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s, budget = self.settings.max_wait_ms / 1000.0, self.settings.max_batch_tokens
        while self.pending:
            # gather: until the oldest request has waited max_wait_ms or the batch is full
            while sum(r.tokens for r in self.pending) < budget:
                left = self.pending[0].arrived + wait_s - time.perf_counter()
                if left <= 0:
                    break
                self.arrival.clear()
                try:
                    await asyncio.wait_for(self.arrival.wait(), timeout=left)
                except asyncio.TimeoutError:
                    break
            batch, tokens = [], 0
            while self.pending and (not batch or tokens + self.pending[0].tokens <= budget):
                tokens += self.pending[0].tokens
                batch.append(self.pending.pop(0))
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self.executor, self._forward, batch)
            except Exception as exc:   # the requests fail, the actor stays up for the next ones
                for request in batch:
                    request.future.set_exception(exc)
                continue
            self.busy_s += time.perf_counter() - started
            self.forwards, self.requests = self.forwards + 1, self.requests + len(batch)
            for request, answer in zip(batch, answers):
                request.future.set_result(answer)

    def _forward(self, batch: list[_Request]) -> list[dict]:
        """One teacher forward over the requests, right-padded to the longest (causal: padding after a
        position never changes it), split back per request."""
        from tune_kd.scored import row_chunks

        width = max(r.input_ids.shape[1] for r in batch)
        ids = np.zeros((sum(r.input_ids.shape[0] for r in batch), width), dtype=np.int64)
        scored = np.zeros(ids.shape, dtype=bool)
        row = 0
        for r in batch:
            b, t = r.input_ids.shape
            ids[row:row + b, :t], scored[row:row + b, :t] = r.input_ids, r.positions
            row += b
        targets = np.zeros(ids.shape, dtype=np.int64)
        targets[:, :-1] = ids[:, 1:]                      # the logit at t is scored against token t + 1
        device = self.precision.device
        with torch.inference_mode(), self.precision.autocast():
            out, _, _ = self.teacher(torch.from_numpy(ids).to(device), torch.from_numpy(scored).to(device))
        wanted = torch.from_numpy(targets[scored]).to(device)
        parts: dict[str, list] = {"values": [], "ids": [], "tail": [], "target_logprobs": []}
        with torch.inference_mode():
            for lo, hi in row_chunks(out.rows, out.vocab):
                logits = out.logits(lo, hi)[:, :self.columns].float()
                stored = compress(logits, self.layout)
                parts["values"].append(_to_disk(stored.values, self.layout.value_dtype))
                if not self.layout.full:
                    parts["ids"].append(_to_disk(stored.ids, self.layout.id_dtype))
                    parts["tail"].append(_to_disk(stored.tail, self.layout.tail_dtype))
                logp = torch.log_softmax(logits, dim=-1).gather(1, wanted[lo:hi, None])[:, 0]
                parts["target_logprobs"].append(logp.cpu().numpy().astype(np.float32))
        whole = {name: np.concatenate(chunks) for name, chunks in parts.items() if chunks}
        answers, first = [], 0
        for r in batch:
            count = int(r.positions.sum())
            answers.append({name: array[first:first + count] for name, array in whole.items()})
            first += count
        return answers


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
        return CachedTeacher.from_stored(stored), _tensor(target_logprobs)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of an object-store array (read-only shared memory: torch warns, and the losses
    never write to the teacher's side)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class ServedTeacher(RemoteTeacher):
    """A trial's handle on its node's TeacherServer actors (one picked per trial)."""

    def __init__(self, handle):
        import ray

        self.handle = handle
        info = ray.get(handle.info.remote())
        self.layout: Layout = info["layout"]
        self.teacher_rows, self.cache_dir, self.pid = info["teacher_rows"], info["cache_dir"], info["pid"]
        self.config = types.SimpleNamespace(max_position_embeddings=info["position_limit"])

    def request(self, input_ids: torch.Tensor, positions: torch.Tensor) -> PendingRows:
        """The actor task is sent at once (Ray calls are asynchronous); result() gets its answer."""
        import ray

        ref = self.handle.score.remote(input_ids.cpu().numpy(), positions.cpu().numpy())
        return PendingRows(lambda: self._stored(ray.get(ref)))

    def _stored(self, answer: dict) -> tuple[StoredRows, np.ndarray]:
        lay = self.layout
        values = answer["values"]
        return StoredRows(_tensor(values.view(np.int16)).view(torch.bfloat16) if lay.value_dtype == "bfloat16"
                          else _tensor(values),
                          None if lay.full else _tensor(answer["ids"].astype(np.int32, copy=False)),
                          None if lay.full else _tensor(answer["tail"])), answer["target_logprobs"]


class HttpRemote(RemoteTeacher):
    """teacher_server.url: an inference engine's completions endpoint (teacher_http.py)."""

    def __init__(self, cfg: ExperimentConfig, columns: int):
        from tune_kd.teacher_http import HttpTeacher

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


def actor_name(experiment: str, node_id: str, replica: int) -> str:
    return f"{ACTOR_PREFIX}:{experiment}:{node_id}:{replica}"


def connect(cfg: ExperimentConfig, columns: int, trial_key: str = "") -> RemoteTeacher | None:
    """The remote teacher this run reads, or None when it holds its own: the url's engine, or (with
    teacher_server.mode on, which the search sets after deciding) this node's served teacher,
    replica chosen by trial_key."""
    if cfg.teacher_server.url:
        return HttpRemote(cfg, columns)
    if cfg.teacher_server.mode != "on":
        return None
    import ray

    if not ray.is_initialized():
        raise UserError("teacher_server: on, but this run is not part of a search (the search starts the served "
                        "teacher): set teacher_server: off for a single run, which holds its own teacher")
    node = ray.get_runtime_context().get_node_id()
    replica = sum(trial_key.encode()) % cfg.teacher_server.replicas
    try:
        handle = ray.get_actor(actor_name(cfg.name, node, replica))
    except ValueError:
        raise UserError(f"teacher_server: on, but no served teacher runs on node {node[:8]} (the search starts one "
                        "per node before its trials)") from None
    return ServedTeacher(handle)


# ----------------------------------------------------------------------------------------------
# Starting and stopping (the search's driver)
# ----------------------------------------------------------------------------------------------

@dataclass
class Served:
    """The started actors, kept alive by this object's handles."""

    handles: list

    def stats(self) -> list[dict]:
        import ray

        return ray.get([h.stats.remote() for h in self.handles])

    def stop(self) -> None:
        import ray

        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        self.handles = []


def trial_nodes(nodes: list[dict]) -> list[str]:
    """The alive nodes with CPUs (where trials can run): each gets its own served teacher."""
    return [n["NodeID"] for n in nodes if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]


def server_gpus(cfg: ExperimentConfig, gpus_per_node: float, trial_gpu: float) -> float:
    """Each replica's GPU share: teacher_server.gpus, or auto: none without GPUs; a whole GPU on nodes
    with two or more (students packed on the others); on a one-GPU node one trial's share (the
    teacher takes one trial's place and frees a teacher copy in every other)."""
    g = cfg.teacher_server.gpus
    if g != "auto":
        return float(g)
    if gpus_per_node == 0:
        return 0.0
    return 1.0 if gpus_per_node >= 2 else float(trial_gpu or 1.0)


def start(cfg: ExperimentConfig, layout: Layout, cache_dir: str | None, nodes: list[str], gpus: float,
          why: str) -> Served:
    """TeacherServer actors (teacher_server.replicas per node) on these nodes, each ready (teacher
    loaded) before this returns; a teacher that cannot start stops the search here with one line."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    s = cfg.teacher_server
    actor = ray.remote(TeacherServer)
    handles = []
    for node in nodes:
        for replica in range(s.replicas):
            handles.append(actor.options(
                name=actor_name(cfg.name, node, replica), num_cpus=s.cpus, num_gpus=gpus,
                max_restarts=MAX_RESTARTS, max_task_retries=-1, max_concurrency=1000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(cfg, layout, cache_dir, max(1, round(s.cpus)) if s.cpus else 1))
    served = Served(handles)
    started = time.perf_counter()
    try:
        infos = ray.get([h.info.remote() for h in handles], timeout=START_TIMEOUT_S)
    except Exception as exc:
        served.stop()
        raise UserError(f"teacher_server: the served teacher could not start ({_last_line(exc)}): check "
                        f"teacher.path and that the teacher fits its device, or set teacher_server: off") from None
    log.info("teacher server: %d replica(s) on %d node(s) in %.1f s (%s; rows: %s; device %s)", len(handles),
             len(nodes), time.perf_counter() - started, why, layout.describe(), infos[0]["device"])
    return served


def _last_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
