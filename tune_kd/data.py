"""SFT chat JSONL -> token ids + assistant-only labels, cached on disk; length-bucketed batches.

The input is the seed's format, one conversation per line:

    {"conversations": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Each conversation is rendered with the tokenizer's chat template. Labels equal the token ids on
assistant content and its end-of-turn token, -100 everywhere else (system and user turns, role
headers, padding), so CE and KD only ever see what the assistant says. Assistant spans are found by
rendering the conversation prefix up to each assistant turn, which works with any chat template
whose rendering of a prefix is a prefix of the whole rendering (every common template is).

Tokenized data is cached under `<cache_dir>/tokenized/<key>/`, the key hashing the data file's
bytes, the tokenizer (vocab, merges, chat template) and max_seq_len, so later runs and every trial
of a search reuse one copy (arrays are memory-mapped, so concurrent trials share pages).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tune_kd.config import UserError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
MAX_LINE_BYTES = 16 * 1024 * 1024        # a single conversation larger than this is surely a broken file
CACHE_FORMAT = 1                          # bump when the cached arrays change meaning
VAL_SPLIT_SEED = 1234                     # fixed: every trial must validate on the same examples


class DataError(UserError):
    """A problem with a data file, located at file:line."""


# ----------------------------------------------------------------------------------------------
# Reading and validating JSONL
# ----------------------------------------------------------------------------------------------

def _check_conversation(record: object) -> str | None:
    """Return what is wrong with one parsed JSONL record, or None if it is a valid conversation."""
    if not isinstance(record, dict):
        return f"expected a JSON object with a 'conversations' list, got {type(record).__name__}"
    turns = record.get("conversations")
    if turns is None:
        return "missing 'conversations' (each line must be {\"conversations\": [{\"role\": ..., \"content\": ...}]})"
    if not isinstance(turns, list) or not turns:
        return "'conversations' must be a non-empty list of {role, content} turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {i} is not an object with 'role' and 'content'"
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            return f"turn {i} has unknown role {role!r} (allowed: {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"turn {i} content must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"turn {i} ({role}) has empty content"
    if turns[-1]["role"] == "user":
        return "conversation ends with a user turn (its reply is missing): add the assistant reply or drop the turn"
    return None


def read_conversations(path: str | Path) -> tuple[list[list[dict]], int]:
    """Parse and validate a chat JSONL file.

    Returns (conversations, skipped) where skipped counts conversations without an assistant
    turn (nothing to learn from). Raises DataError naming file:line for any malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (set data.path or --data_path to a chat JSONL file)")
    conversations, skipped = [], 0
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit "
                                "(is this really one conversation per line?)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {exc.start} (re-encode the file as UTF-8)") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            problem = _check_conversation(record)
            if problem:
                raise DataError(f"{path}:{lineno}: {problem}")
            turns = [{"role": t["role"], "content": t["content"]} for t in record["conversations"]]
            if not any(t["role"] == "assistant" for t in turns):
                skipped += 1
                continue
            conversations.append(turns)
    if not conversations:
        raise DataError(f"{path}: no usable conversation (the file is empty or no line has an assistant turn)")
    return conversations, skipped


# ----------------------------------------------------------------------------------------------
# Tokenization with assistant-only labels
# ----------------------------------------------------------------------------------------------

def load_tokenizer(path: str | Path):
    """Load a Hugging Face tokenizer from a local directory; it must have a chat template."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: tokenizer directory not found (set tokenizer: to a local HF tokenizer dir)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load a tokenizer from this directory ({exc})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{path}: tokenizer has no chat_template (add one to tokenizer_config.json)")
    if not tokenizer.is_fast:
        raise UserError(f"{path}: a fast tokenizer (tokenizer.json) is required to locate assistant tokens")
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: vocab/merges/normalizer and the chat template."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()


def _assistant_char_spans(tokenizer, turns: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn's content plus its end-of-turn marker in `full`."""
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True) if i else \
            tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(turns[: i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through)):
            raise UserError("the tokenizer's chat template does not render conversation prefixes as prefixes of "
                            "the whole; assistant tokens cannot be located (use a prefix-stable template)")
        # rstrip: the newline a template puts after the end-of-turn token is formatting, not the reply
        spans.append((len(before), len(through.rstrip())))
    return spans


def encode_conversations(tokenizer, conversations: list[list[dict]], max_seq_len: int):
    """Tokenize conversations; returns (list of id arrays, list of label masks, truncated, emptied).

    A mask is True where the token is assistant content or its end-of-turn token. Sequences longer
    than max_seq_len are truncated (and counted); a conversation left with no assistant token
    after truncation is dropped (and counted).
    """
    texts = [tokenizer.apply_chat_template(turns, tokenize=False) for turns in conversations]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids_out, masks_out, truncated, emptied = [], [], 0, 0
    for turns, text, ids, offsets in zip(conversations, texts, encoded["input_ids"], encoded["offset_mapping"]):
        spans = _assistant_char_spans(tokenizer, turns, text)
        starts = np.fromiter((start for start, end in offsets), dtype=np.int64, count=len(offsets))
        ends = np.fromiter((end for start, end in offsets), dtype=np.int64, count=len(offsets))
        mask = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            mask |= (starts >= lo) & (ends <= hi) & (ends > starts)
        if len(ids) > max_seq_len:
            truncated += 1
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not mask[1:].any():  # position 0 is never predicted
            emptied += 1
            continue
        ids_out.append(np.asarray(ids, dtype=np.int32))
        masks_out.append(mask)
    return ids_out, masks_out, truncated, emptied


@dataclass
class TokenizedData:
    """Variable-length examples stored flat: example i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray      # (total,) int32
    mask: np.ndarray        # (total,) bool, True on assistant tokens
    offsets: np.ndarray     # (N + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def target_counts(self) -> np.ndarray:
        """Per example: how many positions carry a label the model predicts (position 0 never does)."""
        csum = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])
        counts = csum[self.offsets[1:]] - csum[self.offsets[:-1]]
        first = self.mask[self.offsets[:-1]] if len(self) else np.zeros(0, bool)
        return counts - first

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.mask[lo:hi]

    def subset(self, indices: np.ndarray) -> "TokenizedData":
        parts = [self.example(int(i)) for i in indices]
        lengths = np.array([len(p[0]) for p in parts], dtype=np.int64)
        return TokenizedData(
            tokens=np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32),
            mask=np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, bool),
            offsets=np.concatenate([[0], np.cumsum(lengths)]),
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenize_cached(path: str | Path, tokenizer, max_seq_len: int, cache_dir: str | Path) -> TokenizedData:
    """Tokenized `path`, from the on-disk cache when present, else built once and cached atomically."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (set data.path or --data_path to a chat JSONL file)")
    key = hashlib.sha256(
        f"{CACHE_FORMAT}|{_sha256_file(path)}|{tokenizer_fingerprint(tokenizer)}|{max_seq_len}".encode()
    ).hexdigest()[:24]
    target = Path(cache_dir) / "tokenized" / key
    if not (target / "meta.json").is_file():
        conversations, skipped = read_conversations(path)
        ids, masks, truncated, emptied = encode_conversations(tokenizer, conversations, max_seq_len)
        if not ids:
            raise DataError(f"{path}: no conversation keeps an assistant token within max_seq_len={max_seq_len} "
                            "(raise data.max_seq_len)")
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        meta = {"source": str(path), "max_seq_len": max_seq_len, "examples": len(ids),
                "tokens": int(lengths.sum()), "skipped_no_assistant": skipped,
                "truncated": truncated, "dropped_after_truncation": emptied}
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        np.save(tmp / "tokens.npy", np.concatenate(ids))
        np.save(tmp / "mask.npy", np.concatenate(masks))
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:  # another process cached the same key first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
        notes = [f"{v} {k.replace('_', ' ')}" for k, v in meta.items()
                 if k in ("skipped_no_assistant", "truncated", "dropped_after_truncation") and v]
        if notes:
            log.warning("data %s: %s (max_seq_len=%d; raise data.max_seq_len to keep long conversations whole)",
                        path, ", ".join(notes), max_seq_len)
        log.info("data %s: tokenized %d conversations, %d tokens -> %s", path, meta["examples"], meta["tokens"], target)
    return TokenizedData(
        tokens=np.load(target / "tokens.npy", mmap_mode="r"),
        mask=np.load(target / "mask.npy", mmap_mode="r"),
        offsets=np.load(target / "offsets.npy"),
    )


def train_val_split(data: TokenizedData, val_fraction: float) -> tuple[TokenizedData, TokenizedData]:
    """Deterministic split (fixed seed) so every run and trial validates on the same examples."""
    n = len(data)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise DataError(f"only {n} usable conversation(s): too few to hold out data.val_fraction={val_fraction} "
                        "(add data or set data.val_path)")
    order = np.random.default_rng(VAL_SPLIT_SEED).permutation(n)
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def fixed_subset(data: TokenizedData, size: int) -> TokenizedData:
    """A random subset of `size` examples, the same in every run and trial (fixed seed)."""
    order = np.random.default_rng(VAL_SPLIT_SEED + 1).permutation(len(data))
    return data.subset(np.sort(order[:size]))


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------

BUCKET_BATCHES = 32     # sort by length within windows of this many batches: little padding, still random


def epoch_batches(data: TokenizedData, batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True) -> list[np.ndarray]:
    """The epoch's batches as index arrays, a pure function of (seed, epoch) so resume is exact.

    Length bucketing: shuffle, then sort by length inside windows of BUCKET_BATCHES batches, cut
    into batches and shuffle the batch order. Padding waste falls to a few percent while batches
    stay random.
    """
    lengths = data.lengths
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(data)) if shuffle else np.arange(len(data))
    window = batch_size * BUCKET_BATCHES
    batches = []
    for lo in range(0, len(order), window):
        block = order[lo:lo + window]
        block = block[np.argsort(lengths[block], kind="stable")]
        batches.extend(block[i:i + batch_size] for i in range(0, len(block), batch_size))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(data: TokenizedData, indices: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (B, T), labels (B, T) with -100 off assistant tokens,
    num_tokens, the real (unpadded) token count, and indices, the examples' positions in `data`.

    No attention mask: with right padding and causal attention no real token attends to a pad,
    and pads carry no label, so the model can use its fast causal-attention path.
    """
    examples = [data.example(int(i)) for i in indices]
    width = max(len(ids) for ids, _ in examples)
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(ids)] = np.where(mask, ids, IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "num_tokens": int(sum(len(ids) for ids, _ in examples)),
            "indices": np.asarray(indices, dtype=np.int64)}   # which examples: the teacher cache's rows


class BatchList(torch.utils.data.Dataset):
    """A fixed list of batches for a DataLoader (batch_size=None): workers collate in parallel."""

    def __init__(self, data: TokenizedData, batches: list[np.ndarray], pad_id: int):
        self.data, self.batches, self.pad_id = data, batches, pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return collate(self.data, self.batches[i], self.pad_id)
