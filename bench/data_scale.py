"""Ingestion at scale: write a chat file of N conversations, prepare it, print conversations/s and peak RSS.

    python bench/data_scale.py --conversations 100000 [--tokenizer ../shared/tokenizers/minimind]
                               [--workers 0] [--keep]
    python bench/data_scale.py --smoke    # seconds: 200 conversations, a small BPE trained here (tests/bench)

The file is in the seed's format (`{"conversations": [{role, content}, ...]}`, one per line):
1-3 user/assistant turns, questions of 5-40 words and replies of 10-200 words, 15% with a system
prompt. Words are drawn with Zipf-like frequencies from the English of Python's standard library
(its comments and docstrings), so a real BPE tokenizer sees realistic word and token lengths.

Preparation runs in a fresh process (`python -m tune_kd.prepare`, what a user runs) on a
generated YAML; a sampler thread reads /proc every 0.2 s and records the peak RSS of that
process plus its ingestion workers (the whole process tree, summed). Printed per run: the
conversations and tokens written, the wall time, conversations/s and the peak RSS.

`--baseline N` also times, in the same run and on the first N conversations of the first file,
the previous method (kept here as a reference, like the seed's step in step_throughput.py): read
the whole file, render every conversation and then each assistant prefix twice through
apply_chat_template, tokenize all texts in one call with offsets, all in memory, one process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SECONDS = 0.2


def english_vocabulary(limit: int = 20000) -> tuple[list[str], list[float]]:
    """The most common words of the standard library's text, with Zipf weights 1/rank."""
    counts = Counter()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="ignore")
        counts.update(w.lower() for w in re.findall(r"[A-Za-z]{2,14}", " ".join(re.findall(r"#.*|\"\"\"[\s\S]*?\"\"\"", text))))
    words = [w for w, _ in counts.most_common(limit)]
    return words, [1.0 / (rank + 1) for rank in range(len(words))]


def write_conversations(path: Path, count: int, seed: int = 0) -> None:
    words, weights = english_vocabulary()
    rng = random.Random(seed)
    pool = rng.choices(words, weights, k=1 << 20)   # one weighted draw, then cheap uniform picks from it

    def sentence(low: int, high: int) -> str:
        n = rng.randint(low, high)
        start = rng.randrange(len(pool) - n)
        return " ".join(pool[start:start + n]).capitalize() + "."

    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            turns = [{"role": "system", "content": sentence(4, 12)}] if rng.random() < 0.15 else []
            for _ in range(rng.randint(1, 3)):
                turns.append({"role": "user", "content": sentence(5, 40)})
                turns.append({"role": "assistant", "content": sentence(10, 200)})
            handle.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            with open(f"/proc/{current}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total


def previous_method(path: str, tokenizer_dir: str, max_seq_len: int) -> None:
    """The ingestion this project had before streaming: everything in memory, prefixes re-rendered."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(path, "rb") as handle:
        conversations = [json.loads(line)["conversations"] for line in handle]
    texts = [tokenizer.apply_chat_template(turns, tokenize=False) for turns in conversations]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    kept = []
    for turns, text, ids, offsets in zip(conversations, texts, encoded["input_ids"], encoded["offset_mapping"]):
        starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
        ends = np.fromiter((b for _, b in offsets), dtype=np.int64, count=len(offsets))
        mask = np.zeros(len(ids), dtype=bool)
        for i, turn in enumerate(turns):
            if turn["role"] == "assistant":
                before = tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True)
                through = tokenizer.apply_chat_template(turns[:i + 1], tokenize=False).rstrip()
                mask |= (starts >= len(before)) & (ends <= len(through)) & (ends > starts)
        kept.append((np.asarray(ids[:max_seq_len], dtype=np.int32), mask[:max_seq_len]))
    print(f"{sum(len(ids) for ids, _ in kept):,} tokens")


def timed(command: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS of the process tree in bytes, output) of `command`."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(SAMPLE_SECONDS)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{output}")
    return time.perf_counter() - started, peak[0], output


def row(label: str, count: int, size_mb: float, written: float, seconds: float, peak: int, output: str) -> str:
    tokens = re.search(r"(\d[\d,]*) tokens", output)
    return (f"{label:<9} {count:>13,} {size_mb:>8.0f} {written:>8.1f} {seconds:>9.1f} {count / seconds:>7.0f} "
            f"{peak / 1e9:>11.2f}  {tokens.group(1) if tokens else '?'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, nargs="+", default=[100_000])
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared/tokenizers/minimind"))
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=0, help="data.workers (0: one per core)")
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed unless --keep)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--baseline", type=int, default=0, help="also time the previous method on this many")
    parser.add_argument("--smoke", action="store_true", help="seconds: 200 conversations, a small byte-level BPE "
                        "trained on a sample of them in place of MiniMind's, a scratch folder (no --baseline)")
    parser.add_argument("--previous-method", nargs=3, metavar=("FILE", "TOKENIZER", "MAX_SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.previous_method:   # the baseline's own process, started by timed()
        previous_method(args.previous_method[0], args.previous_method[1], int(args.previous_method[2]))
        return 0
    work = Path(args.dir or tempfile.mkdtemp(prefix="tune_kd-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        import _smoke

        sample = work / "tokenizer-sample.jsonl"
        write_conversations(sample, 100, seed=1)
        _smoke.bpe_tokenizer(work / "tokenizer", _smoke.conversation_texts(sample), vocab_size=2000)
        sample.unlink()
        args.conversations, args.tokenizer, args.workers, args.baseline = [200], str(work / "tokenizer"), 1, 0
    print(f"tokenizer {args.tokenizer}; data.workers {args.workers}; {os.cpu_count()} CPUs; work folder {work}")
    print(f"{'method':<9} {'conversations':>13} {'file MB':>8} {'write s':>8} {'prepare s':>9} {'conv/s':>7} "
          f"{'peak RSS GB':>11}  tokens")
    for index, count in enumerate(args.conversations):
        data_path = work / f"chat-{count}.jsonl"
        started = time.perf_counter()
        write_conversations(data_path, count)
        written = time.perf_counter() - started
        if index == 0 and args.baseline:
            head = work / f"chat-{args.baseline}-head.jsonl"
            with data_path.open() as source, head.open("w") as out:
                out.writelines(line for _, line in zip(range(args.baseline), source))
            seconds, peak, output = timed([sys.executable, __file__, "--previous-method", str(head), args.tokenizer,
                                           str(args.max_seq_len)])
            print(row("previous", args.baseline, head.stat().st_size / 1e6, 0.0, seconds, peak, output), flush=True)
            head.unlink()
        yaml_path = work / f"prepare-{count}.yaml"
        yaml_path.write_text(json.dumps({   # JSON is YAML
            "name": f"data-scale-{count}", "tokenizer": args.tokenizer, "teacher": None,
            "student": {"arch": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}},
            "data": {"path": str(data_path), "val_fraction": 0.01, "max_seq_len": args.max_seq_len,
                     "cache_dir": str(work / f"cache-{count}"), "workers": args.workers},
            "train": {"alpha": 1.0}}))
        seconds, peak, output = timed([sys.executable, "-m", "tune_kd.prepare", "--config", str(yaml_path)])
        print(row("prepare", count, data_path.stat().st_size / 1e6, written, seconds, peak, output), flush=True)
        data_path.unlink()
    if not args.keep and not args.dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
