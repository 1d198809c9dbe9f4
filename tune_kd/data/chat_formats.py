"""Chat files as people bring them -> validated conversations of {role, content} turns.

Three record layouts, one record per JSONL line or Parquet row:

    conversations  {"conversations": [{"role": "user", "content": "..."}, ...]}    (MiniMind's SFT files)
    messages       {"messages": [{"role": "user", "content": "..."}, ...]}         (OpenAI / TRL)
    sharegpt       {"conversations": [{"from": "human", "value": "..."}, ...]}     (ShareGPT: human/gpt/system)

`data.format: auto` decides per file from its first record; a record auto cannot place (no
`conversations` or `messages` list, or turns with neither role/content nor from/value) is an error
naming its line. Every later record must have the file's layout. Files ending in `.parquet` are
read by row groups (pyarrow); anything else is JSONL. Problems are `DataError`s located as
`file:line` (JSONL) or `file: row N` (Parquet), counted from 1.

Reading is streamed: `read_chunks` yields bounded chunks of raw lines or rows, so a file of any
size is read in constant memory; `parse_chunk` (run in the ingestion workers) validates them and
applies `data.system_turns` (`system_turns`: keep, fold into the next user turn, or drop) for chat
templates that refuse a system role.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tune_kd.config.errors import UserError

FORMATS = ("conversations", "messages", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MAX_LINE_BYTES = 16 * 1024 * 1024        # a single conversation larger than this is surely a broken file


class DataError(UserError):
    """A problem with a data file, located at file:line."""


@dataclass
class Chunk:
    """A run of consecutive records of one file: raw JSONL lines (bytes) or Parquet rows (dicts)."""

    path: str
    first: int              # 1-based line (JSONL) or row (Parquet) number of items[0]
    items: list
    parquet: bool

    def where(self, index: int) -> str:
        number = self.first + index
        return f"{self.path}: row {number}" if self.parquet else f"{self.path}:{number}"


def is_parquet(path: str | Path) -> bool:
    return str(path).lower().endswith(".parquet")


def read_chunks(path: str | Path, chunk_size: int) -> Iterator[Chunk]:
    """The file's records in chunks of up to `chunk_size` (lines or rows), in file order."""
    path = Path(path)
    if is_parquet(path):
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as exc:   # pyarrow's errors have no common base worth naming
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        first = 1
        for batch in table.iter_batches(batch_size=chunk_size):
            rows = batch.to_pylist()
            yield Chunk(str(path), first, rows, True)
            first += len(rows)
        return
    with path.open("rb") as handle:
        lines, first = [], 1
        for lineno, raw in enumerate(handle, start=1):
            if not lines:
                first = lineno
            lines.append(raw)
            if len(lines) == chunk_size:
                yield Chunk(str(path), first, lines, False)
                lines = []
        if lines:
            yield Chunk(str(path), first, lines, False)


def _record(chunk: Chunk, index: int) -> object | None:
    """Record `index` of the chunk, parsed; None for a blank JSONL line."""
    item = chunk.items[index]
    if chunk.parquet:
        return item
    if len(item) > MAX_LINE_BYTES:
        raise DataError(f"{chunk.where(index)}: line is {len(item)} bytes, over the {MAX_LINE_BYTES}-byte limit "
                        "(is this really one conversation per line?)")
    try:
        text = item.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{chunk.where(index)}: invalid UTF-8 at byte {exc.start} (re-encode the file as UTF-8)") from None
    if not text.strip():
        return None
    try:   # without the line break, a truncated record's error points into the line, not past it
        return json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{chunk.where(index)}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def detect_format(record: object) -> str | None:
    """The layout of one record, or None when it fits none of FORMATS."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list) and "conversations" not in record:
        return "messages"
    turns = record.get("conversations")
    if "messages" in record or not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return None
    if "role" in turns[0] and "content" in turns[0]:
        return "conversations"
    if "from" in turns[0] and "value" in turns[0]:
        return "sharegpt"
    return None


def first_record_format(path: str | Path) -> str:
    """The layout `data.format: auto` reads the file with, decided by its first non-blank record."""
    for chunk in read_chunks(path, 64):
        for index in range(len(chunk.items)):
            record = _record(chunk, index)
            if record is None:
                continue
            fmt = detect_format(record)
            if fmt is None:
                raise DataError(f"{chunk.where(index)}: cannot tell the chat format of this record (expected "
                                "{\"conversations\": [{\"role\", \"content\"}...]}, {\"messages\": [...]} or ShareGPT's "
                                "{\"conversations\": [{\"from\", \"value\"}...]}); fix the record or set data.format")
            return fmt
    raise DataError(f"{path}: no usable conversation (the file is empty)")


def _turns(record: object, fmt: str) -> tuple[list[dict] | None, str | None]:
    """(normalized turns, None) or (None, what is wrong) for one record read as `fmt`."""
    key, role_key, text_key = {"conversations": ("conversations", "role", "content"),
                               "messages": ("messages", "role", "content"),
                               "sharegpt": ("conversations", "from", "value")}[fmt]
    example = f'{{"{key}": [{{"{role_key}": ..., "{text_key}": ...}}]}}'
    if not isinstance(record, dict):
        return None, f"expected a JSON object like {example}, got {type(record).__name__}"
    turns = record.get(key)
    if turns is None:
        return None, f"missing '{key}' (this file is read as the {fmt} format: each record must be {example})"
    if not isinstance(turns, list) or not turns:
        return None, f"'{key}' must be a non-empty list of {{{role_key}, {text_key}}} turns"
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return None, f"turn {i} is not an object with '{role_key}' and '{text_key}'"
        raw_role, content = turn.get(role_key), turn.get(text_key)
        role = SHAREGPT_ROLES.get(raw_role) if fmt == "sharegpt" and isinstance(raw_role, str) else raw_role
        if role not in ROLES:
            allowed = ", ".join(SHAREGPT_ROLES) if fmt == "sharegpt" else ", ".join(ROLES)
            return None, f"turn {i} has unknown {role_key} {raw_role!r} (allowed: {allowed})"
        if not isinstance(content, str):
            return None, f"turn {i} {text_key} must be a string, got {type(content).__name__}"
        if not content.strip():
            return None, f"turn {i} ({role}) has empty {text_key}"
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "user":
        return None, "conversation ends with a user turn (its reply is missing): add the assistant reply or drop the turn"
    return out, None


def system_turns(turns: list[dict], mode: str) -> tuple[list[dict], str | None]:
    """(turns, None) with the system turns handled as data.system_turns says, or (turns, what is
    wrong). keep: as they are; drop: removed; fold: each system turn's content prepended to the next
    user turn's, separated by a blank line (Gemma 3's own template does this), for templates that
    refuse a system role."""
    if mode == "keep" or not any(t["role"] == "system" for t in turns):
        return turns, None
    out, pending = [], []
    for i, turn in enumerate(turns):
        if turn["role"] != "system":
            if pending and turn["role"] == "user":
                turn, pending = {"role": "user", "content": "\n\n".join([*pending, turn["content"]])}, []
            elif pending:
                return turns, (f"turn {i - 1} (system) is followed by an assistant turn, not a user turn to fold it "
                               "into (data.system_turns: fold); set data.system_turns: drop or fix the record")
            out.append(turn)
        elif mode == "fold":
            pending.append(turn["content"])
    if pending:
        return turns, ("the last turn is a system turn, with no user turn after it to fold it into "
                       "(data.system_turns: fold); set data.system_turns: drop or fix the record")
    return out, None


def parse_chunk(chunk: Chunk, fmt: str, system: str = "keep") -> tuple[list[list[dict]], list[str], int]:
    """(conversations, where, skipped): the chunk's valid conversations in order, each one's
    file:line, and how many had no assistant turn (nothing to learn from). system: data.system_turns.
    Raises DataError at the first bad record."""
    conversations, where, skipped = [], [], 0
    for index in range(len(chunk.items)):
        record = _record(chunk, index)
        if record is None:
            continue
        turns, problem = _turns(record, fmt)
        if not problem:
            turns, problem = system_turns(turns, system)
        if problem:
            raise DataError(f"{chunk.where(index)}: {problem}")
        if not any(t["role"] == "assistant" for t in turns):
            skipped += 1
            continue
        conversations.append(turns)
        where.append(chunk.where(index))
    return conversations, where, skipped


def resolve_format(path: str | Path, requested: str) -> str:
    """`requested` itself, or for auto the layout of the file's first record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (set data.path or --data_path to a chat JSONL or Parquet file)")
    return first_record_format(path) if requested == "auto" else requested


def check_file(path: str | Path, fmt: str = "auto") -> None:
    """Read the whole file as ingestion would, keeping nothing: raises DataError at the first bad
    record, or when no record has an assistant turn."""
    fmt = resolve_format(path, fmt)
    if not any(parse_chunk(chunk, fmt)[0] for chunk in read_chunks(path, 4096)):
        raise DataError(f"{path}: no usable conversation (the file is empty or no record has an assistant turn)")


def read_conversations(path: str | Path, fmt: str = "auto") -> tuple[list[list[dict]], int]:
    """Every conversation of a (small) file at once: (conversations, skipped). For tests and tools;
    ingestion streams the same reading through read_chunks / parse_chunk."""
    fmt = resolve_format(path, fmt)
    conversations, skipped = [], 0
    for chunk in read_chunks(path, 4096):
        got, _, missed = parse_chunk(chunk, fmt)
        conversations += got
        skipped += missed
    if not conversations:
        raise DataError(f"{path}: no usable conversation (the file is empty or no record has an assistant turn)")
    return conversations, skipped
