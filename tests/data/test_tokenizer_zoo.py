"""The tokenizer families users bring (tests/tokenizer_zoo.py) through the real `prepare` path: the
cached ids and masks equal a token-level oracle, the masks decode to exactly each reply plus its
end-of-turn text, the fast span method equals the exact one, the cache is reused; and the
templates tune_kd cannot use, or that refuse a conversation, are one line, exit code 2."""

import json
import shutil

import numpy as np
import pytest
import yaml

from tune_kd.cli import main as cli
from tune_kd.config.experiment import load_config
from tune_kd.data import chat_formats, ingest, tokenized
from tune_kd.search import prepare

import tokenizer_zoo
from conftest import TINY_ARCH

MAX_SEQ_LEN = 256


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {name: tokenizer_zoo.save(name, root / name) for name in tokenizer_zoo.FAMILIES}


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n" for turns in conversations))
    return path


def space(tmp_path, tok_dir, data_path, **keys):
    """An experiment YAML for plain SFT (alpha 1, no teacher) of a tiny student on `data_path`."""
    raw = {"name": "zoo", "tokenizer": str(tok_dir), "teacher": None,
           "student": {"arch": dict(TINY_ARCH, max_position_embeddings=MAX_SEQ_LEN)},
           "data": {"path": str(data_path), "max_seq_len": MAX_SEQ_LEN, "cache_dir": str(tmp_path / "cache")},
           "train": {"alpha": 1.0, "device": "cpu", "dtype": "float32"}, "teacher_cache": "off",
           "logging": {"tensorboard": False}}
    for section, values in keys.items():   # data and train: keys merged; the rest replaced
        raw[section] = {**raw[section], **values} if section in ("data", "train") else values
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def oracle(tokenizer, turns):
    """(ids, mask) by definition, through transformers' own calls: tokenize the rendering of the
    prefix before (with the generation prompt) and through each assistant turn; the assistant's
    tokens are the difference (the newline after the end-of-turn is formatting, not the reply)."""
    render = lambda t, gen=False: tokenizer.apply_chat_template(t, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = encode(render(turns))
    mask = [False] * len(ids)
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            before, through = encode(render(turns[:i], True)), encode(render(turns[: i + 1]).rstrip())
            assert ids[:len(before)] == before and ids[:len(through)] == through, "the oracle needs token-level prefixes"
            mask[len(before):len(through)] = [True] * (len(through) - len(before))
    return ids, mask


def decoded_runs(tokenizer, ids, mask) -> list[str]:
    """Each run of consecutive masked tokens, decoded."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [tokenizer.decode(ids[lo:hi].tolist()) for lo, hi in zip(edges[::2], edges[1::2])]


@pytest.mark.parametrize("name", sorted(tokenizer_zoo.FAMILIES))
def test_each_family_prepares_masks_equal_to_the_oracle_and_reuses_its_cache(zoo, tmp_path, monkeypatch, name):
    family = tokenizer_zoo.FAMILIES[name]
    system_turns = "fold" if family.refuses_system else "keep"
    conversations = [tokenizer_zoo.conversation(turns) for turns in tokenizer_zoo.CONVERSATIONS]
    path = write_jsonl(tmp_path / "train.jsonl", conversations)
    config = space(tmp_path, zoo[name], path, data={"system_turns": system_turns})
    cfg = load_config(config)
    meta = prepare.prepare_inputs(cfg, str(config)).files["train"]
    assert meta["examples"] == len(conversations) and meta["truncated"] == meta["dropped_after_truncation"] == 0

    tokenizer = tokenized.load_tokenizer(zoo[name])
    cached = tokenized.open_tokenized(tokenized.cache_dir_for(path, tokenizer, MAX_SEQ_LEN, cfg.data.cache_dir, system_turns)[0])
    renderer = ingest.ChatRenderer(tokenizer, system_turns)
    keep = ingest.ChatRenderer(tokenizer)   # probed without system turns where the template refuses them
    assert renderer._header is not None and keep._header is not None, "every family gets the fast span method"
    assert keep.refuses_system == family.refuses_system
    bos = tokenizer.convert_tokens_to_ids(family.bos) if family.bos else None
    for i, turns in enumerate(conversations):
        turns = chat_formats.system_turns(turns, system_turns)[0]
        ids, mask = cached.example(i)
        want_ids, want_mask = oracle(tokenizer, turns)
        assert ids.tolist() == want_ids and mask.tolist() == want_mask, (name, i)
        text = renderer.render(turns)
        assert renderer.spans(turns, text) == renderer.exact_spans(turns, text)
        if not (family.refuses_system and chat_formats.system_turns(turns, "drop")[0] != turns):
            assert keep.spans(turns, text) == keep.exact_spans(turns, text)
        replies = [turn["content"] + family.end_of_turn for turn in turns if turn["role"] == "assistant"]
        assert decoded_runs(tokenizer, ids, mask) == replies, (name, i)
        if bos is not None:   # the template writes the BOS; the post-processor's is not added again
            assert ids[0] == bos and int((ids == bos).sum()) == 1
        if name == "generation":   # transformers' own reading of the {% generation %} markers agrees
            marked = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
            assert marked["input_ids"] == ids.tolist() and marked["assistant_masks"] == mask.astype(int).tolist()

    monkeypatch.setattr(ingest, "build", lambda *a, **k: pytest.fail("tokenized again"))
    assert prepare.prepare_inputs(load_config(config), str(config)).files["train"] == meta


def test_data_system_turns_keep_fold_drop_change_what_is_tokenized(zoo, tmp_path):
    tokenizer = tokenized.load_tokenizer(zoo["chatml"])   # Qwen's shape: a default system prompt when there is none
    path = write_jsonl(tmp_path / "d.jsonl", [tokenizer_zoo.conversation(tokenizer_zoo.CONVERSATIONS[2])])
    texts = {}
    for mode in ("keep", "fold", "drop"):
        cached = tokenized.tokenize_cached(path, tokenizer, MAX_SEQ_LEN, tmp_path / "cache", system_turns=mode)
        texts[mode] = tokenizer.decode(cached.example(0)[0].tolist())
        assert tokenizer.decode(cached.example(0)[0][cached.example(0)[1]].tolist()) == "123<|im_end|>"
    assert "<|im_start|>system\nAnswer briefly and exactly.<|im_end|>" in texts["keep"]
    assert "You are Qwen" not in texts["keep"]
    assert "<|im_start|>user\nAnswer briefly and exactly.\n\nSort the digits 321<|im_end|>" in texts["fold"]
    assert "Answer briefly" not in texts["drop"] and "<|im_start|>user\nSort the digits 321<|im_end|>" in texts["drop"]
    assert "You are Qwen" in texts["fold"] and "You are Qwen" in texts["drop"]
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 3   # one cache per value


# ---- what tune_kd refuses, or a template refuses: one line, exit code 2 ---------------------------

def refused(config, capsys, tmp_path) -> str:
    """prepare's one error line for `config`, after checking nothing was written."""
    assert cli.main(["prepare", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists(), "nothing is tokenized"
    return lines[0]


@pytest.fixture
def good_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [tokenizer_zoo.conversation(t) for t in tokenizer_zoo.CONVERSATIONS])


def test_a_tokenizer_without_a_chat_template(zoo, tmp_path, capsys, good_data):
    tok_dir = shutil.copytree(zoo["llama3"], tmp_path / "no_template")
    (tok_dir / "chat_template.jinja").unlink()
    line = refused(space(tmp_path, tok_dir, good_data), capsys, tmp_path)
    assert f"{tok_dir}: tokenizer has no chat template (add a chat_template.jinja" in line


def test_a_template_that_renders_conversations_unlike_their_prefixes_is_refused_up_front(tmp_path, capsys, good_data):
    # the end-of-sequence token only after the whole conversation: an earlier reply's rendering is no prefix
    template = tokenizer_zoo.CHATML + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"
    tok_dir = tokenizer_zoo.save("padded", tmp_path / "eos_at_end", template=template)
    line = refused(space(tmp_path, tok_dir, good_data), capsys, tmp_path)
    assert f"error: {tok_dir}: the chat template renders a 4-turn probe conversation differently from its own " \
           "prefixes" in line and "use a template that renders each turn the same whatever follows it" in line


def test_a_data_conversation_the_template_renders_unlike_its_prefixes_names_its_line(tmp_path, capsys):
    # a reasoning template: earlier replies lose their <think> block once a later turn follows
    template = tokenizer_zoo.CHATML.replace(
        "message['content'] + '<|im_end|>'",
        "(message['content'].split('</think>')[-1] if message['role'] == 'assistant' and not loop.last "
        "else message['content']) + '<|im_end|>'")
    tok_dir = tokenizer_zoo.save("padded", tmp_path / "reasoning", template=template)
    path = write_jsonl(tmp_path / "train.jsonl", [
        tokenizer_zoo.conversation(tokenizer_zoo.CONVERSATIONS[0]),
        tokenizer_zoo.conversation([("user", "Hi"), ("assistant", "<think>greet</think>Hello"),
                                    ("user", "thank you"), ("assistant", "You are welcome.")])])
    line = refused(space(tmp_path, tok_dir, path), capsys, tmp_path)
    assert f"{path}:2: the chat template renders this conversation differently from its own prefixes" in line
    assert "split it into one record per assistant reply" in line


def test_a_student_on_another_tokenizer_is_checked_before_any_work(zoo, tmp_path, capsys, good_data):
    """A teacher and a student on different tokenizers distil across them (data/cross_tokens.py); what
    that cannot do is one line, exit 2, before anything is written: a side without a chat template,
    a setting that needs one tokenizer."""
    no_template = tokenizer_zoo.save("chatml", tmp_path / "student_tok", template="")
    config = space(tmp_path, zoo["llama3"], good_data, tokenizer=None, teacher={"path": str(zoo["llama3"])},
                   student={"arch": dict(TINY_ARCH), "tokenizer": str(no_template)}, train={"alpha": 0.5})
    line = refused(config, capsys, tmp_path)
    assert f"{no_template}: tokenizer has no chat template" in line and "add a chat_template.jinja" in line
    config = space(tmp_path, zoo["llama3"], good_data, tokenizer=None, teacher={"path": str(zoo["llama3"])},
                   student={"arch": dict(TINY_ARCH), "tokenizer": str(zoo["chatml"])},
                   train={"alpha": 0.5, "on_policy_fraction": 0.5})
    line = refused(config, capsys, tmp_path)
    assert "train.on_policy_fraction: on-policy batches needs teacher and student on one tokenizer" in line


def test_a_template_that_refuses_system_turns_names_the_line_and_data_system_turns(zoo, tmp_path, capsys, good_data):
    line = refused(space(tmp_path, zoo["gemma"], good_data), capsys, tmp_path)
    assert f"{good_data}:3: the tokenizer's chat template refuses this conversation ('System role not supported')" in line
    assert "set data.system_turns: fold" in line


def test_a_template_that_refuses_the_roles_order_names_the_line(zoo, tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [
        tokenizer_zoo.conversation(tokenizer_zoo.CONVERSATIONS[0]),
        tokenizer_zoo.conversation([("user", "Hi"), ("user", "Hi again"), ("assistant", "Hello")])])
    line = refused(space(tmp_path, zoo["mistral"], path), capsys, tmp_path)
    assert f"{path}:2: the tokenizer's chat template refuses this conversation ('Conversation roles must " \
           "alternate user/assistant/user/assistant/...'); fix the record" in line


def test_a_bad_data_system_turns_value_is_one_line(zoo, tmp_path, capsys, good_data):
    line = refused(space(tmp_path, zoo["gemma"], good_data, data={"system_turns": "merge"}), capsys, tmp_path)
    assert "data.system_turns: 'merge' is not allowed (allowed: keep, fold, drop)" in line
