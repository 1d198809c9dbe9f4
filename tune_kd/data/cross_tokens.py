"""Two tokenizers, one conversation: both models' tokens and which of them spell the same text.

Cross-tokenizer distillation (a teacher and a student whose tokenizers differ) compares the two
models on stretches of an assistant reply that both tokenizations cut at the same place. Each
conversation is rendered with EACH model's own chat template and tokenized with EACH tokenizer
(chat_template.ChatRenderer, the single-tokenizer path's renderer and mask: the student's ids and
mask are exactly what ingest.encode_conversations gives). Then, reply by reply, the tokens are
put into *groups*: runs of student tokens and teacher tokens that spell the same bytes.

The alignment rules (byte_align.py says them in full): within each reply, the text each template
rendered (whitespace at its ends left out) is walked on both sides by token end byte, and a group
closes where both sides end on the same byte; the lead joins the first group; each side's
end-of-turn tokens form one more group; replies the two templates render differently (beyond
leading/trailing whitespace) and groups cut by max_seq_len or holding an unscored token are -1.

Training scores position t's logit against token t+1 where the mask is True; group ids are per
token (the token being predicted), so the consumer takes `groups[1:][mask[1:]]` in target order.
Every grouped token is masked, and (but for dropped groups) every masked token is grouped.

The cache (tokenize_pair_cached) lives under `<cache_dir>/tokenized_pair/<key>/`: `student/` and
`teacher/` each hold tokenized.py's layout (tokens.bin, mask.bin, lengths.npy, targets.npy,
meta.json with block checksums) plus groups.npy, and meta.json beside them holds the stats. This
first version reads the file chunk by chunk but holds the arrays in memory until they are written,
in one process: no worker pool and no flat-memory streaming yet.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tune_kd.config.errors import UserError
from tune_kd.config.files import disk_writes, file_checksums, permit_as_umask
from tune_kd.data import ingest, tokenized
from tune_kd.data.byte_align import SIDES, align_conversation, encode_side, reply_markers
from tune_kd.data.chat_formats import DataError, parse_chunk, read_chunks, resolve_format
from tune_kd.data.chat_template import ChatRenderer

log = logging.getLogger(__name__)

PAIR_FORMAT = 1          # bump when the cached pair arrays change meaning


# ----------------------------------------------------------------------------------------------
# The tokenizers: checked before any work
# ----------------------------------------------------------------------------------------------

def _named(role: str, tokenizer) -> str:
    """'student tokenizer /path/dir' (or 'student tokenizer' for one built in memory)."""
    where = getattr(tokenizer, "name_or_path", "") or ""
    return f"{role} tokenizer {where}".rstrip()


def _renderer(role: str, tokenizer, system_turns: str) -> ChatRenderer:
    """The side's ChatRenderer; a UserError naming the side for what alignment cannot use."""
    name = _named(role, tokenizer)
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(f"{name}: a slow (Python) tokenizer gives no character offsets, which aligning the two "
                        "tokenizations needs; save the tokenizer with its tokenizer.json (a fast tokenizer) or load "
                        "it with use_fast=True")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{name}: no chat template, and each model's replies are rendered with its own template; add "
                        "a chat_template.jinja, or chat_template in tokenizer_config.json")
    try:
        return ChatRenderer(tokenizer, system_turns)
    except UserError as exc:
        raise UserError(f"{name}: {exc}") from None


def pair_renderers(student_tokenizer, teacher_tokenizer, system_turns: str = "keep"):
    """(student renderer, teacher renderer), both checked as check_pair says."""
    return tuple(_renderer(role, tok, system_turns) for role, tok in zip(SIDES, (student_tokenizer, teacher_tokenizer)))


def check_pair(student_tokenizer, teacher_tokenizer, system_turns: str = "keep") -> None:
    """Raise a one-line UserError, naming the side and its directory, for a tokenizer without
    character offsets (slow: is_fast False or no backend_tokenizer), without a chat template, or
    whose template ChatRenderer refuses (its own probes' messages)."""
    pair_renderers(student_tokenizer, teacher_tokenizer, system_turns)


# ----------------------------------------------------------------------------------------------
# A batch of conversations
# ----------------------------------------------------------------------------------------------

@dataclass
class PairEncoded:
    """The kept examples of a batch, both sides back to back, example i on each side the same
    conversation. student/teacher: ingest.Encoded (tokens, mask, lengths, targets; stats truncated,
    assistant_tokens, unknown_assistant_tokens as ingest counts them)."""

    student: ingest.Encoded
    teacher: ingest.Encoded
    student_groups: np.ndarray          # (student total,) int32, -1 off group
    teacher_groups: np.ndarray          # (teacher total,) int32
    stats: collections.Counter = field(default_factory=collections.Counter)


def _encoded(rows: list[tuple[np.ndarray, np.ndarray]], token_dtype, stats: collections.Counter) -> ingest.Encoded:
    empty = lambda dtype: np.zeros(0, dtype)  # noqa: E731
    return ingest.Encoded(np.concatenate([ids for ids, _ in rows]) if rows else empty(token_dtype),
                          np.concatenate([m for _, m in rows]) if rows else empty(bool),
                          np.array([len(ids) for ids, _ in rows], dtype=np.int64),
                          np.array([int(m[1:].sum()) for _, m in rows], dtype=np.int64), stats)


def encode_pair(student_renderer: ChatRenderer, teacher_renderer: ChatRenderer, conversations: list[list[dict]],
                max_seq_len: int, token_dtypes: tuple, where: list[str] | None = None) -> PairEncoded:
    """Render, tokenize, mask and align `conversations` on both sides (the module's rules), truncate
    each side to max_seq_len, and keep an example only where both sides keep an assistant token past
    position 0 and at least one group survives. token_dtypes: (student's, teacher's); where: each
    conversation's file:line, for the DataError (naming the side) of one a template cannot render. The student's
    ids and mask equal ingest.encode_conversations' for the kept examples. Stats: conversations,
    kept, dropped_after_truncation, no_aligned_group, replies, replies_unaligned, mismatched_replies,
    student_rewrites, teacher_rewrites, groups, kept_replies, groups_cut, groups_unmasked, and per side
    {side}_truncated, {side}_assistant_tokens, {side}_grouped_tokens (kept examples)."""
    where = where or [f"conversation {i}" for i in range(len(conversations))]
    renderers = (student_renderer, teacher_renderer)
    sides = [encode_side(r, conversations, dtype, [f"{w} ({_named(role, r.tokenizer)})" for w in where])
             for role, r, dtype in zip(SIDES, renderers, token_dtypes)]
    markers = [reply_markers(r) for r in renderers]
    stats = collections.Counter(conversations=len(conversations))
    side_stats = [collections.Counter(), collections.Counter()]
    rows, group_rows = ([], []), ([], [])
    for i, turns in enumerate(conversations):
        replies = [turn["content"] for turn in turns if turn["role"] == "assistant"]
        pair = (sides[0][i], sides[1][i])
        groups = align_conversation(*pair, replies, markers, max_seq_len, stats)
        kept = [(s.ids[:max_seq_len], s.mask[:max_seq_len]) for s in pair]
        for s, counter in zip(pair, side_stats):
            counter["truncated"] += len(s.ids) > max_seq_len
        if not all(mask[1:].any() for _, mask in kept):
            stats["dropped_after_truncation"] += 1
            continue
        groups = [g[:max_seq_len] for g in groups]
        if groups[0].max(initial=-1) < 0:
            stats["no_aligned_group"] += 1
            continue
        stats["kept"] += 1
        stats["groups"] += int(groups[0].max()) + 1
        stats["kept_replies"] += len(replies)
        for role, renderer, (ids, mask), g, counter, out, gout in zip(SIDES, renderers, kept, groups, side_stats,
                                                                       rows, group_rows):
            counter["assistant_tokens"] += int(mask.sum())
            unk = renderer.tokenizer.unk_token_id
            if unk is not None:
                counter["unknown_assistant_tokens"] += int((ids[mask] == unk).sum())
            stats[f"{role}_grouped_tokens"] += int((g >= 0).sum())
            out.append((ids, mask))
            gout.append(g)
    for role, counter in zip(SIDES, side_stats):
        stats[f"{role}_truncated"] += counter["truncated"]
        stats[f"{role}_assistant_tokens"] += counter["assistant_tokens"]
    concat = lambda arrays: np.concatenate(arrays) if arrays else np.zeros(0, np.int32)  # noqa: E731
    return PairEncoded(*(_encoded(r, dtype, c) for r, dtype, c in zip(rows, token_dtypes, side_stats)),
                       concat(group_rows[0]), concat(group_rows[1]), stats)


def alignment_summary(stats: dict) -> str:
    """One log line: examples kept, groups per reply, the share of each side's assistant tokens in
    groups, and the replies that aligned to nothing (and why, where the templates rewrote them)."""
    def share(role: str) -> float:
        return 100 * stats.get(f"{role}_grouped_tokens", 0) / max(stats.get(f"{role}_assistant_tokens", 0), 1)

    dropped = [f"{stats[k]} {k.replace('_', ' ')}" for k in ("dropped_after_truncation", "no_aligned_group")
               if stats.get(k)]
    line = (f"cross-tokenizer alignment: kept {stats.get('kept', 0)} of {stats.get('conversations', 0)} examples"
            f"{' (' + ', '.join(dropped) + ')' if dropped else ''}; "
            f"{stats.get('groups', 0) / max(stats.get('kept_replies', 0), 1):.1f} groups per reply; assistant tokens in "
            f"groups: student {share('student'):.1f}%, teacher {share('teacher'):.1f}%; "
            f"{stats.get('replies_unaligned', 0)} of {stats.get('replies', 0)} replies aligned to nothing")
    if stats.get("mismatched_replies"):
        line += f" ({stats['mismatched_replies']} rendered differently by the two chat templates)"
    return line


def _nothing_aligned(stats: dict, path: Path, tokenizers, max_seq_len: int) -> UserError:
    """The one line for a file of which no example kept an aligned group, naming the cause."""
    if stats.get("mismatched_replies", 0) >= stats.get("replies", 0) > 0:
        rewriters = [_named(role, tok) for role, tok in zip(SIDES, tokenizers) if stats.get(f"{role}_rewrites")]
        return UserError(f"{path}: no assistant reply aligns between the two tokenizations: the chat template of the "
                         f"{' and of the '.join(rewriters) or 'two tokenizers'} renders the replies differently from "
                         "the data (beyond leading/trailing whitespace); use templates that write each reply as given")
    if stats.get("dropped_after_truncation", 0) >= stats.get("conversations", 0):
        return ingest.SeqLenError(f"data.max_seq_len: {max_seq_len} tokens keeps no assistant token of "
                                  f"any conversation of {path} on both sides (each of the two renderings must keep one; "
                                  "raise data.max_seq_len)")
    return UserError(f"{path}: no example keeps a stretch of reply that both tokenizers cut at the same place "
                     f"({alignment_summary(stats)}); raise data.max_seq_len or check the two chat templates")


# ----------------------------------------------------------------------------------------------
# Cached on disk
# ----------------------------------------------------------------------------------------------

class PairExample(NamedTuple):
    student_ids: np.ndarray
    student_mask: np.ndarray
    student_groups: np.ndarray
    teacher_ids: np.ndarray
    teacher_mask: np.ndarray
    teacher_groups: np.ndarray


@dataclass(frozen=True)
class PairData:
    """Example i on both sides: student's TokenizedData (what the rest of training reads, unchanged),
    the teacher's for the same examples in the same order, and each side's group ids, parallel to
    that side's tokens (indexed through its starts, so a subset shares them)."""

    student: tokenized.TokenizedData
    teacher: tokenized.TokenizedData
    student_groups: np.ndarray          # (student total,) int32, -1 off group
    teacher_groups: np.ndarray          # (teacher total,) int32

    def __len__(self) -> int:
        return len(self.student)

    def subset(self, indices: np.ndarray) -> "PairData":
        """The examples at `indices` on both sides, as TokenizedData.subset takes them."""
        return PairData(self.student.subset(indices), self.teacher.subset(indices), self.student_groups,
                        self.teacher_groups)

    def joined(self) -> tokenized.TokenizedData:
        """The student's TokenizedData carrying its groups and the teacher's side (with the teacher's
        groups): what a run's splits are across tokenizers (tokenized.collate batches both)."""
        teacher = dataclasses.replace(self.teacher, groups=self.teacher_groups)
        return dataclasses.replace(self.student, groups=self.student_groups, teacher=teacher)

    def example(self, i: int) -> PairExample:
        out = []
        for data, groups in ((self.student, self.student_groups), (self.teacher, self.teacher_groups)):
            ids, mask = data.example(i)
            out += [ids, mask, groups[data.starts[i]:data.starts[i] + data.lengths[i]]]
        return PairExample(*out)


def pair_cache_dir(path: str | Path, student_tokenizer, teacher_tokenizer, max_seq_len: int, cache_dir: str | Path,
                   fmt: str, system_turns: str) -> tuple[Path, str]:
    """(where the pair cache of `path` lives, the file's hash): the key hashes PAIR_FORMAT, the file's
    bytes, its resolved format, both tokenizers' fingerprints (student first), max_seq_len and system_turns."""
    path, cache_dir = Path(path), Path(cache_dir)
    fmt = resolve_format(path, fmt)   # DataError for a missing file
    fingerprint = tokenized.file_fingerprint(path, cache_dir)
    parts = [PAIR_FORMAT, fingerprint, fmt, tokenized.tokenizer_fingerprint(student_tokenizer),
             tokenized.tokenizer_fingerprint(teacher_tokenizer), max_seq_len, system_turns]
    key = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]
    return cache_dir / "tokenized_pair" / key, fingerprint


def _write_side(directory: Path, encoded: ingest.Encoded, groups: np.ndarray, tokenizer, meta: dict) -> None:
    """One side in tokenized.py's layout (open_tokenized reads it) plus groups.npy, with checksums."""
    directory.mkdir()
    encoded.tokens.tofile(directory / "tokens.bin")
    encoded.mask.tofile(directory / "mask.bin")
    for name, array in (("lengths.npy", encoded.lengths), ("targets.npy", encoded.targets), ("groups.npy", groups)):
        np.save(directory / name, array)
    checksums = {p.name: file_checksums(p) for p in sorted(directory.iterdir())}
    (directory / "meta.json").write_text(json.dumps({
        **meta, "token_dtype": encoded.tokens.dtype.name, "examples": len(encoded.lengths),
        "tokens": int(encoded.lengths.sum()), "unk_token": tokenizer.unk_token,
        **{k: encoded.stats[k] for k in ("truncated", "assistant_tokens", "unknown_assistant_tokens")},
        "checksums": checksums}, indent=1))


def _build(path: Path, fmt: str, tokenizers, renderers, max_seq_len: int, system_turns: str, target: Path) -> dict:
    """Encode the whole file and write its pair cache to `target` through a temporary sibling."""
    started = time.perf_counter()
    dtypes = tuple(ingest.token_dtype_for(len(tok)) for tok in tokenizers)
    parts = []
    for chunk in read_chunks(path, ingest.CHUNK_CONVERSATIONS):
        conversations, where, skipped = parse_chunk(chunk, fmt, system_turns)
        parts.append(encode_pair(*renderers, conversations, max_seq_len, dtypes, where))
        parts[-1].stats["skipped_no_assistant"] += skipped
    stats = sum((p.stats for p in parts), collections.Counter())
    if not stats["conversations"]:
        raise DataError(f"{path}: no usable conversation (the file is empty or no record has an assistant turn)")
    if not stats["kept"]:
        raise _nothing_aligned(stats, path, tokenizers, max_seq_len)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        meta = {"source": str(path), "format": fmt, "max_seq_len": max_seq_len, "system_turns": system_turns}
        with disk_writes(target, 2 * path.stat().st_size):
            for s, role in enumerate(SIDES):
                encoded = [getattr(p, role) for p in parts]
                whole = ingest.Encoded(*(np.concatenate([getattr(e, k) for e in encoded])
                                         for k in ("tokens", "mask", "lengths", "targets")),
                                       sum((e.stats for e in encoded), collections.Counter()))
                groups = np.concatenate([getattr(p, f"{role}_groups") for p in parts])
                _write_side(tmp / role, whole, groups, tokenizers[s], {**meta, "role": role})
            meta.update(stats=dict(stats), seconds=round(time.perf_counter() - started, 3))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for directory in (tmp, tmp / "student", tmp / "teacher"):
            permit_as_umask(directory)   # mkdtemp made it 0700: the group reads the cache as the umask says
        if target.exists() and not (target / "meta.json").is_file():   # a broken copy: replaced, never read
            shutil.rmtree(target)
        if not target.exists():   # else another process built the same key meanwhile: theirs is identical
            tmp.rename(target)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pair_meta(directory: Path) -> dict:
    """A built pair cache's alignment stats (alignment_summary reads them)."""
    return json.loads((Path(directory) / "meta.json").read_text())["stats"]


def open_pair(directory: Path) -> PairData:
    """A built pair cache folder as PairData, every array memory-mapped read-only."""
    sides = [dataclasses.replace(tokenized.open_tokenized(directory / role), identity=f"{directory.name}-{role}")
             for role in SIDES]
    groups = [np.load(directory / role / "groups.npy", mmap_mode="r") for role in SIDES]
    return PairData(sides[0], sides[1], groups[0], groups[1])


def _intact(target: Path) -> bool:
    """Whether both sides of a built pair cache match their checksums; a damaged one is removed."""
    damaged = [f"{role}/{d}" for role in SIDES for d in ingest.damaged_blocks(target / role)]
    if damaged:
        log.warning("WARNING: pair token cache %s is damaged on disk (%s): rebuilding it", target,
                    "; ".join(damaged[:4]))
        shutil.rmtree(target, ignore_errors=True)
    return not damaged


def tokenize_pair_cached(path: str | Path, student_tokenizer, teacher_tokenizer, max_seq_len: int,
                         cache_dir: str | Path, fmt: str = "auto", system_turns: str = "keep",
                         verify: bool = False) -> PairData:
    """`path` tokenized by both tokenizers and aligned, from `<cache_dir>/tokenized_pair/<key>/`
    when built, else built once under a lock (concurrent processes wait for one build) and written
    whole or not at all. The tokenizers are checked first (check_pair); verify: check a cache found on
    disk against its checksums, rebuilding a damaged one. A file of which no example aligns is a
    UserError naming the cause (templates that rewrite the replies, or max_seq_len)."""
    path = Path(path)
    renderers = pair_renderers(student_tokenizer, teacher_tokenizer, system_turns)   # check_pair's checks, first
    target, fingerprint = pair_cache_dir(path, student_tokenizer, teacher_tokenizer, max_seq_len, cache_dir, fmt,
                                         system_turns)
    if verify or not (target / "meta.json").is_file():
        with ingest.file_lock(ingest.build_lock_path(target), building=f"the pair token cache of {path}"):
            if not (target / "meta.json").is_file() or (verify and not _intact(target)):
                meta = _build(path, resolve_format(path, fmt), (student_tokenizer, teacher_tokenizer), renderers,
                              max_seq_len, system_turns, target)
                lost = any(meta["stats"].get(k) for k in ("dropped_after_truncation", "no_aligned_group",
                                                          "replies_unaligned"))
                log.log(logging.WARNING if lost else logging.INFO, "data %s: %s; %.1f s -> %s", path,
                        alignment_summary(meta["stats"]), meta["seconds"], target)
    tokenized.remember_fingerprint(path, Path(cache_dir), fingerprint)
    return open_pair(target)

