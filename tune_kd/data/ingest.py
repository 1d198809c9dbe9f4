"""Streaming ingestion: a chat file of any size -> token ids + assistant mask, on disk, in flat memory.

`build(path, fmt, tokenizer, max_seq_len, target)` reads the file in chunks (chat_formats), and for
each chunk validates the records, renders every conversation once with the tokenizer's chat
template, tokenizes the chunk in one batch and marks the assistant tokens; the chunks' arrays are
appended to files in a temporary folder next to `target`, renamed into place at the end. Worker
processes do the per-chunk work; the parent only reads lines and appends results, in file order,
with a bounded number of chunks in flight, so memory stays flat whatever the file size and the
output is byte-identical whatever the chunk size and the number of workers. An error (a bad line,
named file:line), a full disk (one line, config/files.disk_writes) or Ctrl-C leaves no partial cache
behind. meta.json keeps a hash per block of every file, computed as the bytes are appended
(damaged_blocks checks them, for tokenized.tokenize_cached).

Rendering and the assistant spans are chat_template.py's (ChatRenderer): a template the renderer
refuses fails in the parent before any work; a data conversation it cannot render or place is a
DataError naming its file:line. Before the full pass, the first SAMPLE_CONVERSATIONS conversations are
tokenized on their own (check_max_seq_len): a data.max_seq_len that keeps no assistant token of any of
them fails in a second, saying what would fit, instead of after the whole file.

Builds shared between processes (this cache, the teacher cache, top_k auto's measurement, the
embedded demo) run under file_lock: the holder writes its pid and what it builds into the lock file,
and a process waiting on it says whom it waits for, at once and then every LOCK_WAIT_REPORT_S.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tune_kd.config.files import BlockChecksums, disk_writes, file_checksums, permit_as_umask, verify_blocks
from tune_kd.data.chat_formats import Chunk, DataError, parse_chunk, read_chunks
from tune_kd.data.chat_template import ChatRenderer

log = logging.getLogger(__name__)

CHUNK_CONVERSATIONS = 1024       # records per chunk: large enough to batch the tokenizer, small in memory
IN_FLIGHT_PER_WORKER = 2         # chunks queued per worker: keeps workers busy, memory bounded
SMALL_FILE_BYTES = 8 << 20       # below this, worker start-up costs more than it saves: run in-process
MAX_WORKERS = 8
SAMPLE_CONVERSATIONS = 64        # read first to check data.max_seq_len: a wrong value fails in a second, not
                                 # after tokenizing the whole file


# ----------------------------------------------------------------------------------------------
# One chunk: conversations -> arrays
# ----------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """A chunk's kept examples back to back, and what happened to the rest."""

    tokens: np.ndarray                  # (total,) token dtype
    mask: np.ndarray                    # (total,) bool, True on assistant tokens
    lengths: np.ndarray                 # (n,) int64
    targets: np.ndarray                 # (n,) int64: scored positions (assistant tokens past position 0)
    stats: collections.Counter = field(default_factory=collections.Counter)


def _first_token_from(encoding, count: int, char: int, use_end: bool) -> int:
    """The first token whose start (use_end: end) is >= char (else > char for use_end), by binary
    search: token offsets are non-decreasing, so one bisection finds a span's edge."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        start, end = encoding.token_to_chars(mid)
        if (end > char) if use_end else (start >= char):
            hi = mid
        else:
            lo = mid + 1
    return lo


def assistant_mask(encoding, spans: list[tuple[int, int]]) -> np.ndarray:
    """(T,) bool: True on the tokens whose characters lie inside one of `spans`."""
    count = len(encoding.ids)
    mask = np.zeros(count, dtype=bool)
    for lo, hi in spans:
        first = _first_token_from(encoding, count, lo, use_end=False)     # start >= lo
        stop = _first_token_from(encoding, count, hi, use_end=True)       # tokens before it end <= hi
        mask[first:stop] = True
    return mask


def encode_conversations(renderer: ChatRenderer, conversations: list[list[dict]], max_seq_len: int,
                         token_dtype, where: list[str] | None = None) -> Encoded:
    """Render, tokenize (one batch) and mask `conversations`; truncate to max_seq_len and drop an
    example left without an assistant token past position 0 (position 0 is never predicted).
    where: each conversation's file:line, for the DataError of one the template cannot render."""
    texts, spans = [], []
    for i, turns in enumerate(conversations):
        text, found = renderer.rendered(turns, where[i] if where else f"conversation {i}")
        texts.append(text)
        spans.append(found)
    encodings = renderer.backend.encode_batch(texts, add_special_tokens=False)
    unk = renderer.tokenizer.unk_token_id
    ids_out, masks_out, stats = [], [], collections.Counter()
    for found, encoding in zip(spans, encodings):
        ids = np.asarray(encoding.ids, dtype=token_dtype)
        mask = assistant_mask(encoding, found)
        if len(ids) > max_seq_len:
            stats["truncated"] += 1
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not mask[1:].any():
            stats["dropped_after_truncation"] += 1
            continue
        stats["assistant_tokens"] += int(mask.sum())
        if unk is not None:
            stats["unknown_assistant_tokens"] += int((ids[mask] == unk).sum())
        ids_out.append(ids)
        masks_out.append(mask)
    lengths = np.array([len(x) for x in ids_out], dtype=np.int64)
    targets = np.array([int(m[1:].sum()) for m in masks_out], dtype=np.int64)
    empty = lambda dtype: np.zeros(0, dtype)  # noqa: E731
    return Encoded(np.concatenate(ids_out) if ids_out else empty(token_dtype),
                   np.concatenate(masks_out) if masks_out else empty(bool), lengths, targets, stats)


class SeqLenError(DataError):
    """No conversation keeps an assistant token within data.max_seq_len. Its message starts with
    the key ("data.max_seq_len: ..."), so a caller that knows where the config set it (search/prepare.py)
    prefixes that file:line."""

    key = "data.max_seq_len"


def check_max_seq_len(path: Path, fmt: str, renderer: ChatRenderer, max_seq_len: int, token_dtype,
                      system_turns: str) -> None:
    """Raise SeqLenError when not one of the file's first SAMPLE_CONVERSATIONS conversations would
    keep an assistant token within max_seq_len (encode_conversations' rule, the full build's), naming
    the sample's lengths and the value that would fit them. A sample with no conversation passes:
    the full build says what is wrong with such a file."""
    with contextlib.closing(read_chunks(path, SAMPLE_CONVERSATIONS)) as chunks:
        chunk = next(chunks, None)
    if chunk is None:
        return
    conversations, where, _ = parse_chunk(chunk, fmt, system_turns)
    if not conversations or len(encode_conversations(renderer, conversations, max_seq_len, token_dtype, where).lengths):
        return
    whole = encode_conversations(renderer, conversations, 2**62, token_dtype, where)   # untruncated
    if not len(whole.lengths):   # no assistant token even untruncated: the full build names the problem
        return
    ends = np.cumsum(whole.lengths)
    # the least max_seq_len that keeps each one: its first assistant token past position 0, plus one
    least = [int(np.flatnonzero(m[1:])[0]) + 2 for m in np.split(whole.mask, ends[:-1])]
    raise SeqLenError(
        f"data.max_seq_len: {max_seq_len} tokens keeps no assistant token of any of the first {len(conversations)} "
        f"conversations of {path} (they are {whole.lengths.min()} to {whole.lengths.max()} tokens long; the earliest "
        f"assistant token is at position {min(least) - 1}): set data.max_seq_len to at least {whole.lengths.max()} to "
        f"keep them whole ({min(least)} is the least that keeps any)")


# ----------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _start_worker(tokenizer, fmt: str, max_seq_len: int, token_dtype, system_turns: str,
                  renderer: ChatRenderer | None = None) -> None:
    """Per process: one renderer (the parent's own when it runs in-process), and Ctrl-C left to the
    parent (which tears the pool down)."""
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(renderer=renderer or ChatRenderer(tokenizer, system_turns), fmt=fmt, max_seq_len=max_seq_len,
                   token_dtype=token_dtype, system_turns=system_turns)


def _encode_chunk(chunk: Chunk) -> Encoded:
    conversations, where, skipped = parse_chunk(chunk, _WORKER["fmt"], _WORKER["system_turns"])
    encoded = encode_conversations(_WORKER["renderer"], conversations, _WORKER["max_seq_len"], _WORKER["token_dtype"],
                                   where)
    encoded.stats.update(conversations=len(conversations), skipped_no_assistant=skipped)
    return encoded


def worker_count(requested: int, path: Path) -> int:
    """requested > 0 as given; 0 (auto): one per CPU core (at most MAX_WORKERS), 1 for small files."""
    if requested > 0:
        return requested
    if path.stat().st_size < SMALL_FILE_BYTES:
        return 1
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _encoded_chunks(path: Path, fmt: str, tokenizer, max_seq_len: int, token_dtype, workers: int, chunk_size: int,
                    system_turns: str, renderer: ChatRenderer):
    """Every chunk's Encoded, in file order; renderer: the parent's (workers build their own)."""
    chunks = read_chunks(path, chunk_size)
    if workers <= 1:
        _start_worker(tokenizer, fmt, max_seq_len, token_dtype, system_turns, renderer)
        yield from map(_encode_chunk, chunks)
        return
    # spawn, not fork: the parent may hold threads (tokenizers, torch, Ray) that a fork would break
    context = multiprocessing.get_context("spawn")
    initargs = (tokenizer, fmt, max_seq_len, token_dtype, system_turns)
    with context.Pool(workers, initializer=_start_worker, initargs=initargs) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------
# The cache folder
# ----------------------------------------------------------------------------------------------

def token_dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def build(path: Path, fmt: str, tokenizer, max_seq_len: int, target: Path, meta: dict,
          workers: int = 0, chunk_size: int | None = None, system_turns: str = "keep") -> dict:
    """Write the tokenized cache of `path` to `target` (tokens.bin, mask.bin, lengths.npy,
    targets.npy, meta.json) through a temporary sibling folder; returns the meta written.
    workers: 0 for worker_count's choice; chunk_size: records per chunk (CHUNK_CONVERSATIONS);
    system_turns: data.system_turns (chat_formats.system_turns)."""
    started = time.perf_counter()
    chunk_size = chunk_size or CHUNK_CONVERSATIONS
    token_dtype = token_dtype_for(len(tokenizer))
    renderer = ChatRenderer(tokenizer, system_turns)   # here first: a template tune_kd cannot use fails at once
    check_max_seq_len(path, fmt, renderer, max_seq_len, token_dtype, system_turns)
    workers = worker_count(workers, path)
    created = [d for d in (target.parent, *target.parent.parents) if not d.exists()]   # removed again on failure
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    finished = False
    try:
        lengths, targets, stats = [], [], collections.Counter()
        sums = {"tokens.bin": BlockChecksums(), "mask.bin": BlockChecksums()}
        # the tokens take about as many bytes as the file's text (a token is a few characters, 2-4 bytes)
        with disk_writes(target, path.stat().st_size), \
                open(tmp / "tokens.bin", "wb") as tokens_file, open(tmp / "mask.bin", "wb") as mask_file:
            for encoded in _encoded_chunks(path, fmt, tokenizer, max_seq_len, token_dtype, workers, chunk_size,
                                           system_turns, renderer):
                for name, handle, array in (("tokens.bin", tokens_file, encoded.tokens),
                                            ("mask.bin", mask_file, encoded.mask)):
                    data = array.tobytes()
                    handle.write(data)
                    sums[name].add(data)
                lengths.append(encoded.lengths)
                targets.append(encoded.targets)
                stats.update(encoded.stats)
        lengths, targets = np.concatenate(lengths), np.concatenate(targets)
        if not stats["conversations"]:
            raise DataError(f"{path}: no usable conversation (the file is empty or no record has an assistant turn)")
        if not len(lengths):
            raise SeqLenError(f"data.max_seq_len: {max_seq_len} tokens keeps no assistant token of any conversation "
                              f"of {path} (raise data.max_seq_len, or check the file has assistant turns)")
        with disk_writes(target, path.stat().st_size):
            np.save(tmp / "lengths.npy", lengths)
            np.save(tmp / "targets.npy", targets)
        checksums = {**{name: s.to_json() for name, s in sums.items()},
                     **{name: file_checksums(tmp / name) for name in ("lengths.npy", "targets.npy")}}
        meta = {**meta, "format": fmt, "token_dtype": np.dtype(token_dtype).name, "examples": len(lengths),
                "tokens": int(lengths.sum()), "conversations": stats["conversations"],
                **{key: stats[key] for key in ("skipped_no_assistant", "truncated", "dropped_after_truncation",
                                               "assistant_tokens", "unknown_assistant_tokens")},
                "unk_token": tokenizer.unk_token, "workers": workers, "seconds": round(time.perf_counter() - started, 3)}
        meta["bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        with disk_writes(target, path.stat().st_size):
            (tmp / "meta.json").write_text(json.dumps({**meta, "checksums": checksums}, indent=1))
        permit_as_umask(tmp)   # mkdtemp made it 0700: the group reads the cache as the umask says
        if target.exists() and not (target / "meta.json").is_file():   # a broken copy: replaced, never read
            shutil.rmtree(target)
        if not target.exists():   # else another node built the same key meanwhile: theirs is identical
            tmp.rename(target)
        finished = True
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in [] if finished else created:   # leaf first: nothing of a failed build stays
            with contextlib.suppress(OSError):
                directory.rmdir()


def damaged_blocks(directory: Path) -> list[str]:
    """Each block of a token cache whose bytes no longer match the checksums written with them, as
    `file examples lo..hi` (the conversations whose tokens it holds; bytes for the small .npy
    files); [] when all match."""
    meta = json.loads((directory / "meta.json").read_text())
    problems = []
    for name, record in meta.get("checksums", {}).items():
        if not (directory / name).is_file():
            problems.append(f"{name} is missing")
            continue
        itemsize = {"tokens.bin": np.dtype(meta["token_dtype"]).itemsize, "mask.bin": 1}.get(name)
        for lo, hi in verify_blocks(directory / name, record):
            try:   # token index -> example, through the lengths (themselves perhaps the damaged file)
                ends = np.cumsum(np.load(directory / "lengths.npy"))
                first, last = np.searchsorted(ends, [lo // itemsize, (hi - 1) // itemsize], side="right")
                problems.append(f"{name} examples {first:,}..{min(last, len(ends) - 1):,}")
            except (TypeError, ValueError, OSError):   # itemsize None: a .npy file, named by bytes
                problems.append(f"{name} bytes {lo:,}..{hi - 1:,}")
    return problems


def build_lock_path(target: Path) -> Path:
    """Where the lock on building `target` lives: in the temporary directory, so a build that fails
    on bad input leaves nothing in the cache folder (one machine's processes share it)."""
    name = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / "tune_kd-locks" / name


# How long a process waiting on another's lock stays silent between "still waiting" lines (tests
# shrink it), and how often it tries the lock meanwhile: polling (LOCK_NB) rather than one blocking
# flock, so that the wait can say who it waits for; a build takes minutes, half a second is nothing.
LOCK_WAIT_REPORT_S = 30.0
LOCK_POLL_S = 0.5


def _waited(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def lock_holder(handle) -> str:
    """Who holds the lock whose file is open as `handle`, from the note the holder wrote into it
    (file_lock): "pid N (building X since HH:MM:SS)"; "another process" while there is no note yet."""
    handle.seek(0)
    try:
        note = json.loads(handle.read() or "null")
        since = time.strftime("%H:%M:%S", time.localtime(note["since"]))
        host = "" if note.get("host") == socket.gethostname() else f" on {note.get('host')}"
        return f"pid {note['pid']}{host} (building {note['building']} since {since})"
    except (ValueError, TypeError, KeyError):   # empty (taken a moment ago, or released) or foreign
        return "another process"


def _try_lock(handle) -> bool:
    """Take the exclusive lock on `handle` if no other process holds it; whether it was taken."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _acquire(handle, path: Path, building: str) -> None:
    """Take the exclusive lock on `handle`, saying while it waits: a first line once the lock stays
    taken past one poll (a wait of a moment says nothing), then one every LOCK_WAIT_REPORT_S."""
    if _try_lock(handle):
        return
    started = time.monotonic()
    report_at, reported = started + LOCK_POLL_S, False
    while True:
        time.sleep(LOCK_POLL_S)
        if _try_lock(handle):
            break
        now = time.monotonic()
        if now >= report_at:
            first = "" if reported else f" to release {path}"
            log.info("waiting for %s%s; waited %s", lock_holder(handle), first, _waited(now - started))
            report_at, reported = now + LOCK_WAIT_REPORT_S, True
    if reported:
        log.info("lock free after %s; going on with %s", _waited(time.monotonic() - started), building)


@contextlib.contextmanager
def file_lock(path: Path, building: str = "a build"):
    """An exclusive lock on the file `path` across processes: the first builds, the others wait
    and then read what it built. building: what the holder builds, in a few words ("the token
    cache of data/train.jsonl"); the holder writes it into the lock file with its pid and start
    time as JSON, and a waiter prints who it waits for and how long it has (_acquire)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+", never "w": opening must not erase the note of the process that holds the lock
    with open(path, "a+") as handle:
        _acquire(handle, path, building)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "building": building,
                                     "since": time.time()}))
            handle.flush()
            yield
        finally:
            handle.truncate(0)   # a waiter that reads between our release and its own note sees no stale holder
            fcntl.flock(handle, fcntl.LOCK_UN)
