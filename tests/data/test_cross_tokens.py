"""Cross-tokenizer data (data/cross_tokens.py, data/byte_align.py) on the zoo's families: the groups
cover exactly each side's assistant tokens, spell the same bytes on both sides, are numbered in
token order; truncation drops what it cut; the student's side is the single-tokenizer path's; the
tokenizers and templates alignment cannot use are one line; the pair cache is built once."""

import collections
import json

import numpy as np
import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizer

from tune_kd.config.errors import UserError
from tune_kd.data import byte_align, chat_formats, cross_tokens, ingest, tokenized

import tokenizer_zoo

MAX_SEQ_LEN = 256
# replies beyond the zoo's: whitespace a template trims, a numeral, a lone multi-digit reply
EXTRA = [
    [("user", "Where?"), ("assistant", "  Paris is the capital.  ")],
    [("user", "Sort the digits 321"), ("assistant", "321")],
    [("user", "Add 12 and 30"), ("assistant", "12 and 30 make 42, and 2024 is a year.")],
]
CHINESE_PIECES = [("user", "你好"), ("assistant", "我喜欢猫。")]   # 喜欢猫: unseen by the zoo's BPE: byte pieces


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    names = ("chatml", "llama3", "mistral", "gemma")
    return {name: AutoTokenizer.from_pretrained(str(tokenizer_zoo.save(name, root / name))) for name in names}


def system_turns(student: str, teacher: str) -> str:
    refuses = any(tokenizer_zoo.FAMILIES[name].refuses_system for name in (student, teacher))
    return "fold" if refuses else "keep"


def conversations(mode: str, extra=()) -> list[list[dict]]:
    turns = [*tokenizer_zoo.CONVERSATIONS, *EXTRA, *extra]
    return [chat_formats.system_turns(tokenizer_zoo.conversation(t), mode)[0] for t in turns]


def encode(zoo, student, teacher, convs, max_seq_len=MAX_SEQ_LEN):
    renderers = cross_tokens.pair_renderers(zoo[student], zoo[teacher], system_turns(student, teacher))
    dtypes = tuple(ingest.token_dtype_for(len(zoo[name])) for name in (student, teacher))
    return cross_tokens.encode_pair(*renderers, convs, max_seq_len, dtypes)


def split(encoded, groups) -> list[tuple]:
    """(ids, mask, groups) of each example on one side."""
    edges = np.cumsum(encoded.lengths)[:-1]
    return list(zip(np.split(encoded.tokens, edges), np.split(encoded.mask, edges), np.split(groups, edges)))


def byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    return table


BYTES = byte_level_table()


def spelled(tokenizer, ids) -> bytes:
    """The bytes `ids` stand for, read off the vocabulary (no decoder: partial characters stay bytes)."""
    out = b""
    byte_level = type(tokenizer.backend_tokenizer.decoder).__name__ == "ByteLevel"
    for token in tokenizer.convert_ids_to_tokens([int(i) for i in ids]):
        if token in tokenizer.all_special_tokens or token in tokenizer.get_added_vocab():
            out += token.encode()
        elif byte_level:
            out += bytes(BYTES[c] for c in token)
        else:
            assert token != tokenizer.unk_token, "an unknown token spells nothing checkable"
            out += token.replace("▁", " ").encode()
    return out


def check_groups(zoo, student, teacher, convs, encoded):
    """Every assertion on the groups of a fully kept batch."""
    eot = [tokenizer_zoo.FAMILIES[name].end_of_turn.encode() for name in (student, teacher)]
    rows = zip(split(encoded.student, encoded.student_groups), split(encoded.teacher, encoded.teacher_groups))
    assert len(encoded.student.lengths) == len(convs)
    for turns, ((s_ids, s_mask, s_g), (t_ids, t_mask, t_g)) in zip(convs, rows):
        assert np.array_equal(s_g >= 0, s_mask) and np.array_equal(t_g >= 0, t_mask), "groups = assistant tokens"
        count = int(s_g.max()) + 1
        assert count == int(t_g.max()) + 1
        for g in (s_g, t_g):   # consecutive, in token order
            seen = g[g >= 0]
            assert np.all(np.diff(seen) >= 0) and np.array_equal(np.unique(seen), np.arange(count))
        replies, reply, first = [], b"", True
        for k in range(count):
            s_text = spelled(zoo[student], s_ids[s_g == k])
            t_text = spelled(zoo[teacher], t_ids[t_g == k])
            if (s_text.strip(), t_text.strip()) == tuple(eot):
                replies.append(reply)
                reply, first = b"", True
                continue
            if first:   # the lead (Mistral's ' ', whitespace a template kept) rides with the first group
                s_text, t_text = s_text.lstrip(), t_text.lstrip()
            assert s_text == t_text and s_text, (student, teacher, k, s_text, t_text)
            reply, first = reply + s_text, False
        want = [t["content"].strip().encode() for t in turns if t["role"] == "assistant"]
        assert replies == want and not reply


@pytest.mark.parametrize("student,teacher", [("llama3", "chatml"), ("mistral", "chatml"), ("gemma", "chatml"),
                                             ("chatml", "mistral")])
def test_groups_cover_the_assistant_tokens_and_spell_the_same_bytes(zoo, student, teacher):
    convs = conversations(system_turns(student, teacher))
    encoded = encode(zoo, student, teacher, convs)
    check_groups(zoo, student, teacher, convs, encoded)
    stats = encoded.stats
    assert stats["kept"] == len(convs) and stats["mismatched_replies"] == stats["replies_unaligned"] == 0
    assert stats["student_grouped_tokens"] == stats["student_assistant_tokens"] == int(encoded.student.mask.sum())
    line = cross_tokens.alignment_summary(stats)
    assert "\n" not in line and f"kept {len(convs)} of {len(convs)} examples" in line and "student 100.0%" in line


def test_byte_level_pieces_of_one_character_align(zoo):
    convs = conversations("keep", [CHINESE_PIECES])
    check_groups(zoo, "llama3", "chatml", convs, encode(zoo, "llama3", "chatml", convs))   # bytes, piece by piece

    # against a tokenizer that spells 猫 as one <unk>: its three byte pieces (one character span) share its group
    turns = tokenizer_zoo.conversation(CHINESE_PIECES)
    encoded = encode(zoo, "mistral", "chatml", [turns])
    text = zoo["chatml"].apply_chat_template(turns, tokenize=False)
    got = zoo["chatml"](text, add_special_tokens=False, return_offsets_mapping=True)
    assert got["input_ids"] == encoded.teacher.tokens.tolist()
    spans = [tuple(o) for o in got["offset_mapping"]]
    shared = [i for i in range(1, len(spans)) if spans[i] == spans[i - 1]]
    assert len(shared) >= 3, "the premise: byte pieces sharing one character's span"
    for i in shared:
        assert encoded.teacher_groups[i] == encoded.teacher_groups[i - 1] >= 0
    unk = np.flatnonzero(encoded.student.tokens == zoo["mistral"].unk_token_id)
    assert len(unk) == 1
    cat = encoded.teacher_groups == encoded.student_groups[unk[0]]
    assert spelled(zoo["chatml"], encoded.teacher.tokens[cat]) == "猫".encode()


def test_a_numeral_one_side_keeps_whole_is_one_group(zoo):
    convs = conversations("keep")[-2:-1]   # the reply "321"
    assert [zoo["mistral"].convert_ids_to_tokens(zoo["mistral"].encode(" 321", add_special_tokens=False)),
            zoo["chatml"].tokenize("321")] == [["▁321"], ["3", "21"]], "the premise: whole on one side, split on the other"
    encoded = encode(zoo, "mistral", "chatml", convs)
    s_tokens = zoo["mistral"].convert_ids_to_tokens(encoded.student.tokens[encoded.student_groups == 0].tolist())
    t_tokens = zoo["chatml"].convert_ids_to_tokens(encoded.teacher.tokens[encoded.teacher_groups == 0].tolist())
    assert (s_tokens, t_tokens) == (["▁321"], ["3", "21"])
    assert encoded.student_groups.max() == encoded.teacher_groups.max() == 1   # and the end-of-turn group


def test_truncation_drops_the_groups_it_cut(zoo):
    turns = tokenizer_zoo.conversation(tokenizer_zoo.CONVERSATIONS[4])   # two replies; chatml's side is longer
    whole = encode(zoo, "mistral", "chatml", [turns])
    t_len, s_len = int(whole.teacher.lengths[0]), int(whole.student.lengths[0])
    cut_at = int(np.flatnonzero(whole.teacher_groups == whole.teacher_groups.max() - 3)[0])   # inside reply two
    assert s_len <= cut_at < t_len, "the premise: only the teacher's side is cut"
    cut = encode(zoo, "mistral", "chatml", [turns], max_seq_len=cut_at)
    assert cut.teacher.lengths[0] == cut_at and cut.student.lengths[0] == s_len
    assert np.array_equal(cut.student.tokens, whole.student.tokens)
    survivors = [k for k in range(whole.teacher_groups.max() + 1)
                 if np.flatnonzero(whole.teacher_groups == k)[-1] < cut_at]
    assert survivors == list(range(len(survivors))) and 0 < len(survivors) <= whole.teacher_groups.max() - 3
    for whole_g, cut_g in ((whole.student_groups, cut.student_groups),
                           (whole.teacher_groups[:cut_at], cut.teacher_groups)):
        assert np.array_equal(cut_g, np.where(np.isin(whole_g, survivors), whole_g, -1))
    assert cut.stats["groups_cut"] == whole.teacher_groups.max() + 1 - len(survivors)
    assert cut.stats["teacher_truncated"] == 1 and cut.stats["student_truncated"] == 0

    # cut before the teacher's first reply: no assistant token left on that side, the example goes
    first = int(np.flatnonzero(whole.teacher.mask)[0])
    gone = encode(zoo, "mistral", "chatml", [turns], max_seq_len=first)
    assert len(gone.student.lengths) == 0 and gone.stats["dropped_after_truncation"] == 1


def synthetic(text, offsets, span):
    """A Side of hand-made tokens (ids 0..n-1) over `text`, masked as ingest.assistant_mask would."""
    offsets = np.array(offsets).reshape(-1, 2)
    mask = (offsets[:, 0] >= span[0]) & (offsets[:, 1] <= span[1])
    byte_at = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])])
    return byte_align.Side(text, [span], np.arange(len(offsets)), mask, offsets[:, 0], offsets[:, 1], byte_at)


def test_the_walk_on_hand_made_offsets():
    # "Q>" header, " " the template's lead, "猫12." the reply, "<e>" its end of turn
    text, span, markers = "Q> 猫12.<e>", (2, 10), [(" ", "<e>")] * 2
    student = synthetic(text, [(0, 2), (2, 3), (3, 4), (3, 4), (3, 4), (4, 6), (6, 7), (7, 10)], span)
    merged = synthetic(text, [(0, 2), (2, 4), (4, 5), (5, 7), (7, 10)], span)   # lead merged into the first token
    stats = collections.Counter()
    got = byte_align.align_conversation(student, merged, ["猫12."], markers, 64, stats)
    # the lead joins the first group; three pieces of one character stay together; "12." vs "1","2."; end of turn
    assert [g.tolist() for g in got] == [[-1, 0, 0, 0, 0, 1, 1, 2], [-1, 0, 1, 1, 2]]

    straddler = synthetic(text, [(0, 1), (1, 4), (4, 5), (5, 7), (7, 10)], span)   # "> 猫": header + reply
    got = byte_align.align_conversation(student, straddler, ["猫12."], markers, 64, stats)
    assert [g.tolist() for g in got] == [[-1, -1, -1, -1, -1, 0, 0, 1], [-1, -1, 0, 0, 1]]
    assert stats["groups_unmasked"] == 1   # the group holding an unscored token is dropped on both sides

    back = synthetic(text, [(0, 2), (2, 5), (3, 4), (5, 7), (7, 10)], span)   # an end that goes back
    got = byte_align.align_conversation(back, merged, ["猫12."], markers, 64, stats)
    assert [g.tolist() for g in got] == [[-1, 0, 0, 1, 2], [-1, 0, 0, 1, 2]]   # carried forward: in token order


def test_the_student_side_is_the_single_tokenizer_path(zoo):
    convs = conversations("keep")
    encoded = encode(zoo, "mistral", "chatml", convs)
    alone = ingest.encode_conversations(ingest.ChatRenderer(zoo["mistral"]), convs, MAX_SEQ_LEN,
                                        ingest.token_dtype_for(len(zoo["mistral"])))
    for key in ("tokens", "mask", "lengths", "targets"):
        assert np.array_equal(getattr(encoded.student, key), getattr(alone, key)), key
    teacher = ingest.encode_conversations(ingest.ChatRenderer(zoo["chatml"]), convs, MAX_SEQ_LEN,
                                          ingest.token_dtype_for(len(zoo["chatml"])))
    assert np.array_equal(encoded.teacher.tokens, teacher.tokens) and np.array_equal(encoded.teacher.mask, teacher.mask)


# ---- what alignment cannot use: one line, naming the side ----------------------------------------

class SlowTokenizer(PreTrainedTokenizer):
    """A Python tokenizer (no fast backend, no offsets) with a chat template."""

    def __init__(self, **kwargs):
        self._vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
        super().__init__(unk_token="<unk>", **kwargs)
        self.chat_template = tokenizer_zoo.CHATML

    @property
    def vocab_size(self):
        return len(self._vocab)

    def get_vocab(self):
        return dict(self._vocab)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return {i: t for t, i in self._vocab.items()}[index]


def one_line(exc_info) -> str:
    line = str(exc_info.value)
    assert line and "\n" not in line
    return line


def test_a_slow_tokenizer_is_refused_naming_its_side(zoo):
    slow = SlowTokenizer()
    assert not slow.is_fast
    with pytest.raises(UserError) as exc:
        cross_tokens.check_pair(slow, zoo["chatml"])
    line = one_line(exc)
    assert line.startswith("student tokenizer") and "slow (Python) tokenizer gives no character offsets" in line
    assert "tokenizer.json" in line

    class NotFast:   # whatever the object, is_fast False means no offsets
        is_fast = False
        backend_tokenizer = zoo["chatml"].backend_tokenizer
        chat_template = tokenizer_zoo.CHATML
        name_or_path = "/models/teacher"
    with pytest.raises(UserError) as exc:
        cross_tokens.check_pair(zoo["chatml"], NotFast())
    assert one_line(exc).startswith("teacher tokenizer /models/teacher: a slow (Python) tokenizer")


def test_a_missing_or_unusable_template_names_its_side(zoo, tmp_path):
    bare = AutoTokenizer.from_pretrained(zoo["llama3"].name_or_path)
    bare.chat_template = None
    with pytest.raises(UserError) as exc:
        cross_tokens.check_pair(zoo["chatml"], bare)
    assert one_line(exc).startswith(f"teacher tokenizer {zoo['llama3'].name_or_path}: no chat template")

    template = tokenizer_zoo.CHATML + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"
    odd = AutoTokenizer.from_pretrained(str(tokenizer_zoo.save("chatml", tmp_path / "odd", template=template)))
    with pytest.raises(UserError) as exc:
        cross_tokens.check_pair(odd, zoo["chatml"])
    line = one_line(exc)
    assert line.startswith(f"student tokenizer {tmp_path / 'odd'}: the chat template renders a 4-turn probe")
    assert "differently from its own prefixes" in line


def test_a_conversation_one_template_refuses_names_its_line_and_side(zoo):
    renderers = cross_tokens.pair_renderers(zoo["chatml"], zoo["gemma"])   # gemma refuses a system turn
    convs = [tokenizer_zoo.conversation(tokenizer_zoo.CONVERSATIONS[i]) for i in (0, 2)]
    with pytest.raises(chat_formats.DataError) as exc:
        cross_tokens.encode_pair(*renderers, convs, MAX_SEQ_LEN, (np.int32, np.int32), ["d.jsonl:1", "d.jsonl:2"])
    assert one_line(exc).startswith(f"d.jsonl:2 (teacher tokenizer {zoo['gemma'].name_or_path}): the tokenizer's "
                                    "chat template refuses this conversation ('System role not supported')")


def write_jsonl(path, convs):
    path.write_text("".join(json.dumps({"conversations": t}, ensure_ascii=False) + "\n" for t in convs))
    return path


def test_replies_that_align_to_nothing_name_the_template_that_rewrites_them(zoo, tmp_path):
    backwards = tokenizer_zoo.CHATML.replace("message['content'] + '<|im_end|>'",
                                             "(message['content'] | reverse) + '<|im_end|>'")
    saved = tokenizer_zoo.save("chatml", tmp_path / "backwards", template=backwards)
    teacher = AutoTokenizer.from_pretrained(str(saved))
    path = write_jsonl(tmp_path / "train.jsonl", conversations("keep"))
    with pytest.raises(UserError) as exc:
        cross_tokens.tokenize_pair_cached(path, zoo["llama3"], teacher, MAX_SEQ_LEN, tmp_path / "cache")
    line = one_line(exc)
    assert f"{path}: no assistant reply aligns" in line and f"teacher tokenizer {tmp_path / 'backwards'}" in line
    assert "student tokenizer" not in line and "renders the replies differently from the data" in line
    built = tmp_path / "cache" / "tokenized_pair"
    assert not built.exists() or not any(built.iterdir()), "nothing written"


# ---- the cache -----------------------------------------------------------------------------------

def test_the_pair_cache_is_built_once_and_keyed_by_both_tokenizers(zoo, tmp_path, monkeypatch):
    convs = conversations("keep")
    path = write_jsonl(tmp_path / "train.jsonl", convs)
    cache = tmp_path / "cache"
    data = cross_tokens.tokenize_pair_cached(path, zoo["mistral"], zoo["chatml"], MAX_SEQ_LEN, cache)
    encoded = encode(zoo, "mistral", "chatml", convs)
    assert len(data) == len(convs) and isinstance(data.student, tokenized.TokenizedData)
    for i, (s, t) in enumerate(zip(split(encoded.student, encoded.student_groups),
                                   split(encoded.teacher, encoded.teacher_groups))):
        got = data.example(i)
        for have, want in zip(got, (*s, *t)):
            assert np.array_equal(have, want), i
    alone = tokenized.tokenize_cached(path, zoo["mistral"], MAX_SEQ_LEN, cache)   # the rest of training's view
    assert np.array_equal(data.student.tokens, alone.tokens) and np.array_equal(data.student.target_counts,
                                                                                alone.target_counts)
    picked = data.subset(np.array([5, 0, 3]))
    assert len(picked) == 3 and picked.student.identity != data.student.identity
    for j, i in enumerate((5, 0, 3)):
        assert all(np.array_equal(a, b) for a, b in zip(picked.example(j), data.example(i)))

    monkeypatch.setattr(cross_tokens, "encode_pair", lambda *a, **k: pytest.fail("tokenized again"))
    again = cross_tokens.tokenize_pair_cached(path, zoo["mistral"], zoo["chatml"], MAX_SEQ_LEN, cache, verify=True)
    assert all(np.array_equal(a, b) for a, b in zip(again.example(4), data.example(4)))
    (key,) = list((cache / "tokenized_pair").iterdir())
    monkeypatch.undo()
    groups = (key / "teacher" / "groups.npy").read_bytes()   # damaged on disk: verify rebuilds it
    (key / "teacher" / "groups.npy").write_bytes(groups[:-1] + bytes([groups[-1] ^ 1]))
    calls, encode_pair = [], cross_tokens.encode_pair
    monkeypatch.setattr(cross_tokens, "encode_pair", lambda *a, **k: calls.append(1) or encode_pair(*a, **k))
    rebuilt = cross_tokens.tokenize_pair_cached(path, zoo["mistral"], zoo["chatml"], MAX_SEQ_LEN, cache, verify=True)
    assert calls and np.array_equal(rebuilt.teacher_groups, encoded.teacher_groups)
    assert (key / "teacher" / "groups.npy").read_bytes() == groups
    monkeypatch.setattr(cross_tokens, "encode_pair", lambda *a, **k: pytest.fail("tokenized again"))
    assert sorted(p.name for p in (key / "teacher").iterdir()) == ["groups.npy", "lengths.npy", "mask.bin", "meta.json",
                                                                   "targets.npy", "tokens.bin"]
    assert json.loads((key / "meta.json").read_text())["stats"]["kept"] == len(convs)

    with pytest.raises(pytest.fail.Exception, match="tokenized again"):   # another teacher: another key, built anew
        cross_tokens.tokenize_pair_cached(path, zoo["mistral"], zoo["llama3"], MAX_SEQ_LEN, cache)
    monkeypatch.undo()
    cross_tokens.tokenize_pair_cached(path, zoo["mistral"], zoo["llama3"], MAX_SEQ_LEN, cache)
    assert len(list((cache / "tokenized_pair").iterdir())) == 2
