"""Precision decisions, architecture presets, vocab compatibility and model loading rules."""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ArchSpec, ModelSpec
from tune_kd.data import tokenized
from tune_kd.model import build, hardware


def test_cpu_bf16_falls_back_to_fp32_with_a_reason(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    p = hardware.resolve_precision("bfloat16", torch.device("cpu"))
    assert p.autocast_dtype is None and p.teacher_dtype == torch.float32 and not p.grad_scaler
    assert "no native bfloat16" in p.reason
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    p = hardware.resolve_precision("bfloat16", torch.device("cpu"))
    assert p.autocast_dtype == torch.bfloat16


def test_float32_never_autocasts():
    p = hardware.resolve_precision("float32", torch.device("cpu"))
    assert p.autocast_dtype is None


def test_seed_presets():
    student = build.architecture(ModelSpec(preset="minimind-student"), "student")
    teacher = build.architecture(ModelSpec(preset="minimind-teacher"), "teacher")
    assert (student["hidden_size"], student["num_hidden_layers"], student["intermediate_size"]) == (512, 8, 1408)
    assert (teacher["hidden_size"], teacher["num_hidden_layers"], teacher["intermediate_size"]) == (768, 16, 2048)
    assert student["max_position_embeddings"] == teacher["max_position_embeddings"] == 512


def test_arch_keys_override_the_preset_and_bad_heads_are_caught():
    from tune_kd.config.experiment import ArchSpec

    arch = build.architecture(ModelSpec(preset="minimind-student", arch=ArchSpec(num_hidden_layers=2)), "student")
    assert (arch["hidden_size"], arch["num_hidden_layers"]) == (512, 2)
    with pytest.raises(UserError, match="not divisible"):
        build.architecture(ModelSpec(arch=ArchSpec(hidden_size=100, num_attention_heads=3)), "student")
    with pytest.raises(UserError, match="unknown preset"):
        build.architecture(ModelSpec(preset="gpt5"), "student")


def lm(vocab):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


class FakeTokenizer:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_rows_past_the_tokenizer_are_left_out_of_the_divergence_with_a_log_line(caplog):
    """Padding rows (ids the tokenizer never emits) carry no distribution: the divergence compares the
    tokenizer's ids, whichever model pads and by how much (Qwen2.5: 151,646 ids in 151,936 rows)."""
    with caplog.at_level("INFO"):
        cols = build.check_models(FakeTokenizer(100), lm(100), lm(128))
    assert cols == 100 and "rows past id 99 are padding" in caplog.text
    assert build.check_models(FakeTokenizer(100), lm(100), lm(100)) is None
    assert build.check_models(FakeTokenizer(100), lm(128), lm(128)) == 100    # both padded alike
    assert build.check_models(FakeTokenizer(100), lm(128), lm(110)) == 100    # the teacher pads less
    assert build.check_models(FakeTokenizer(100), lm(128), None) is None      # plain SFT: CE over every row


def test_vocab_mismatches_are_errors():
    with pytest.raises(UserError, match="teacher vocab has 90 rows but the tokenizer emits 100 ids"):
        build.check_models(FakeTokenizer(100), lm(100), lm(90))
    with pytest.raises(UserError, match="tokenizer emits 120 ids"):
        build.check_models(FakeTokenizer(120), lm(100), lm(128))


def test_model_directory_rules(tmp_path, world):
    with pytest.raises(UserError, match="is not a directory"):
        build.load_model_dir(ModelSpec(path=str(tmp_path / "missing")), "teacher", torch.float32)
    teacher = build.load_model_dir(ModelSpec(path=world["teacher"]), "teacher", torch.bfloat16)
    assert next(teacher.parameters()).dtype == torch.bfloat16


def pickled_copy(world, tmp_path) -> Path:
    """The test teacher with its weights as a pickle-based pytorch_model.bin instead of safetensors."""
    from safetensors.torch import load_file

    target = tmp_path / "pickled"
    shutil.copytree(world["teacher"], target)
    torch.save(load_file(str(target / "model.safetensors")), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def test_allowed_pickle_weights_load_like_safetensors(tmp_path, world):
    target = pickled_copy(world, tmp_path)
    with pytest.raises(UserError, match="refused because unpickling can run code"):
        build.load_model_dir(ModelSpec(path=str(target)), "teacher", torch.float32)
    loaded = build.load_model_dir(ModelSpec(path=str(target), allow_pickle_weights=True), "teacher", torch.float32)
    reference = build.load_model_dir(ModelSpec(path=world["teacher"]), "teacher", torch.float32)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


class RunsCode:
    """A pickle payload that would create a file if unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_allowed_pickle_weights_still_cannot_run_code(tmp_path, world):
    target = pickled_copy(world, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": RunsCode(str(marker))}, target / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights_only=True"):
        build.load_model_dir(ModelSpec(path=str(target), allow_pickle_weights=True), "teacher", torch.float32)
    assert not marker.exists()


def test_weights_fit_accepts_tied_names_and_reports_gaps():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert build.weights_fit(model, shapes) == []
    shapes.pop("lm_head.weight")              # tied: stored once under either name
    assert build.weights_fit(model, shapes) == []
    shapes.pop("model.norm.weight")
    shapes["model.layers.0.mlp.up_proj.weight"] = (64, 16)
    problems = build.weights_fit(model, shapes)
    assert problems == ["1 tensors missing (model.norm.weight)",
                        "1 of another shape (model.layers.0.mlp.up_proj.weight is [64, 16], expected [32, 16])"]



def test_teacher_is_frozen_in_eval_mode(world):
    from tune_kd.data.tokenized import load_tokenizer

    tok = load_tokenizer(world["tokenizer"])
    precision = hardware.resolve_precision("float32", torch.device("cpu"))
    teacher = build.make_teacher(ModelSpec(path=world["teacher"]), tok, precision)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_student_with_its_own_tokenizer_distils_across_tokenizers_and_needs_its_template(tmp_path, world, tiny_config):
    """A student directory that ships another tokenizer is no longer refused: the run distils across
    tokenizers; one without a chat template is refused in one line naming the student's tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    from tune_kd.data import inputs

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tk_models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    other.save_pretrained(str(tmp_path / "student"))
    cfg = tiny_config(student={"path": None, "tokenizer": str(tmp_path / "student")})
    with pytest.raises(UserError, match=r"student: tokenizer has no chat template"):
        inputs.run_tokenizers(cfg)
    same = inputs.run_tokenizers(tiny_config(student={"tokenizer": world["tokenizer"]}))
    assert not same.across and same.teacher is None


def test_moe_student_is_built_trained_with_its_router_loss_and_exported_as_moe(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    from tune_kd.model.checkpoint import save_student
    from tune_kd.results import export
    from tune_kd.train.loop import train

    def moe(coef):
        return {"arch": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                         "max_position_embeddings": 64, "num_experts": 4, "num_experts_per_tok": 2,
                         "router_aux_loss_coef": coef}}

    cfg = tiny_config(student=moe(0.5), train={"epochs": 1}, data={"max_train_examples": 300})
    result = train(cfg)
    assert isinstance(result.student, MixtralForCausalLM) and result.student.config.num_local_experts == 4
    assert build.moe_settings(result.student.config) == (4, 2, 0.5)
    without_router_loss = train(tiny_config(student=moe(0.0), train={"epochs": 1}, data={"max_train_examples": 300}))
    assert result.metrics["train_loss"] > without_router_loss.metrics["train_loss"]   # the aux loss is in the objective
    assert export.export_name(cfg) == "best_student_moe"
    assert export.export_name(tiny_config()) == "best_student"
    save_student(result.student, result.tokenizer, tmp_path / "moe")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"))
    assert isinstance(reloaded, MixtralForCausalLM)
    assert export.export_name(tiny_config(student={"path": str(tmp_path / "moe"), "arch": None})) == "best_student_moe"
    with pytest.raises(UserError, match="num_experts_per_tok: must be in \\[1, num_experts = 4\\]"):
        build.architecture(ModelSpec(arch=ArchSpec(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    num_experts=4, num_experts_per_tok=5)), "student")
