"""A stand-in for a vLLM server, for the tests: the two endpoints tune_kd's HttpTeacher uses,
answering as vLLM does, from a tiny seeded Llama on the CPU.

    with StandinVLLM() as server:        # 127.0.0.1, a free port, a daemon thread
        HttpTeacher(server.url, top_k=8, columns=server.vocab).check()

GET /v1/models lists the one model; POST /v1/completions with token-id prompts returns each
prompt's prompt_logprobs (None, then per token a dict str(id) -> {logprob, rank, decoded_token}
of the top k and the prompt's own token), refusing prompt_logprobs above max_logprobs with vLLM's
400 error body. fail_next(n) makes the next n requests answer 500; prompt_logprobs=False makes a
server whose completions carry none (an OpenAI-compatible server that is not vLLM). `posts`
records every completion request's body that reached the model, `requests` counts every request.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).float().eval()


def error_body(status: int, message: str, kind: str) -> dict:
    return {"object": "error", "message": message, "type": kind, "param": None, "code": status}


class StandinVLLM:
    def __init__(self, name: str = "standin/tiny-llama", vocab: int = 300, max_logprobs: int = 20,
                 prompt_logprobs: bool = True, seed: int = 0):
        self.name, self.vocab, self.max_logprobs, self.prompt_logprobs = name, vocab, max_logprobs, prompt_logprobs
        self.model = tiny_llama(vocab, seed)
        self.posts: list[dict] = []
        self.requests = 0
        self._failures = 0
        self._lock = threading.Lock()

    def log_probs(self, ids: list[int]) -> torch.Tensor:
        """(L, V) the model's next-token log-probs after each prefix of ids."""
        with torch.inference_mode():
            return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._failures = n

    # -- the endpoints: (status, JSON body) ----------------------------------------------------

    def models(self) -> tuple[int, dict]:
        return 200, {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "standin"}]}

    def completions(self, body: dict) -> tuple[int, dict]:
        self.posts.append(body)
        if body.get("model") != self.name:
            return 404, error_body(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        k = body.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            return 400, error_body(400, f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                        f"{self.max_logprobs}", "BadRequestError")
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        choices = []
        for index, ids in enumerate(prompts):
            logp = self.log_probs(ids)                                                 # (L, V)
            choice = {"index": index, "text": f"<{int(logp[-1].argmax())}>", "logprobs": None,
                      "finish_reason": "length", "prompt_token_ids": ids}
            if self.prompt_logprobs and k is not None:
                choice["prompt_logprobs"] = [None] + [self.entry(logp[j - 1], ids[j], k) for j in range(1, len(ids))]
            choices.append(choice)
        # vLLM answers in prompt order; reversed here so that a client that ignores `index` fails
        return 200, {"id": f"cmpl-{len(self.posts)}", "object": "text_completion", "created": int(time.time()),
                     "model": self.name, "choices": choices[::-1],
                     "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": len(prompts)}}

    @staticmethod
    def entry(row: torch.Tensor, token: int, k: int) -> dict:
        """One prompt token's entry: the top k of row (V,) by rank, and `token` with its rank."""
        top = row.topk(k)
        ranked = [(int(i), float(v), rank) for rank, (i, v) in enumerate(zip(top.indices, top.values), start=1)]
        if token not in top.indices.tolist():
            ranked.append((token, float(row[token]), int((row > row[token]).sum()) + 1))
        return {str(i): {"logprob": v, "rank": rank, "decoded_token": f"<{i}>"} for i, v, rank in ranked}

    # -- serving --------------------------------------------------------------------------------

    def answer(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        with self._lock:
            self.requests += 1
            failing, self._failures = self._failures > 0, max(self._failures - 1, 0)
        if failing:
            return 500, error_body(500, "injected failure", "InternalServerError")
        if method == "GET" and path == "/v1/models":
            return self.models()
        if method == "POST" and path == "/v1/completions":
            return self.completions(body)
        return 404, error_body(404, f"no route {method} {path}", "NotFoundError")

    def __enter__(self) -> "StandinVLLM":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, method: str, body: dict | None) -> None:
                status, answer = standin.answer(method, self.path, body)
                raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self.reply("GET", None)

            def do_POST(self):
                self.reply("POST", json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):   # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
