"""What a teacher cache's contents depend on, as hashes: the inputs of its folder's key
(cache_store.cache_key) and of top_k auto's remembered measurement (cache_fidelity).

The teacher counts by its loaded tensors (so a built or re-saved teacher counts too) and its config
(rope_theta, rms_norm_eps, ...: the same weights can compute other logits); the data by the
training split's identity (its token ids and masks, subset and max_seq_len included).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

# config keys that are bookkeeping, not maths: where it was loaded from, which library wrote it, and
# the dtype (the tensors' own dtype is hashed)
_UNHASHED_CONFIG = ("_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's config (what it computes: rope_theta, rms_norm_eps, ...) and its parameters
    and persistent buffers, by name, as loaded (dtype included). The config counts because derived
    tensors such as the rotary frequencies are rebuilt from it, never saved."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if k not in _UNHASHED_CONFIG}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(train_data) -> str:
    """Which examples, in which order: tokenized.TokenizedData keeps that hash (its cache key and subset)."""
    return train_data.identity


@dataclass(frozen=True)
class CacheInputs:
    """Everything the teacher's outputs depend on, as hashes and sizes: one cache per (inputs, layout)."""

    teacher: str            # model_fingerprint of the teacher (weights and config)
    tokenizer: str
    data: str               # data_fingerprint of the training split
    max_seq_len: int
    columns: int | None     # the vocabulary columns distilled (build.check_vocab)
    vocab: int


def digest(parts: dict) -> str:
    """A short stable hash of a JSON-able dict (cache keys, auto's measurement file)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
