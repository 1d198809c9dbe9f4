"""A client for a teacher served by vLLM (or any OpenAI-compatible server that returns prompt
log-probs): the teacher cache's rows, fetched over HTTP instead of computed in this process.

The protocol. One POST /v1/completions per batch, every conversation a prompt of token ids
(`"prompt": [[ids...], ...]`), `max_tokens: 1` (the completion itself is thrown away) and
`prompt_logprobs: k`. Each choice (matched to its prompt by `index`) carries `prompt_logprobs`, one
entry per prompt token: None for the first, then a dict token id (a string) -> {logprob, rank,
decoded_token} holding the k most likely tokens and, when it is not among them, the actual prompt
token. Entry j is the distribution of token j given tokens < j, so the teacher's distribution at
scored position p (the one that predicts token p + 1) is entry p + 1. Each prompt is cut after
token p + 1 of its last scored p: nothing later is read.

The rows, in teacher_cache's format (StoredRows; see that module's docstring for the maths):
values are the top-k log-probs minus the row's largest, m; ids their token ids; tail is
log S(T_g) - m / T_g on TAIL_TEMPERATURES. The server sends log-probs, which are logits shifted by
the row's log-partition, and the cache is invariant to that shift. What it does not send is how
the tail's mass P = 1 - sum over the top k of p_i is shared among the other columns - k tokens, so
the tail is modelled as uniform: each tail token has log-prob z_t = log(P / (columns - k)), and

    log S(T) - m / T = log(columns - k) + (z_t - m) / T

At T = 1 TeacherRows.from_stored(rows) then rebuilds exactly the server's top-k probabilities
plus P spread evenly; at other T the tail's total S(T) is the uniform tail's, where a cache built
from a live teacher stores the true one: the approximation this client adds to the cache's own.

The target log-probs (the actual next token's) are exact even outside the top k: vLLM always puts
the prompt token itself in each entry, with its rank.

Failures. check() runs once before training and turns every way the server can be wrong (not
there, not serving the model, refusing k prompt log-probs, not returning them at all) into one
UserError line. score() retries what may pass (no answer, a timeout, HTTP 5xx) `retries` times with
a doubling backoff, then raises RuntimeError (a failed trial, which Ray retries); an HTTP 4xx is a
UserError at once.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from tune_kd.config.errors import UserError
from tune_kd.kd.teacher_rows import TAIL_TEMPERATURES
from tune_kd.teacher.stored_rows import StoredRows

TAIL_FLOOR = 1e-12      # the least tail mass P kept: the top k's summed probabilities can round past 1
PROBE = [0, 1]          # check()'s probe prompt: two ids every vocabulary has, so one entry is not None


class _Failure(Exception):
    """One request that failed: with no HTTP status (no answer, a timeout) or with one."""

    def __init__(self, what: str, status: int | None = None):
        super().__init__(what)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status is None or self.status >= 500


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _why_no_answer(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror})"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    return _one_line(f"{type(reason).__name__}: {reason}")


class HttpTeacher:
    """The teacher behind an OpenAI-compatible completions server with prompt log-probs (vLLM).

    url: the server's base URL (with or without a trailing /v1); top_k: prompt log-probs asked per
    position; columns: the token ids the tokenizer can emit (the vocabulary the losses compare);
    model: the served model's name (None: the first that GET /v1/models lists)."""

    backoff_s = 0.5     # before the first retry; doubled before each next one

    def __init__(self, url: str, top_k: int, columns: int, model: str | None = None,
                 timeout_s: float = 120.0, retries: int = 3):
        base = url.strip().rstrip("/")
        if base.endswith("/v1"):
            base = base[:-len("/v1")]
        if not base.startswith(("http://", "https://")):
            raise UserError(f"teacher_server.url {url!r}: not an http:// or https:// URL: write it as http://HOST:PORT")
        self.url, self.top_k, self.columns, self.model = base, int(top_k), int(columns), model
        self.timeout_s, self.retries = float(timeout_s), int(retries)

    # ------------------------------------------------------------------------------------------
    # HTTP
    # ------------------------------------------------------------------------------------------

    def _call(self, path: str, body: dict | None = None) -> dict:
        """One GET (body None) or POST of JSON to url + path -> the answer's JSON; _Failure otherwise."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:     # an answer with a 4xx / 5xx status
            text = error.read().decode(errors="replace")
            try:
                text = json.loads(text).get("message", text)    # vLLM: {"object": "error", "message": ...}
            except (ValueError, AttributeError):
                pass
            raise _Failure(f"HTTP {error.code}: {_one_line(text)}", error.code) from None
        except urllib.error.URLError as error:
            raise _Failure(_why_no_answer(error.reason)) from None
        except (OSError, http.client.HTTPException) as error:   # reset, timed out, cut off mid-answer
            raise _Failure(_why_no_answer(error)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Failure(f"an answer that is not JSON: {_one_line(raw.decode(errors='replace'), 80)}", 200) from None

    def _retrying(self, path: str, body: dict | None = None) -> dict:
        """_call, retried on transient failures; RuntimeError after the last, UserError on a 4xx."""
        for attempt in range(self.retries + 1):
            try:
                return self._call(path, body)
            except _Failure as failure:
                if not failure.transient:
                    method = "GET" if body is None else "POST"
                    raise UserError(f"teacher_server.url {self.url}: {method} {path} failed ({failure})") from None
                if attempt == self.retries:
                    raise RuntimeError(f"teacher server {self.url}{path}: {failure} "
                                       f"(after {self.retries + 1} tries)") from None
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _completion_body(self, prompts: list[list[int]]) -> dict:
        return {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": self.top_k}

    # ------------------------------------------------------------------------------------------
    # check
    # ------------------------------------------------------------------------------------------

    def _served(self, answer: dict | None = None) -> list[str]:
        """The ids GET /v1/models lists (`answer`: that request's JSON, fetched here once when None);
        UserError when nothing answers or the answer lists nothing."""
        if answer is None:
            try:
                answer = self._call("/v1/models")
            except _Failure as failure:
                if failure.status is None:
                    raise UserError(f"teacher_server.url {self.url}: no server answers ({failure}): start it "
                                    f"(vllm serve MODEL --max-logprobs {self.top_k}) or fix the URL") from None
                raise UserError(f"teacher_server.url {self.url}: GET /v1/models failed ({failure}): is this an "
                                f"OpenAI-compatible server (vllm serve MODEL)?") from None
        served = [entry.get("id") for entry in answer.get("data", []) if isinstance(entry, dict)] \
            if isinstance(answer, dict) else []
        if not served:
            raise UserError(f"teacher_server.url {self.url}: GET /v1/models lists no model: is this an "
                            f"OpenAI-compatible server (vllm serve MODEL)?")
        return served

    def _refusal(self, failure: _Failure) -> UserError:
        """check()'s probe refused: vLLM's max_logprobs when the message says so, else the message."""
        where = f"teacher_server.url {self.url}"
        if failure.status is None:
            return UserError(f"{where}: the server stopped answering during the probe completion ({failure})")
        if failure.status == 400 and "logprobs" in str(failure):
            allowed = re.search(r"(?:max(?:imum)? allowed|max_logprobs)\D{0,5}(\d+)", str(failure))
            most = f"at most {allowed.group(1)}" if allowed else "fewer"
            instead = allowed.group(1) if allowed else "a smaller k"
            return UserError(f"{where}: the server returns {most} prompt log-probs but teacher_server.top_k is "
                             f"{self.top_k}: restart it with --max-logprobs {self.top_k}, or set teacher_server.top_k: "
                             f"{instead} ({failure})")
        return UserError(f"{where}: the probe completion (model {self.model!r}, prompt_logprobs {self.top_k}) was "
                         f"refused ({failure})")

    def check(self) -> None:
        """Before training: the server answers, serves the model and returns top_k prompt log-probs."""
        served = self._served()
        if self.model is None:
            self.model = served[0]
        elif self.model not in served:
            raise UserError(f"teacher_server.model {self.model!r} is not served at {self.url}, which serves "
                            f"{', '.join(map(repr, served))}: set teacher_server.model to one of them")
        if not 0 < self.top_k < self.columns:
            raise UserError(f"teacher_server.top_k {self.top_k}: must be at least 1 and below the tokenizer's "
                            f"{self.columns} columns")
        try:
            answer = self._call("/v1/completions", self._completion_body([PROBE]))
        except _Failure as failure:
            raise self._refusal(failure) from None
        choices = answer.get("choices") if isinstance(answer, dict) else None
        entries = choices[0].get("prompt_logprobs") if choices and isinstance(choices[0], dict) else None
        if not entries or len(entries) < len(PROBE) or not isinstance(entries[1], dict):
            raise UserError(f"teacher_server.url {self.url}: not a vLLM-compatible server: its completions carry no "
                            f"prompt_logprobs: serve the teacher with vLLM (vllm serve MODEL --max-logprobs "
                            f"{self.top_k})")
        if len(entries[1]) < self.top_k:
            raise UserError(f"teacher_server.url {self.url}: the server returns {len(entries[1])} prompt log-probs "
                            f"per position but teacher_server.top_k is {self.top_k}: restart it with --max-logprobs "
                            f"{self.top_k}, or set teacher_server.top_k: {len(entries[1])}")

    # ------------------------------------------------------------------------------------------
    # score
    # ------------------------------------------------------------------------------------------

    def _top(self, entry: dict, target: int) -> tuple[list[int], list[float], float]:
        """One position's entry -> (top-k ids, their log-probs by rank, the target token's log-prob)."""
        ranked = sorted(entry.items(), key=lambda item: (item[1]["rank"], -item[1]["logprob"]))[:self.top_k]
        if len(ranked) < self.top_k:
            raise RuntimeError(f"teacher server {self.url}: {len(ranked)} prompt log-probs at a position, "
                               f"asked for {self.top_k}")
        try:
            target_logprob = entry[str(target)]["logprob"]
        except KeyError:
            raise RuntimeError(f"teacher server {self.url}: a prompt_logprobs entry lacks the prompt's own "
                               f"token {target} (not a vLLM-compatible answer)") from None
        return [int(key) for key, _ in ranked], [item["logprob"] for _, item in ranked], target_logprob

    def score(self, sequences: list[np.ndarray], scored: list[np.ndarray]) -> tuple[StoredRows, np.ndarray]:
        """The teacher's rows at the scored positions, in one request.

        sequences[i]: a conversation's token ids (no padding); scored[i]: the ascending positions p
        whose next token p + 1 is scored. Returns (StoredRows(values (N, k) float32, ids (N, k)
        int32, tail (N, G) float32), target log-probs (N,) float32), N = the scored positions, in
        order: sequence by sequence, positions ascending."""
        if self.model is None:      # a trial that did not run check(): transient failures retried here too
            self.model = self._served(self._retrying("/v1/models"))[0]
        wanted = [i for i, positions in enumerate(scored) if len(positions)]
        prompts = [[int(t) for t in sequences[i][:int(scored[i][-1]) + 2]] for i in wanted]
        choices = []
        if prompts:
            answer = self._retrying("/v1/completions", self._completion_body(prompts))
            choices = sorted(answer.get("choices", []), key=lambda choice: choice["index"])
            if len(choices) != len(prompts):
                raise RuntimeError(f"teacher server {self.url}: {len(choices)} choices for {len(prompts)} prompts")
        ids, logprobs, targets = [], [], []
        for prompt, i, choice in zip(prompts, wanted, choices):
            entries = choice.get("prompt_logprobs")
            if entries is None or len(entries) != len(prompt):
                raise RuntimeError(f"teacher server {self.url}: prompt_logprobs for {len(entries or [])} of the "
                                   f"{len(prompt)} tokens of prompt {choice['index']}")
            for p in scored[i]:
                top_ids, top_logprobs, target = self._top(entries[int(p) + 1], prompt[int(p) + 1])
                ids.append(top_ids)
                logprobs.append(top_logprobs)
                targets.append(target)
        return self._rows(np.array(ids, dtype=np.int64).reshape(-1, self.top_k),
                          np.array(logprobs, dtype=np.float64).reshape(-1, self.top_k)), \
            np.array(targets, dtype=np.float32)

    def _rows(self, ids: np.ndarray, logprobs: np.ndarray) -> StoredRows:
        """(N, k) top-k ids and log-probs -> the cache's rows, the tail modelled as uniform."""
        if ids.size and ids.max() >= self.columns:
            raise UserError(f"teacher_server.url {self.url}: the server's model emits token id {ids.max()}, beyond "
                            f"the tokenizer's {self.columns} columns: it serves a model with another tokenizer")
        top = logprobs.max(axis=1, keepdims=True)                                      # (N, 1) m
        tail_mass = np.maximum(1.0 - np.exp(logprobs).sum(axis=1, keepdims=True), TAIL_FLOOR)   # (N, 1) P
        spread = math.log(self.columns - self.top_k)
        z_tail = np.log(tail_mass) - spread                                            # (N, 1) each tail token
        tail = np.concatenate([spread + (z_tail - top) / t for t in TAIL_TEMPERATURES], axis=1)   # (N, G)
        return StoredRows(torch.from_numpy((logprobs - top).astype(np.float32)),
                          torch.from_numpy(ids.astype(np.int32)), torch.from_numpy(tail.astype(np.float32)))
