"""Distilling across tokenizers through the loop: the tiny world's character-level teacher and a
student on a byte-level BPE of another family (tests/tokenizer_zoo.py's ChatML). The step's chunked,
grouped loss equals the same objective computed on whole logits; the teacher cache gives the live
teacher's run; what needs one tokenizer is refused."""

import numpy as np
import pytest
import torch

import tokenizer_zoo
from tune_kd.config.errors import UserError
from tune_kd.data import tokenized
from tune_kd.kd import cross_vocab, losses, scored
from tune_kd.kd.scoring import scored_positions
from tune_kd.teacher.across import AcrossTokenizers, scored_groups
from tune_kd.teacher.local import CacheReader
from tune_kd.train.loop import train
from tune_kd.train.run import build_run
from tune_kd.train.step import MicroStep, backward_step


@pytest.fixture(scope="module")
def student_tokenizer(tmp_path_factory):
    return str(tokenizer_zoo.save("chatml", tmp_path_factory.mktemp("student_tokenizer")))


@pytest.fixture
def across_config(tiny_config, student_tokenizer):
    def make(**sections):
        train_keys = {"epochs": 1, "alpha": 0.3, "temperature": 2.0, **sections.pop("train", {})}
        return tiny_config(student={"arch": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                             "intermediate_size": 64, "max_position_embeddings": 256},
                                    "tokenizer": student_tokenizer},
                           data={"max_seq_len": 160}, train=train_keys, **sections)
    return make


def whole_objective(run, batch, kd_loss: str, temperature: float, alpha: float) -> torch.Tensor:
    """The objective from whole logits, without the loop's chunks: both sides' rows merged per
    group over the batch, the divergence on every group at once; divided by the student's tokens."""
    labels, teacher_labels = batch["labels"], batch["teacher_labels"]
    positions, targets = scored_positions(labels)
    teacher_positions, teacher_targets = scored_positions(teacher_labels)
    student_logits = run.lm(input_ids=batch["input_ids"]).logits[positions].float()
    with torch.no_grad():
        teacher_logits = run.teacher.lm(input_ids=batch["teacher_input_ids"]).logits[teacher_positions].float()
    student_groups = scored_groups(labels, batch["student_groups"])
    teacher_groups = scored_groups(teacher_labels, batch["teacher_groups"])
    groups = int(student_groups.max()) + 1
    assert int(teacher_groups.max()) + 1 == groups
    at = lambda x: torch.log_softmax(x / temperature, -1)  # noqa: E731
    s = cross_vocab.merge_groups(at(student_logits), targets, student_groups, groups)
    t = cross_vocab.merge_groups(at(teacher_logits), teacher_targets, teacher_groups, groups)
    vocab = run.teacher.vocab
    if kd_loss == "forward_kl":   # in the teacher's vocabulary through W: P-KL
        kd = cross_vocab.pkl_sum(s, t, vocab)
    else:
        kd = cross_vocab.CROSS_VOCAB_LOSSES[kd_loss](s, t, vocab=vocab, beta=run.cfg.train.jsd_beta)
    ce = torch.nn.functional.cross_entropy(student_logits, targets, reduction="sum")
    return (alpha * ce + (1 - alpha) * losses.kd_scale(kd_loss, temperature) * kd) / targets.numel()


@pytest.mark.parametrize("kd_loss", ["uld", "gold_hybrid", "pkl", "hkl", "forward_kl"])
def test_the_steps_grouped_chunks_give_the_whole_objective_and_its_gradient(across_config, monkeypatch, kd_loss):
    cfg = across_config(train={"kd_loss": kd_loss}, teacher_cache="off")
    run = build_run(cfg)
    assert isinstance(run.teacher, AcrossTokenizers) and run.across
    assert len(run.tokenizer) != len(run.tokenizers.teacher)
    batch = tokenized.collate(run.train_data, np.arange(6), run.pad_id)
    assert int(batch["student_groups"].max()) > 20                       # replies split into many groups
    monkeypatch.setattr(scored, "CHUNK_ELEMENTS", 7 * len(run.tokenizer))   # ~7 student rows per chunk
    n = int((batch["labels"][:, 1:] != -100).sum())
    run.student.zero_grad(set_to_none=True)
    parts = backward_step(run, batch, MicroStep(n, cfg.train.temperature))
    chunked = [p.grad.clone() for p in run.lm.parameters()]
    run.student.zero_grad(set_to_none=True)
    expected = whole_objective(run, batch, kd_loss, cfg.train.temperature, cfg.train.alpha)
    expected.backward()
    assert parts.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(chunked, (p.grad for p in run.lm.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_teacher_cache_across_tokenizers_gives_the_live_teachers_run(across_config):
    """The cache holds the teacher's rows at its own positions (here its whole rows: the character
    vocabulary is below top_k auto's k across tokenizers): training reads it and ends where the live
    teacher's run ends; validation reports a finite val_kl (P-KL at T = 1) and the student's val_ce."""
    cached_cfg = across_config(train={"kd_loss": "uld"}, teacher_cache="on")
    assert isinstance(build_run(cached_cfg).teacher.inner, CacheReader)
    cached = train(cached_cfg)
    live = train(across_config(train={"kd_loss": "uld"}, teacher_cache="off"))
    assert cached.metrics["train_loss"] == pytest.approx(live.metrics["train_loss"], rel=1e-4)
    assert cached.metrics["val_ce"] == pytest.approx(live.metrics["val_ce"], rel=1e-4)
    assert np.isfinite(live.metrics["val_kl"]) and live.metrics["val_kl"] >= 0


def test_what_needs_one_tokenizer_is_refused_before_any_work(across_config):
    with pytest.raises(UserError, match="train.seq_kd: sequence-level KD needs teacher and student on one tokenizer"):
        build_run(across_config(train={"seq_kd": True}))
    with pytest.raises(UserError, match="train.feature_weight: feature distillation needs"):
        build_run(across_config(parameters={"feature_weight": {"distribution": "uniform", "min": 0.0, "max": 1.0}}))
