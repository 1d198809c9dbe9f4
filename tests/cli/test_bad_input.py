"""Bad input through the search CLI: exit code 2, one line naming what, where and how to fix it,
no traceback, and nothing written (no experiment folder, no tokenized cache), before Ray starts."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tune_kd.cli import main as cli
from tune_kd.data import chat_formats

from conftest import search_raw


def run_cli(tmp_path: Path, raw, capsys) -> str:
    """search.main on `raw` (a dict, or YAML text); returns its one error line after the checks."""
    space = tmp_path / "space.yaml"
    space.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    storage = tmp_path / "results"
    assert cli.main(["search", "--space", str(space), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not storage.exists(), "bad input must not write results"
    assert not (tmp_path / "cache").exists(), "bad input must not write the tokenized cache"
    return lines[0]


def with_data(world, tmp_path, lines: list) -> dict:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return search_raw(world, data={"path": str(path), "cache_dir": str(tmp_path / "cache")})


def conv(*turns) -> str:
    return json.dumps({"conversations": [{"role": r, "content": c} for r, c in turns]})


GOOD = conv(("user", "sort 21"), ("assistant", "12"))


# ---- data -------------------------------------------------------------------------------------

@pytest.mark.parametrize("line,problem", [
    ('{"conversations": [', "not valid JSON"),
    ('"just a string"', "expected a JSON object"),
    ('{"messages": []}', "missing 'conversations'"),
    ('{"conversations": {"role": "user"}}', "'conversations' must be a non-empty list"),
    (conv(("robot", "x"), ("assistant", "y")), "unknown role 'robot'"),
    ('{"conversations": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}',
     "content must be a string"),
    (conv(("user", ""), ("assistant", "y")), "empty content"),
    (b'{"conversations": [{"role": "user", "content": "\xc3\x28"}]}', "invalid UTF-8"),
    (conv(("user", "a"), ("assistant", "b"), ("user", "c")), "ends with a user turn"),
    (conv(("user", "x" * 5000), ("assistant", "y")), "over the 4096-byte limit"),
])
def test_bad_data_line(world, tmp_path, capsys, monkeypatch, line, problem):
    monkeypatch.setattr(chat_formats, "MAX_LINE_BYTES", 4096)   # the real limit (16 MiB) with a small file
    line_text = run_cli(tmp_path, with_data(world, tmp_path, [GOOD, line]), capsys)
    assert f"{tmp_path / 'train.jsonl'}:2: " in line_text and problem in line_text


@pytest.mark.parametrize("lines", [[], [conv(("system", "no assistant turn"))]])
def test_data_without_a_usable_conversation(world, tmp_path, capsys, lines):
    line = run_cli(tmp_path, with_data(world, tmp_path, lines), capsys)
    assert "train.jsonl: no usable conversation" in line


# ---- YAML -------------------------------------------------------------------------------------

def set_key(raw: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


@pytest.mark.parametrize("dotted,value,expected", [
    ("train.temperatur", 2.0, "train.temperatur: unknown key; did you mean 'temperature'?"),
    ("train.epochs", "three", "train.epochs: expected an integer"),
    ("parameters.learning_rate.min", 0.05, "parameters.learning_rate.min: min (0.05) must be below max"),
    ("parameters.learning_rate.min", 0.0, "parameters.learning_rate.min: a log range must stay above 0"),
    ("train.alpha", 1.5, "train.alpha: must be in [0, 1]"),
    ("parameters.alpha.max", 1.2, "parameters.alpha.max: must be in [0, 1]"),
    ("train.temperature", 0.0, "train.temperature: must be > 0"),
    ("train.learning_rate", -1e-3, "train.learning_rate: must be > 0"),
    ("search.num_samples", 0, "search.num_samples: must be >= 1"),
    ("scheduler.grace_period", 9, "scheduler.grace_period: 9 is past train.epochs (3)"),
    ("resources.gpu_per_trial", 3, "resources.gpu_per_trial: 3 asked for, but this machine has"),
    ("parameters.temperature.distribution", "gaussian", "parameters.temperature.distribution: 'gaussian' is not a distribution"),
])
def test_bad_yaml_value(world, tmp_path, capsys, dotted, value, expected):
    raw = set_key(search_raw(world, data={"cache_dir": str(tmp_path / "cache")}), dotted, value)
    line = run_cli(tmp_path, raw, capsys)
    assert str(tmp_path / "space.yaml") in line and expected in line


def test_yaml_that_is_not_a_mapping(tmp_path, capsys):
    line = run_cli(tmp_path, "- just\n- a list\n", capsys)
    assert "space.yaml" in line and "must be a mapping" in line


# ---- models -----------------------------------------------------------------------------------

def copy_teacher(world, tmp_path, name="teacher") -> Path:
    target = tmp_path / name
    shutil.copytree(world["teacher"], target)
    return target


def model_case(world, tmp_path, teacher=None, student=None, tokenizer=None) -> dict:
    sections = {"data": {"cache_dir": str(tmp_path / "cache")}}
    if teacher is not None:
        sections["teacher"] = teacher
    if student is not None:
        sections["student"] = student
    raw = search_raw(world, **sections)
    if tokenizer is not None:
        raw["tokenizer"] = tokenizer
    return raw


def save_llama(directory: Path, vocab: int, hidden: int = 32) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(str(directory))


def test_missing_teacher_and_student_directories(world, tmp_path, capsys):
    line = run_cli(tmp_path, model_case(world, tmp_path, teacher={"path": str(tmp_path / "gone")}), capsys)
    assert "teacher.path:" in line and "does not exist" in line
    line = run_cli(tmp_path, model_case(world, tmp_path, student={"path": str(tmp_path / "gone2"), "arch": None}),
                   capsys)
    assert "student.path:" in line and "does not exist" in line


def test_directory_without_weights(world, tmp_path, capsys):
    teacher = copy_teacher(world, tmp_path)
    (teacher / "model.safetensors").unlink()
    line = run_cli(tmp_path, model_case(world, tmp_path, teacher={"path": str(teacher)}), capsys)
    assert f"teacher.path: {teacher} holds no weights" in line


def test_pickled_weights_are_refused_by_default(world, tmp_path, capsys):
    from safetensors.torch import load_file

    teacher = copy_teacher(world, tmp_path)
    torch.save(load_file(str(teacher / "model.safetensors")), teacher / "pytorch_model.bin")
    (teacher / "model.safetensors").unlink()
    line = run_cli(tmp_path, model_case(world, tmp_path, teacher={"path": str(teacher)}), capsys)
    assert "pickle-based weights (pytorch_model.bin), refused" in line
    assert "teacher.allow_pickle_weights: true" in line


def test_tokenizer_not_shared(world, tmp_path, capsys):
    from transformers import AutoTokenizer

    teacher = copy_teacher(world, tmp_path)
    other = AutoTokenizer.from_pretrained(world["tokenizer"])
    other.add_tokens(["<not-in-the-other-one>"])
    other.save_pretrained(str(teacher))
    line = run_cli(tmp_path, model_case(world, tmp_path, teacher={"path": str(teacher)}), capsys)
    assert "teacher.path:" in line and "ships a tokenizer different from" in line and "a teacher reads its own" in line


def test_teacher_vocab_smaller_than_the_students(world, tmp_path, capsys):
    save_llama(tmp_path / "small_teacher", vocab=60)
    line = run_cli(tmp_path, model_case(world, tmp_path, teacher={"path": str(tmp_path / "small_teacher")}), capsys)
    assert "teacher vocab has 60 rows but the tokenizer emits 103 ids" in line and "another tokenizer" in line


def test_model_that_needs_remote_code(world, tmp_path, capsys):
    teacher = copy_teacher(world, tmp_path)
    config = json.loads((teacher / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                       "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (teacher / "config.json").write_text(json.dumps(config))
    line = run_cli(tmp_path, model_case(world, tmp_path, teacher={"path": str(teacher)}), capsys)
    assert "needs custom code; set teacher.trust_remote_code: true only if you trust its source" in line


def test_weights_that_do_not_fit_the_architecture(world, tmp_path, capsys):
    teacher = copy_teacher(world, tmp_path)
    config = json.loads((teacher / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (teacher / "config.json").write_text(json.dumps(config))
    line = run_cli(tmp_path, model_case(world, tmp_path, teacher={"path": str(teacher)}), capsys)
    assert "the weights do not fit the architecture in its config.json" in line
    assert "mlp" in line and "expected" in line
