"""Chat data -> token ids + assistant-only labels, cached on disk once; length-bucketed batches.

Files in any of chat_formats' layouts (the seed's `conversations`, `messages`, ShareGPT; JSONL or
Parquet) are rendered with the tokenizer's chat template. Labels equal the token ids on assistant
content and its end-of-turn token, -100 everywhere else (system and user turns, role headers,
padding), so CE and KD only ever see what the assistant says (ingest.py finds those tokens).

Tokenized data is cached under `<cache_dir>/tokenized/<key>/`, the key hashing the data file's
bytes, the tokenizer (vocab, merges, chat template; not the padding and truncation sections a saved
tokenizer.json may carry, which decide no id), max_seq_len and data.system_turns (unless keep).
Ingestion streams (ingest.py); every run and every trial of a search then memory-maps the one
copy, and the train/val split and subsets are index views into it, never private copies of the
tokens.

A run's tokenizers and splits come from data/inputs.py (load_data); across tokenizers a split also
carries the teacher's rendering of the same examples and both sides' aligned groups (TokenizedData.
teacher and .groups, from data/cross_tokens.py), which collate batches beside the student's.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ExperimentConfig, ModelSpec
from tune_kd.data import chat_template, ingest
from tune_kd.data.chat_formats import DataError, resolve_format

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CACHE_FORMAT = 3                          # bump when the cached arrays change meaning (3: block checksums)
VAL_SPLIT_SEED = 1234                     # fixed: every trial must validate on the same examples


# ----------------------------------------------------------------------------------------------
# The tokenizer
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
        raise UserError(f"{path}: tokenizer has no chat template (add a chat_template.jinja, or chat_template in "
                        "tokenizer_config.json)")
    if not tokenizer.is_fast:
        raise UserError(f"{path}: a fast tokenizer (tokenizer.json) is required to locate assistant tokens")
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: vocab/merges/normalizer and the chat template.
    The backend's padding and truncation are left out: ingestion turns them off (chat_template.plain_backend),
    and transformers itself changes them on the loaded tokenizer from call to call."""
    backend = tokenizer.backend_tokenizer
    if backend.padding is not None or backend.truncation is not None:
        backend = chat_template.plain_backend(tokenizer)
    h = hashlib.sha256()
    h.update(backend.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Tokenized examples: views into one memory-mapped copy
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizedData:
    """Variable-length examples: example i is tokens[starts[i] : starts[i] + lengths[i]].

    tokens and mask are usually memory-mapped cache files shared by every trial; a subset shares
    them and holds only its own (small) index arrays."""

    tokens: np.ndarray          # (total,) uint16 or int32
    mask: np.ndarray            # (total,) bool, True on assistant tokens
    starts: np.ndarray          # (N,) int64
    lengths: np.ndarray         # (N,) int64
    target_counts: np.ndarray   # (N,) int64: positions with a label the model predicts (position 0 never is)
    identity: str               # a hash of which examples these are (the teacher cache's key uses it)
    # across tokenizers (data/cross_tokens.py): each token's aligned group (-1: none), parallel to tokens,
    # and the same examples as the teacher's tokenizer renders them (with its own groups)
    groups: np.ndarray | None = None
    teacher: "TokenizedData | None" = None

    @classmethod
    def from_arrays(cls, tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> "TokenizedData":
        """In-memory examples (benchmarks, tests): back-to-back tokens and masks with their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        running = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        targets = running[starts + lengths] - running[starts] - np.asarray(mask)[starts]   # examples are non-empty
        h = hashlib.sha256()
        for array in (tokens, mask, lengths):
            h.update(np.ascontiguousarray(array).tobytes())
        return cls(tokens, mask, starts, lengths, targets, h.hexdigest())

    def __len__(self) -> int:
        return len(self.starts)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo = self.starts[i]
        hi = lo + self.lengths[i]
        return self.tokens[lo:hi], self.mask[lo:hi]

    def subset(self, indices: np.ndarray) -> "TokenizedData":
        """The examples at `indices`, in that order, sharing this data's token arrays."""
        indices = np.asarray(indices, dtype=np.int64)
        identity = hashlib.sha256(self.identity.encode() + indices.tobytes()).hexdigest()
        return TokenizedData(self.tokens, self.mask, self.starts[indices], self.lengths[indices],
                             self.target_counts[indices], identity, self.groups,
                             self.teacher.subset(indices) if self.teacher is not None else None)

    def example_groups(self, i: int) -> np.ndarray:
        """Example i's tokens' aligned groups (across tokenizers)."""
        return self.groups[self.starts[i]:self.starts[i] + self.lengths[i]]


# ----------------------------------------------------------------------------------------------
# The tokenization cache
# ----------------------------------------------------------------------------------------------

def _fingerprint_memo(path: Path, cache_dir: Path) -> Path:
    """Where the content hash of `path` is remembered, per (path, size, mtime, inode)."""
    stat = path.stat()
    ident = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}".encode()).hexdigest()
    return cache_dir / "fingerprints" / ident[:32]


def file_fingerprint(path: Path, cache_dir: Path) -> str:
    """sha256 of the file's bytes; remembered (remember_fingerprint) once its cache is built, so
    that every trial does not re-read a gigabyte file to find its cache."""
    memo = _fingerprint_memo(path, cache_dir)
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def remember_fingerprint(path: Path, cache_dir: Path, fingerprint: str) -> None:
    memo = _fingerprint_memo(path, cache_dir)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}")
    tmp.write_text(fingerprint)
    tmp.replace(memo)


def cache_dir_for(path: str | Path, tokenizer, max_seq_len: int, cache_dir: str | Path,
                  system_turns: str = "keep") -> tuple[Path, str]:
    """(where the tokenized copy of `path` lives, whether or not it exists yet; the file's hash)."""
    path, cache_dir = Path(path), Path(cache_dir)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (set data.path or --data_path to a chat JSONL or Parquet file)")
    fingerprint = file_fingerprint(path, cache_dir)
    system = "" if system_turns == "keep" else f"|system_turns={system_turns}"   # keep: the keys caches had before
    key = hashlib.sha256(f"{CACHE_FORMAT}|{fingerprint}|{tokenizer_fingerprint(tokenizer)}|"
                         f"{max_seq_len}{system}".encode()).hexdigest()[:24]
    return cache_dir / "tokenized" / key, fingerprint


def open_tokenized(directory: Path) -> TokenizedData:
    """A built cache folder as TokenizedData, its token arrays memory-mapped read-only."""
    meta = json.loads((directory / "meta.json").read_text())
    lengths = np.load(directory / "lengths.npy")
    total = int(lengths.sum())
    return TokenizedData(
        tokens=np.memmap(directory / "tokens.bin", dtype=np.dtype(meta["token_dtype"]), mode="r", shape=(total,)),
        mask=np.memmap(directory / "mask.bin", dtype=bool, mode="r", shape=(total,)),
        starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
        lengths=lengths, target_counts=np.load(directory / "targets.npy"), identity=directory.name)


def cache_meta(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())


UNKNOWN_WARN_SHARE = 0.01     # above this share of assistant tokens being <unk>, the tokenizer cannot spell the data


def unknown_share(meta: dict) -> float:
    """The share of a cache's assistant tokens that are the tokenizer's unknown token."""
    return meta["unknown_assistant_tokens"] / max(meta["assistant_tokens"], 1)


def unknown_token_warning(meta: dict) -> str | None:
    """The warning line for a cache whose assistant tokens are too often the unknown token, else None."""
    share = unknown_share(meta)
    if share <= UNKNOWN_WARN_SHARE:
        return None
    return (f"WARNING: {100 * share:.1f}% of the assistant tokens of {meta['source']} are the tokenizer's unknown "
            f"token {meta['unk_token']!r}: this tokenizer cannot spell the data, and the models would learn to emit "
            "it; use a tokenizer that covers the data's characters (a byte-level BPE never has unknowns)")


def _verified(target: Path) -> bool:
    """Whether a built token cache still matches its checksums; a damaged one is moved out of the
    way (a warning says so) for the caller to rebuild."""
    damaged = ingest.damaged_blocks(target)
    if not damaged:
        return True
    log.warning("WARNING: token cache %s is damaged on disk (%s do not match the checksums written with them): "
                "rebuilding it", target, "; ".join(damaged[:4]))
    shutil.rmtree(target, ignore_errors=True)
    return False


def tokenize_cached(path: str | Path, tokenizer, max_seq_len: int, cache_dir: str | Path, fmt: str = "auto",
                    workers: int = 0, system_turns: str = "keep", verify: bool = False) -> TokenizedData:
    """Tokenized `path`, from the on-disk cache when present, else built once (streaming, under a
    lock so concurrent trials wait for one build) and cached atomically. system_turns: data.system_turns;
    verify: check a cache found on disk against its checksums (the planning process, once per search;
    trials do not), rebuilding a damaged one."""
    target, fingerprint = cache_dir_for(path, tokenizer, max_seq_len, cache_dir, system_turns)
    if verify or not (target / "meta.json").is_file():
        with ingest.file_lock(ingest.build_lock_path(target), building=f"the token cache of {path}"):
            if not (target / "meta.json").is_file() or (verify and not _verified(target)):
                path = Path(path)
                meta = ingest.build(path, resolve_format(path, fmt), tokenizer, max_seq_len, target,
                                    {"source": str(path), "max_seq_len": max_seq_len, "system_turns": system_turns},
                                    workers=workers, system_turns=system_turns)
                notes = [f"{meta[k]} {k.replace('_', ' ')}" for k in
                         ("skipped_no_assistant", "truncated", "dropped_after_truncation") if meta[k]]
                if notes:
                    log.warning("data %s: %s (max_seq_len=%d; raise data.max_seq_len to keep long conversations whole)",
                                path, ", ".join(notes), max_seq_len)
                log.info("data %s: tokenized %d conversations, %d tokens in %.1f s -> %s", path, meta["examples"],
                         meta["tokens"], meta["seconds"], target)
                if unknown_token_warning(meta):
                    log.warning("%s", unknown_token_warning(meta))
    remember_fingerprint(Path(path), Path(cache_dir), fingerprint)
    return open_tokenized(target)


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
    input_ids, labels = padded(data, indices, pad_id)
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "num_tokens": int(data.lengths[np.asarray(indices, dtype=np.int64)].sum()),
             "indices": np.asarray(indices, dtype=np.int64)}   # which examples: the teacher cache's rows
    if data.teacher is not None:
        batch.update(aligned_batch(data, indices))
    return batch


def padded(data: TokenizedData, indices: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) (B, T) of the examples, right-padded."""
    examples = [data.example(int(i)) for i in indices]
    width = max(len(ids) for ids, _ in examples)
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(ids)] = np.where(mask, ids.astype(np.int64), IGNORE_INDEX)
    return input_ids, labels


def aligned_batch(data: TokenizedData, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """Across tokenizers: the teacher's rendering of the batch (teacher_input_ids, teacher_labels;
    its padding is never scored, so id 0 pads it) and each side's groups (B, T), numbered through
    the batch (an example's groups after the previous example's), -1 off group."""
    teacher_ids, teacher_labels = padded(data.teacher, indices, 0)
    sides = {"student_groups": data, "teacher_groups": data.teacher}
    out = {name: np.full((len(indices), max(int(side.lengths[int(i)]) for i in indices)), -1, dtype=np.int64)
           for name, side in sides.items()}
    offset = 0
    for row, i in enumerate(int(i) for i in indices):
        own = [side.example_groups(i).astype(np.int64) for side in sides.values()]
        for (name, array), g in zip(out.items(), own):
            array[row, :len(g)] = np.where(g >= 0, g + offset, -1)
        offset += int(max(own[0].max(initial=-1), own[1].max(initial=-1))) + 1
    return {"teacher_input_ids": torch.from_numpy(teacher_ids), "teacher_labels": torch.from_numpy(teacher_labels),
            **{name: torch.from_numpy(array) for name, array in out.items()}}


class BatchList(torch.utils.data.Dataset):
    """A fixed list of batches for a DataLoader (batch_size=None): workers collate in parallel."""

    def __init__(self, data: TokenizedData, batches: list[np.ndarray], pad_id: int):
        self.data, self.batches, self.pad_id = data, batches, pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return collate(self.data, self.batches[i], self.pad_id)


def padding_id(tokenizer) -> int:
    """The id batches are padded with: the pad token, else end-of-sequence (pads carry no label)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
