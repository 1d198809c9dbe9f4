"""Streaming ingestion and `prepare`: identical output whatever the chunking, the formats people
bring, the fast span method against the exact one, no partial cache, the unknown-token warning."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from tune_kd.cli import main as cli
from tune_kd.config.experiment import load_config
from tune_kd.data import chat_formats, chat_template, ingest, inputs, tokenized
from tune_kd.data.chat_formats import DataError
from tune_kd.search import demo

import tokenizer_zoo
from conftest import tiny_raw

REPO = Path(__file__).resolve().parents[2]
CACHE_FILES = ("tokens.bin", "mask.bin", "lengths.npy", "targets.npy")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def records():
    """Demo conversations (system prompts, one and two turns) plus edge cases: a reply that also
    appears in the user's turn and in the template's own header text, a repeated reply."""
    out = [r["conversations"] for r in demo.make_conversations(300, seed=11)]
    out.append([{"role": "user", "content": "say assistant"}, {"role": "assistant", "content": "assistant"}])
    out.append([{"role": "user", "content": "12"}, {"role": "assistant", "content": "12"},
                {"role": "user", "content": "again 12"}, {"role": "assistant", "content": "12"}])
    return out


def write_jsonl(path, records, key="conversations"):
    path.write_text("".join(json.dumps({key: turns}) + "\n" for turns in records))
    return path


def build(path, tokenizer, target, workers, chunk_size, max_seq_len=48):
    fmt = chat_formats.resolve_format(path, "auto")
    return ingest.build(path, fmt, tokenizer, max_seq_len, target, {}, workers=workers, chunk_size=chunk_size)


@pytest.mark.slow
def test_output_is_byte_identical_whatever_the_chunk_size_and_workers(tmp_path, tokenizer, records):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    runs = [(1, 1000), (1, 7), (2, 13), (3, 50)]
    metas = [build(path, tokenizer, tmp_path / f"out-{w}-{c}", w, c) for w, c in runs]
    reference = {name: (tmp_path / "out-1-1000" / name).read_bytes() for name in CACHE_FILES}
    assert metas[0]["truncated"] > 0 and metas[0]["examples"] == len(records) - metas[0]["dropped_after_truncation"]
    for (w, c), meta in zip(runs[1:], metas[1:]):
        for name in CACHE_FILES:
            assert (tmp_path / f"out-{w}-{c}" / name).read_bytes() == reference[name], (w, c, name)
        assert {k: v for k, v in meta.items() if k not in ("seconds", "workers", "bytes")} == \
               {k: v for k, v in metas[0].items() if k not in ("seconds", "workers", "bytes")}
    assert [m["workers"] for m in metas] == [1, 1, 2, 3]


def test_fast_spans_equal_exact_spans_and_label_only_replies(tokenizer, records):
    renderer = ingest.ChatRenderer(tokenizer)
    assert renderer._header is not None, "the demo's ChatML template allows the one-render method"
    for turns in records:
        text = renderer.render(turns)
        assert renderer.spans(turns, text) == renderer.exact_spans(turns, text)
    encoded = ingest.encode_conversations(renderer, records[-2:], 512, np.int32)
    first = encoded.tokens[:encoded.lengths[0]][encoded.mask[:encoded.lengths[0]]]
    assert tokenizer.decode(first.tolist()) == "assistant<|im_end|>"   # the reply, not the header's "assistant"
    second = encoded.tokens[encoded.lengths[0]:][encoded.mask[encoded.lengths[0]:]]
    assert tokenizer.decode(second.tolist()) == "12<|im_end|>12<|im_end|>"


def test_a_template_that_rewrites_replies_falls_back_to_the_exact_method(tmp_path, records):
    tok = demo.build_tokenizer(tmp_path / "tok")
    tok.chat_template = demo.CHAT_TEMPLATE.replace("{{ message['content'] }}", "{{ message['content'] | replace('1', 'one') }}")
    renderer = ingest.ChatRenderer(tok)
    turns = [{"role": "user", "content": "sort 21"}, {"role": "assistant", "content": "12"}]
    text = renderer.render(turns)
    assert "one2" in text and renderer.spans(turns, text) == renderer.exact_spans(turns, text)
    encoded = ingest.encode_conversations(renderer, [turns], 512, np.int32)
    assert tok.decode(encoded.tokens[encoded.mask].tolist()) == "one2<|im_end|>"


def test_a_template_that_refuses_a_probe_still_ingests_what_it_accepts(tmp_path):
    tok = demo.build_tokenizer(tmp_path / "tok")
    tok.chat_template = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}" + demo.CHAT_TEMPLATE[len("{% for message in messages %}"):])
    renderer = ingest.ChatRenderer(tok)
    turns = [{"role": "user", "content": "sort 21"}, {"role": "assistant", "content": "12"}]
    encoded = ingest.encode_conversations(renderer, [turns], 512, np.int32)
    assert tok.decode(encoded.tokens[encoded.mask].tolist()) == "12<|im_end|>"


def test_saved_padding_and_truncation_sections_change_nothing(tmp_path):
    """Regression: a tokenizer.json with `padding` and `truncation` sections crashed on the pad
    tokens' missing offsets (max_length 40) or cut conversations below data.max_seq_len (16)."""
    padded = tokenized.load_tokenizer(tokenizer_zoo.save("padded", tmp_path / "padded"))
    plain = tokenized.load_tokenizer(tokenizer_zoo.save("padded", tmp_path / "plain"))
    plain.backend_tokenizer.no_padding()
    plain.backend_tokenizer.no_truncation()
    assert padded.backend_tokenizer.padding and padded.backend_tokenizer.truncation["max_length"] == 16
    conversations = [tokenizer_zoo.conversation(turns) for turns in tokenizer_zoo.CONVERSATIONS]
    want = ingest.encode_conversations(ingest.ChatRenderer(plain), conversations, 128, np.int32)
    assert min(want.lengths) < 16 < 40 < max(want.lengths) < 128
    for max_length in (16, 40):
        padded.backend_tokenizer.enable_truncation(max_length)
        got = ingest.encode_conversations(ingest.ChatRenderer(padded), conversations, 128, np.int32)
        assert got.lengths.tolist() == want.lengths.tolist()
        assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.mask, want.mask)
        assert got.stats["truncated"] == got.stats["dropped_after_truncation"] == 0
    assert padded.backend_tokenizer.padding is not None, "the user's tokenizer is left as it was"
    # the sections decide no token id: they do not change the cache key either
    assert tokenized.tokenizer_fingerprint(padded) == tokenized.tokenizer_fingerprint(plain)


def test_a_bad_line_in_a_later_chunk_names_its_line_and_leaves_no_cache(tmp_path, tokenizer, records):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"conversations": t}) for t in records[:200]]
    lines[157] = '{"conversations": [{"role": "user", "content": "x"}]}'
    path.write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"d.jsonl:158: conversation ends with a user turn"):
            tokenized.tokenize_cached(path, tokenizer, 48, tmp_path / "cache", workers=workers)
        assert not (tmp_path / "cache").exists()


def test_ctrl_c_leaves_no_partial_cache(tmp_path, tokenizer, records, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "cache" / "tokenized").mkdir(parents=True)   # an existing cache folder stays, empty
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(*args)
    encode = ingest.encode_conversations
    monkeypatch.setattr(ingest, "encode_conversations", interrupted)
    monkeypatch.setattr(ingest, "CHUNK_CONVERSATIONS", 20)
    with pytest.raises(KeyboardInterrupt):
        tokenized.tokenize_cached(path, tokenizer, 48, tmp_path / "cache", workers=1)
    assert len(calls) == 3 and list((tmp_path / "cache" / "tokenized").iterdir()) == []


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "parquet"])
def test_each_format_gives_the_same_tokens_as_the_seed_format(tmp_path, tokenizer, records, fmt):
    seed = tokenized.tokenize_cached(write_jsonl(tmp_path / "seed.jsonl", records), tokenizer, 48, tmp_path / "cache")
    if fmt == "messages":
        path = write_jsonl(tmp_path / "m.jsonl", records, key="messages")
    elif fmt == "sharegpt":
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        path = write_jsonl(tmp_path / "s.jsonl", [[{"from": names[t["role"]], "value": t["content"]} for t in turns]
                                                   for turns in records])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist([{"messages": turns} for turns in records]), path, row_group_size=64)
    assert chat_formats.resolve_format(path, "auto") == ("messages" if fmt == "parquet" else fmt)
    other = tokenized.tokenize_cached(path, tokenizer, 48, tmp_path / "cache")
    assert np.array_equal(np.asarray(other.tokens), np.asarray(seed.tokens))
    assert np.array_equal(np.asarray(other.mask), np.asarray(seed.mask))


def test_parquet_errors_name_the_row(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 5
    rows.append({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet", row_group_size=4)
    with pytest.raises(DataError, match=r"p.parquet: row 6: turn 0 has unknown role 'robot'"):
        tokenized.tokenize_cached(tmp_path / "p.parquet", tokenizer, 48, tmp_path / "cache")


def test_auto_detection_that_cannot_decide_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps({"text": "plain text, no turns"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: cannot tell the chat format"):
        tokenized.tokenize_cached(path, tokenizer, 48, tmp_path / "cache")
    messages = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path.write_text(json.dumps(messages) + "\n" + json.dumps(sharegpt) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: missing 'messages' \(this file is read as the messages format"):
        tokenized.tokenize_cached(path, tokenizer, 48, tmp_path / "cache")
    # an explicit data.format reads the file as that layout
    path.write_text(json.dumps(sharegpt) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: turn 0 has unknown role None"):
        tokenized.tokenize_cached(path, tokenizer, 48, tmp_path / "cache", fmt="conversations")


def test_token_ids_use_uint16_for_small_vocabularies(tmp_path, tokenizer, records):
    td = tokenized.tokenize_cached(write_jsonl(tmp_path / "d.jsonl", records[:20]), tokenizer, 48, tmp_path / "cache")
    assert td.tokens.dtype == np.uint16 and isinstance(td.tokens, np.memmap)
    assert ingest.token_dtype_for(70_000) == np.int32


def test_prepare_prints_the_figures_warns_on_unknown_tokens_and_leaves_caches_a_run_reuses(
        world, tmp_path, capsys, monkeypatch):
    chinese = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，我是助手"}]] * 30
    english = [r["conversations"] for r in demo.make_conversations(30, seed=3)]
    path = write_jsonl(tmp_path / "mixed.jsonl", chinese + english)
    raw = tiny_raw(world, data={"path": str(path), "val_path": None, "val_fraction": 0.1,
                                "cache_dir": str(tmp_path / "cache")}, teacher_cache="off")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    assert cli.main(["prepare", "--config", str(space)]) == 0
    out = capsys.readouterr().out
    assert "train " + str(path) + " (conversations): 60 conversations -> 60 examples" in out
    assert "split: 54 train / 6 val" in out and "teacher cache: off" in out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING"))
    meta = json.loads(next((tmp_path / "cache" / "tokenized").glob("*/meta.json")).read_text())
    share = meta["unknown_assistant_tokens"] / meta["assistant_tokens"]
    assert meta["unknown_assistant_tokens"] == 30 * len("你好，我是助手") and f"{100 * share:.1f}%" in warning
    # a run after prepare finds the cache: nothing is tokenized again
    monkeypatch.setattr(ingest, "build", lambda *a, **k: pytest.fail("re-tokenized after prepare"))
    _, train_data, val_data = inputs.load_data(load_config(space))
    assert (len(train_data), len(val_data)) == (54, 6)


def test_no_warning_when_the_tokenizer_spells_the_data(world, tmp_path, capsys):
    raw = tiny_raw(world, data={"cache_dir": str(tmp_path / "cache")}, teacher_cache="off")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    assert cli.main(["prepare", "--config", str(space)]) == 0
    out = capsys.readouterr().out
    assert "unknown token 0.00% of assistant tokens" in out and "WARNING" not in out


HOLD_LOCK = """
import sys
from pathlib import Path
from tune_kd.data import ingest
with ingest.file_lock(Path(sys.argv[1]), building="the token cache of d.jsonl"):
    print("held", flush=True)
    sys.stdin.read()   # until the test closes our stdin
"""


def test_waiting_on_a_lock_says_whose_it_is_what_it_builds_and_how_long(tmp_path, monkeypatch, caplog):
    """Another process holds the build lock: the waiter says at once whose it is (pid, what it builds,
    since when), then again every LOCK_WAIT_REPORT_S, and takes the lock when it is released."""
    monkeypatch.setattr(ingest, "LOCK_WAIT_REPORT_S", 0.3)
    monkeypatch.setattr(ingest, "LOCK_POLL_S", 0.05)
    lock = tmp_path / "build.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        release = threading.Timer(1.2, holder.stdin.close)
        release.start()
        with caplog.at_level("INFO", logger=ingest.__name__):
            with ingest.file_lock(lock, building="the token cache of d.jsonl"):
                assert json.loads(lock.read_text())["pid"] == os.getpid()   # our note replaced the holder's
        assert holder.wait(10) == 0
    finally:
        holder.kill()
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert len(waits) >= 3, waits
    assert waits[0].startswith(f"waiting for pid {holder.pid} (building the token cache of d.jsonl since ")
    assert f"to release {lock}; waited 0s" in waits[0] and "to release" not in waits[1]
    assert all(f"pid {holder.pid} " in line and "; waited " in line for line in waits)
    assert caplog.records[-1].getMessage().startswith("lock free after ")
    assert lock.read_text() == ""                                      # released: no stale holder to name


def test_a_max_seq_len_that_fits_no_conversation_fails_on_a_sample_at_its_yaml_line(tmp_path, capsys, monkeypatch):
    """data.max_seq_len too small for any conversation: `prepare` stops after tokenizing a sample,
    before the full pass, with one line at the key's line in the YAML that says what would fit;
    exit 2, and nothing is written to the cache folder."""
    tok = tmp_path / "tokenizer"
    demo.build_tokenizer(tok)
    data = write_jsonl(tmp_path / "d.jsonl", [r["conversations"] for r in demo.make_conversations(300, seed=5)])
    raw = tiny_raw({"tokenizer": str(tok), "train": str(data), "val": None, "cache": str(tmp_path / "cache")},
                   teacher=None, train={"alpha": 1.0}, data={"max_seq_len": 8, "val_fraction": 0.1},
                   teacher_cache="off")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = 1 + next(i for i, text in enumerate(space.read_text().splitlines()) if "max_seq_len:" in text)
    monkeypatch.setattr(ingest, "_encoded_chunks", lambda *a, **k: pytest.fail("tokenized the whole file"))
    assert cli.main(["prepare", "--config", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {space}:{line}: data.max_seq_len: 8 tokens keeps no assistant token of any of "
                          f"the first {ingest.SAMPLE_CONVERSATIONS} conversations of {data} (they are "), err
    assert "set data.max_seq_len to at least " in err
    assert not (tmp_path / "cache").exists()
    # the sample's suggestion is right: at the least value named, the sample keeps one conversation
    least = int(err.rsplit("(", 1)[1].split()[0])
    renderer = chat_template.ChatRenderer(demo.build_tokenizer(tmp_path / "tok2"), "keep")
    sample = [r["conversations"] for r in demo.make_conversations(300, seed=5)][:ingest.SAMPLE_CONVERSATIONS]
    assert len(ingest.encode_conversations(renderer, sample, least, np.uint16).lengths) >= 1
    assert len(ingest.encode_conversations(renderer, sample, least - 1, np.uint16).lengths) == 0


def test_the_full_build_names_data_max_seq_len_too(tmp_path, tokenizer):
    """A sample with no assistant turn passes the early check; the full build still names the key."""
    lines = [[{"role": "system", "content": "no reply here"}]] * ingest.SAMPLE_CONVERSATIONS
    lines += [[{"role": "user", "content": "sort 4321"}, {"role": "assistant", "content": "1234"}]] * 3
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(ingest.SeqLenError, match="^data.max_seq_len: 8 tokens keeps no assistant token of any "
                                                 "conversation of "):
        tokenized.tokenize_cached(path, tokenizer, 8, tmp_path / "cache")
    assert not (tmp_path / "cache" / "tokenized").exists()
