"""Precision decisions, architecture presets, vocab compatibility and model loading rules."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tune_kd import models
from tune_kd.config import ModelSpec, UserError


def test_cpu_bf16_falls_back_to_fp32_with_a_reason(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    p = models.resolve_precision("bfloat16", torch.device("cpu"))
    assert p.autocast_dtype is None and p.teacher_dtype == torch.float32 and not p.grad_scaler
    assert "no native bfloat16" in p.reason
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    p = models.resolve_precision("bfloat16", torch.device("cpu"))
    assert p.autocast_dtype == torch.bfloat16


def test_float32_never_autocasts():
    p = models.resolve_precision("float32", torch.device("cpu"))
    assert p.autocast_dtype is None


def test_seed_presets():
    student = models.architecture(ModelSpec(preset="minimind-student"), "student")
    teacher = models.architecture(ModelSpec(preset="minimind-teacher"), "teacher")
    assert (student["hidden_size"], student["num_hidden_layers"], student["intermediate_size"]) == (512, 8, 1408)
    assert (teacher["hidden_size"], teacher["num_hidden_layers"], teacher["intermediate_size"]) == (768, 16, 2048)
    assert student["max_position_embeddings"] == teacher["max_position_embeddings"] == 512


def test_arch_keys_override_the_preset_and_bad_heads_are_caught():
    from tune_kd.config import ArchSpec

    arch = models.architecture(ModelSpec(preset="minimind-student", arch=ArchSpec(num_hidden_layers=2)), "student")
    assert (arch["hidden_size"], arch["num_hidden_layers"]) == (512, 2)
    with pytest.raises(UserError, match="not divisible"):
        models.architecture(ModelSpec(arch=ArchSpec(hidden_size=100, num_attention_heads=3)), "student")
    with pytest.raises(UserError, match="unknown preset"):
        models.architecture(ModelSpec(preset="gpt5"), "student")


def lm(vocab):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


class FakeTokenizer:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_teacher_padding_rows_are_dropped_with_a_log_line(caplog):
    with caplog.at_level("INFO"):
        cols = models.check_compatibility(lm(128), lm(100), FakeTokenizer(100))
    assert cols == 100 and "28 rows are padding" in caplog.text
    assert models.check_compatibility(lm(100), lm(100), FakeTokenizer(100)) is None


def test_vocab_mismatches_are_errors():
    with pytest.raises(UserError, match="smaller than the student"):
        models.check_compatibility(lm(90), lm(100), FakeTokenizer(90))
    with pytest.raises(UserError, match="tokenizer emits 120 ids"):
        models.check_compatibility(lm(128), lm(100), FakeTokenizer(120))


def test_model_directory_rules(tmp_path, world):
    with pytest.raises(UserError, match="is not a directory"):
        models.load_model_dir(str(tmp_path / "missing"), "teacher", False, torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.safetensors weights"):
        models.load_model_dir(str(tmp_path / "empty"), "teacher", False, torch.float32)
    teacher = models.load_model_dir(world["teacher"], "teacher", False, torch.bfloat16)
    assert next(teacher.parameters()).dtype == torch.bfloat16


def test_teacher_is_frozen_in_eval_mode(world):
    from tune_kd.data import load_tokenizer

    tok = load_tokenizer(world["tokenizer"])
    precision = models.resolve_precision("float32", torch.device("cpu"))
    teacher = models.make_teacher(ModelSpec(path=world["teacher"]), tok, precision)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_models_must_share_a_tokenizer(tmp_path, world):
    from tokenizers import Tokenizer, models as tk_models
    from transformers import PreTrainedTokenizerFast

    from tune_kd.data import load_tokenizer

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tk_models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    other.save_pretrained(str(tmp_path / "student"))
    tok = load_tokenizer(world["tokenizer"])
    with pytest.raises(UserError, match="student.path: .* ships a tokenizer different"):
        models.check_shared_tokenizer(tok, ModelSpec(path=world["teacher"]), ModelSpec(path=str(tmp_path / "student")),
                                      world["teacher"])
    models.check_shared_tokenizer(tok, ModelSpec(path=world["teacher"]), ModelSpec(path=world["teacher"]),
                                  world["tokenizer"])
