"""JSONL parsing, assistant-only labels, the tokenization cache and batching."""

import json

import numpy as np
import pytest

from tune_kd.data import chat_formats, ingest, tokenized
from tune_kd.data.chat_formats import DataError
from tune_kd.data.tokenized import IGNORE_INDEX
from tune_kd.search import demo


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo.build_tokenizer(tmp_path_factory.mktemp("tok"))


def write_lines(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def conv(*turns):
    return json.dumps({"conversations": [{"role": r, "content": c} for r, c in turns]})


def test_only_assistant_tokens_carry_labels_multi_turn(tokenizer):
    turns = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "sort 321"},
             {"role": "assistant", "content": "123"}, {"role": "user", "content": "reverse 45"},
             {"role": "assistant", "content": "54"}]
    encoded = ingest.encode_conversations(ingest.ChatRenderer(tokenizer), [turns], 512, np.int32)
    ids, mask = encoded.tokens, encoded.mask
    assert tokenizer.decode(ids[mask]) == "123<|im_end|>54<|im_end|>"
    # Every unlabeled token belongs to the scaffolding, the system prompt or the user turns.
    unlabeled = tokenizer.decode(ids[~mask])
    assert "sort 321" in unlabeled and "reverse 45" in unlabeled and "Be exact." in unlabeled
    assert "123" not in unlabeled.replace("sort 321", "")
    assert (encoded.stats["truncated"], encoded.stats["dropped_after_truncation"]) == (0, 0)


def test_collate_masks_everything_but_assistant_tokens(tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [conv(("user", "sort 987"), ("assistant", "789")),
                                              conv(("user", "reverse 12345"), ("assistant", "54321"))])
    td = tokenized.tokenize_cached(path, tokenizer, 64, tmp_path / "cache")
    batch = tokenized.collate(td, np.array([0, 1]), tokenizer.pad_token_id)
    labels, ids = batch["labels"], batch["input_ids"]
    assert labels.shape == ids.shape
    labeled = [tokenizer.decode(ids[r][labels[r] != IGNORE_INDEX].tolist()) for r in range(2)]
    assert labeled == ["789<|im_end|>", "54321<|im_end|>"]
    assert (labels[ids == tokenizer.pad_token_id] == IGNORE_INDEX).all()
    assert batch["num_tokens"] == int(td.lengths.sum())


@pytest.mark.parametrize("line,problem", [
    ('{"conversations": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": []}', "missing 'conversations'"),   # the file's first line set the format
    ('{"conversations": "hi"}', "non-empty list"),
    (conv(("robot", "x"), ("assistant", "y")), "unknown role 'robot'"),
    ('{"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     "content must be a string"),
    (conv(("user", "  "), ("assistant", "y")), "empty content"),
    (conv(("user", "a"), ("assistant", "b"), ("user", "c")), "ends with a user turn"),
    (b'{"conversations": "\xff"}', "invalid UTF-8"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, problem):
    path = write_lines(tmp_path / "bad.jsonl", [conv(("user", "sort 1"), ("assistant", "1")), line])
    with pytest.raises(DataError) as err:
        chat_formats.read_conversations(path)
    assert f"{path}:2:" in str(err.value)
    assert problem in str(err.value)


def test_no_assistant_turn_is_skipped_and_counted(tmp_path, tokenizer, caplog):
    path = write_lines(tmp_path / "d.jsonl", [conv(("user", "sort 21"), ("assistant", "12")),
                                              conv(("system", "hello")), conv(("system", "again"))])
    conversations, skipped = chat_formats.read_conversations(path)
    assert (len(conversations), skipped) == (1, 2)
    with caplog.at_level("WARNING"):
        tokenized.tokenize_cached(path, tokenizer, 64, tmp_path / "cache")
    assert "2 skipped no assistant" in caplog.text


@pytest.mark.parametrize("lines", [[], ["", "   "], [conv(("system", "only a system turn"))]])
def test_empty_data_set_is_an_error(tmp_path, lines):
    path = write_lines(tmp_path / "empty.jsonl", lines)
    with pytest.raises(DataError, match="no usable conversation"):
        chat_formats.read_conversations(path)


def test_truncation_is_counted_and_fully_truncated_conversations_dropped(tmp_path, tokenizer, caplog):
    long_question = "sort " + "9" * 40
    path = write_lines(tmp_path / "d.jsonl", [conv(("user", "sort 21"), ("assistant", "12")),
                                              conv(("user", long_question), ("assistant", "9" * 40))])
    with caplog.at_level("WARNING"):
        td = tokenized.tokenize_cached(path, tokenizer, 30, tmp_path / "cache")
    assert len(td) == 1 and td.lengths.max() <= 30
    assert "1 truncated" in caplog.text and "1 dropped after truncation" in caplog.text


def test_cache_is_reused_and_keyed(tmp_path, tokenizer, monkeypatch):
    path = write_lines(tmp_path / "d.jsonl", [conv(("user", "sort 321"), ("assistant", "123"))] * 5)
    first = tokenized.tokenize_cached(path, tokenizer, 64, tmp_path / "cache")
    calls = []

    def reread(p, *args, **kwargs):
        calls.append(p)
        raise DataError("re-read")
    monkeypatch.setattr(ingest, "build", reread)
    again = tokenized.tokenize_cached(path, tokenizer, 64, tmp_path / "cache")
    assert calls == [] and np.array_equal(first.tokens, again.tokens)
    with pytest.raises(DataError, match="re-read"):   # a new max_seq_len is a new key: it re-reads
        tokenized.tokenize_cached(path, tokenizer, 32, tmp_path / "cache")
    assert calls == [path]
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1


def test_epoch_batches_cover_every_example_once_and_are_deterministic(tmp_path, tokenizer):
    records = demo.make_conversations(300, seed=5)
    path = tmp_path / "d.jsonl"
    demo.write_jsonl(path, records)
    td = tokenized.tokenize_cached(path, tokenizer, 128, tmp_path / "cache")
    b1 = tokenized.epoch_batches(td, 16, seed=0, epoch=3)
    b2 = tokenized.epoch_batches(td, 16, seed=0, epoch=3)
    assert all(np.array_equal(x, y) for x, y in zip(b1, b2))
    assert sorted(np.concatenate(b1).tolist()) == list(range(len(td)))
    other = tokenized.epoch_batches(td, 16, seed=0, epoch=4)
    assert not all(np.array_equal(x, y) for x, y in zip(b1, other))
    padded = sum(td.lengths[b].max() * len(b) for b in b1)
    assert 1 - td.lengths.sum() / padded < 0.1    # bucketing keeps padding waste small


def test_val_split_is_disjoint_and_fixed(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    demo.write_jsonl(path, demo.make_conversations(200, seed=7))
    td = tokenized.tokenize_cached(path, tokenizer, 128, tmp_path / "cache")
    train, val = tokenized.train_val_split(td, 0.1)
    assert (len(train), len(val)) == (180, 20)
    train2, val2 = tokenized.train_val_split(td, 0.1)
    assert np.array_equal(val.starts, val2.starts)
    assert sorted(np.concatenate([train.starts, val.starts]).tolist()) == td.starts.tolist()   # disjoint, complete
    assert train.lengths.sum() + val.lengths.sum() == td.lengths.sum()
    # views, not copies: both splits read the one memory-mapped token file
    assert train.tokens is td.tokens and val.mask is td.mask and isinstance(td.tokens, np.memmap)
    assert [x.tolist() for x in val.example(3)] == [x.tolist() for x in td.example(int(np.flatnonzero(td.starts == val.starts[3])[0]))]


def test_data_system_turns_fold_into_the_next_user_turn_or_drop(tmp_path, tokenizer):
    def turns(*pairs):
        return [{"role": r, "content": c} for r, c in pairs]
    two = turns(("system", "S"), ("user", "U"), ("assistant", "A"), ("system", "S2"), ("user", "U2"), ("assistant", "A2"))
    assert chat_formats.system_turns(two, "keep") == (two, None)
    assert chat_formats.system_turns(two, "fold") == (turns(("user", "S\n\nU"), ("assistant", "A"),
                                                            ("user", "S2\n\nU2"), ("assistant", "A2")), None)
    assert chat_formats.system_turns(two, "drop") == (turns(("user", "U"), ("assistant", "A"), ("user", "U2"),
                                                            ("assistant", "A2")), None)
    # nothing to fold into: an error naming the line, which data.system_turns: drop avoids
    path = write_lines(tmp_path / "d.jsonl", [conv(("user", "sort 21"), ("assistant", "12")),
                                              conv(("system", "Be exact."), ("assistant", "Ask me."))])
    with pytest.raises(DataError, match=r"d.jsonl:2: turn 0 \(system\) is followed by an assistant turn"):
        tokenized.tokenize_cached(path, tokenizer, 64, tmp_path / "cache", system_turns="fold")
    assert len(tokenized.tokenize_cached(path, tokenizer, 64, tmp_path / "cache", system_turns="drop")) == 2
