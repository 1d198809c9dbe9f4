"""The served teacher's Ray side: the actor that holds the teacher on a node, a trial's handle on it,
and starting and stopping the actors (the search's driver).

Requests from concurrent trials are batched: the actor queues them and runs one teacher forward
over as many as arrive within teacher_server.max_wait_ms of the first, up to
teacher_server.max_batch_tokens tokens, while the next requests queue during that forward. That
alone batches nothing once the server is the bottleneck: each trial waits for its answer before it
asks again, so while one trial's forward runs exactly one other request queues, and the trials fall
into taking turns, one request per forward (measured: 1.00 over 122 forwards). Where one forward
over two trials' batches costs clearly less than two (a GPU; search/teacher_choice.py measures it),
the actor also waits, up to one forward's time, for every trial that is asking (the clients seen
recently) before it starts: batching_wait. On a CPU a forward's cost grows with its tokens, so it
does not wait. The
answer is numpy arrays returned from the actor task, so they travel through Ray's shared-memory
object store and the trial maps them without a copy (ray.get of a numpy array is zero-copy).

Why a plain actor, not Ray Serve: the trials are already actors of the same Ray job, and an actor
call hands numpy results through the object store directly, where Serve adds a controller, HTTP
proxies and replicas that we would have to pin to nodes ourselves; restart-and-retry on a killed
process is two options of an actor (max_restarts, max_task_retries); and Ray Serve is another set
of dependencies (ray[serve]) that ray[tune] does not install.

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
from dataclasses import dataclass

import numpy as np
import torch

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig
from tune_kd.teacher.served import NOT_IN_A_SEARCH, PendingRows, RemoteTeacher, shared_tensor
from tune_kd.teacher.stored_rows import Layout, StoredRows, compress, to_disk

log = logging.getLogger(__name__)


BATCHING_PAYS = 1.25         # batching_wait: two batches in one forward at least this much faster than two forwards


ACTIVE_MIN_S = 1.0           # a client counts as asking while its last request is this recent (or 3 of its gaps)


MAX_RESTARTS = 4               # a killed or crashed teacher process is started again this many times


START_TIMEOUT_S = 600.0        # loading a large teacher from disk may take minutes


ACTOR_PREFIX = "tune_kd-teacher"


@dataclass
class _Request:
    input_ids: np.ndarray          # (B, T) int64
    positions: np.ndarray          # (B, T) bool: the scored positions
    future: asyncio.Future
    arrived: float
    client: str = ""               # the asking trial (batching waits for the trials that are asking)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.size)


class TeacherServer:
    """The actor's body (search/runner.py wraps it with ray.remote): the teacher on this node's device, and
    score(), which batches concurrent requests into one forward."""

    def __init__(self, cfg: ExperimentConfig, layout: Layout, cache_dir: str | None, threads: int,
                 wait_for_trials_s: float = 0.0):
        from tune_kd.data import inputs
        from tune_kd.kd.scored import ScoredLM
        from tune_kd.model import build, hardware

        hardware.setup_logging()
        torch.set_num_threads(max(1, threads))
        import ray

        device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        self.precision = hardware.resolve_precision(cfg.train.dtype, device)
        tokenizer = inputs.run_tokenizers(cfg).of_teacher   # the teacher's own, across tokenizers
        teacher = build.make_teacher(cfg.teacher, tokenizer, self.precision)
        self.teacher = ScoredLM(teacher)
        rows = build.vocab_rows(teacher)
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
        self.wait_for_trials_s = wait_for_trials_s   # batching_wait's answer: 0 never waits for other trials
        self.asked: dict[str, tuple[float, float]] = {}   # client -> (its last request's time, the gap before it)

    def info(self) -> dict:
        return dict(self.info_)

    def stats(self) -> dict:
        """forwards, requests and busy seconds since start: requests / forwards is the batch occupancy."""
        return {"forwards": self.forwards, "requests": self.requests, "busy_s": self.busy_s}

    async def score(self, input_ids: np.ndarray, positions: np.ndarray, client: str = "") -> dict:
        """The teacher's rows at the scored positions (row-major, as scoring.scored_positions orders
        them): {"values", "ids", "tail"} in the layout's stored dtypes (ids/tail absent for full
        rows), and "target_logprobs" (N,) float32, log p(next token) at T = 1."""
        loop = asyncio.get_running_loop()
        if self.arrival is None:
            self.arrival = asyncio.Event()
        now = time.perf_counter()
        request = _Request(np.asarray(input_ids), np.asarray(positions, dtype=bool), loop.create_future(), now, client)
        last = self.asked.get(client)
        self.asked[client] = (now, now - last[0] if last else 0.0)
        self.pending.append(request)
        self.arrival.set()
        if self.batcher is None or self.batcher.done():
            self.batcher = asyncio.ensure_future(self._serve_pending())
        return await request.future

    def asking(self, now: float) -> set[str]:
        """The clients that are asking: a request within ACTIVE_MIN_S, or within 3 of their own gaps."""
        return {client for client, (last, gap) in self.asked.items() if now - last <= max(ACTIVE_MIN_S, 3 * gap)}

    def gather_limit(self, now: float) -> float:
        """How long the oldest pending request may wait for others: max_wait_ms, or with batching_wait
        up to wait_for_trials_s while an asking trial has no request pending (none once all have)."""
        if self.wait_for_trials_s <= 0:
            return self.settings.max_wait_ms / 1000.0
        missing = self.asking(now) - {r.client for r in self.pending}
        return self.wait_for_trials_s if missing else 0.0

    async def _serve_pending(self) -> None:
        loop = asyncio.get_running_loop()
        budget = self.settings.max_batch_tokens
        while self.pending:
            # gather: until the oldest request has waited its limit or the batch is full
            while sum(r.tokens for r in self.pending) < budget:
                left = self.pending[0].arrived + self.gather_limit(time.perf_counter()) - time.perf_counter()
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
        width = max(r.input_ids.shape[1] for r in batch)
        ids = np.zeros((sum(r.input_ids.shape[0] for r in batch), width), dtype=np.int64)
        scored = np.zeros(ids.shape, dtype=bool)
        row = 0
        for r in batch:
            b, t = r.input_ids.shape
            ids[row:row + b, :t], scored[row:row + b, :t] = r.input_ids, r.positions
            row += b
        whole = answer_rows(self.teacher, self.precision, self.columns, self.layout, ids, scored)
        answers, first = [], 0
        for r in batch:
            count = int(r.positions.sum())
            answers.append({name: array[first:first + count] for name, array in whole.items()})
            first += count
        return answers


def answer_rows(teacher, precision, columns: int | None, layout: Layout, ids: np.ndarray,
                scored: np.ndarray) -> dict[str, np.ndarray]:
    """The served teacher's answer for (B, T) token ids at the scored positions: {"values", "ids",
    "tail"} in the layout's stored dtypes (ids/tail absent for full rows) and "target_logprobs" (N,)
    float32, row-major over the scored positions. What the actor computes per forward, and what
    search/teacher_choice.py times to price serving."""
    from tune_kd.kd.scored import row_chunks

    targets = np.zeros(ids.shape, dtype=np.int64)
    targets[:, :-1] = ids[:, 1:]                      # the logit at t is scored against token t + 1
    device = precision.device
    with torch.inference_mode(), precision.autocast():
        out, _, _ = teacher(torch.from_numpy(ids).to(device), torch.from_numpy(scored).to(device))
    wanted = torch.from_numpy(targets[scored]).to(device)
    parts: dict[str, list] = {"values": [], "ids": [], "tail": [], "target_logprobs": []}
    with torch.inference_mode():
        for lo, hi in row_chunks(out.rows, out.vocab):
            logits = out.logits(lo, hi)[:, :columns].float()
            stored = compress(logits, layout)
            parts["values"].append(to_disk(stored.values, layout.value_dtype))
            if not layout.full:
                parts["ids"].append(to_disk(stored.ids, layout.id_dtype))
                parts["tail"].append(to_disk(stored.tail, layout.tail_dtype))
            logp = torch.log_softmax(logits, dim=-1).gather(1, wanted[lo:hi, None])[:, 0]
            parts["target_logprobs"].append(logp.cpu().numpy().astype(np.float32))
    return {name: np.concatenate(chunks) for name, chunks in parts.items() if chunks}


class ServedTeacher(RemoteTeacher):
    """A trial's handle on its node's TeacherServer actors (one picked per trial)."""

    def __init__(self, handle, client: str = ""):
        import ray

        self.handle, self.client = handle, client
        info = ray.get(handle.info.remote())
        self.layout: Layout = info["layout"]
        self.teacher_rows, self.cache_dir, self.pid = info["teacher_rows"], info["cache_dir"], info["pid"]
        self.config = types.SimpleNamespace(max_position_embeddings=info["position_limit"])

    def request(self, input_ids: torch.Tensor, positions: torch.Tensor) -> PendingRows:
        """The actor task is sent at once (Ray calls are asynchronous); result() gets its answer."""
        import ray

        ref = self.handle.score.remote(input_ids.cpu().numpy(), positions.cpu().numpy(), self.client)
        return PendingRows(lambda: self._stored(ray.get(ref)))

    def _stored(self, answer: dict) -> tuple[StoredRows, np.ndarray]:
        lay = self.layout
        values = answer["values"]
        return StoredRows(shared_tensor(values.view(np.int16)).view(torch.bfloat16) if lay.value_dtype == "bfloat16"
                          else shared_tensor(values),
                          None if lay.full else shared_tensor(answer["ids"].astype(np.int32, copy=False)),
                          None if lay.full else shared_tensor(answer["tail"])), answer["target_logprobs"]


def actor_name(experiment: str, node_id: str, replica: int) -> str:
    return f"{ACTOR_PREFIX}:{experiment}:{node_id}:{replica}"


@dataclass
class Served:
    """The started actors, kept alive by this object's handles."""

    handles: list

    def stats(self) -> list[dict]:
        import ray

        return ray.get([h.stats.remote() for h in self.handles])

    def summary_line(self) -> str:
        """The served teacher's line at the end: forwards, requests, and the batch occupancy."""
        stats = self.stats()
        forwards, requests = sum(s["forwards"] for s in stats), sum(s["requests"] for s in stats)
        busy = sum(s["busy_s"] for s in stats)
        return (f"served teacher: {requests} requests in {forwards} teacher forwards ({requests / max(forwards, 1):.2f} "
                f"requests per forward), busy {busy:.0f} s")

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


def batching_wait(costs) -> float:
    """How long a server waits for the other asking trials' requests (TeacherServer.gather_limit): one
    request's answer time where batching two measured at least BATCHING_PAYS faster than two apart,
    else 0 (costs: served.TeacherCosts, or None when not measured)."""
    if costs is None or costs.served_pair_s * BATCHING_PAYS > 2 * costs.served_one_s:
        return 0.0
    return costs.served_one_s


def start(cfg: ExperimentConfig, layout: Layout, cache_dir: str | None, nodes: list[str], gpus: float,
          why: str, wait_for_trials_s: float = 0.0) -> Served:
    """TeacherServer actors (teacher_server.replicas per node) on these nodes, each ready (teacher
    loaded) before this returns; a teacher that cannot start stops the search here with one line.
    wait_for_trials_s: batching_wait's answer."""
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
            ).remote(cfg, layout, cache_dir, max(1, round(s.cpus)) if s.cpus else 1, wait_for_trials_s))
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


def node_teacher(cfg: ExperimentConfig, trial_key: str) -> ServedTeacher:
    """This node's served teacher for a trial (teacher/served.connect's node_teacher), replica chosen
    by trial_key so the trials of a node spread over teacher_server.replicas."""
    import ray

    if not ray.is_initialized():
        raise UserError(NOT_IN_A_SEARCH)
    node = ray.get_runtime_context().get_node_id()
    replica = sum(trial_key.encode()) % cfg.teacher_server.replicas
    try:
        handle = ray.get_actor(actor_name(cfg.name, node, replica))
    except ValueError:
        raise UserError(f"teacher_server: on, but no served teacher runs on node {node[:8]} (the search starts one "
                        "per node before its trials)") from None
    return ServedTeacher(handle, trial_key)
