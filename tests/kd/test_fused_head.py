"""The fused output layer (scored.py, losses.distillation_loss): logits made a chunk of rows at a time
and each chunk's gradient taken at once give the materialised-logits path's loss and gradients, for
every divergence and kind of teacher; no (N, V) logits ever exist; a model whose logits are not
output layer x hidden state takes the full path; padded vocabularies distil over the tokenizer's ids."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tune_kd.config.experiment import ArchSpec, ModelSpec
from tune_kd.data import tokenized
from tune_kd.kd import losses, scored, scoring
from tune_kd.kd.scored import Scored, ScoredLM
from tune_kd.kd.teacher_rows import TeacherRows
from tune_kd.model import build, hardware
from tune_kd.teacher import cache_store, stored_rows
from tune_kd.teacher.local import LiveTeacher
from tune_kd.train import loop
from tune_kd.train.evaluate import evaluate
from tune_kd.train.step import MicroStep, backward_step

from conftest import step_run

V, H, N = 37, 8, 23


def head(seed: int, bias: bool = False, scale: float = 1.0, softcap: float | None = None) -> Scored:
    """A student's Scored output with trainable hidden rows and output layer."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g)).requires_grad_(True)
    weight = torch.nn.Parameter(torch.randn(V, H, generator=g))
    return Scored(hidden, weight, torch.nn.Parameter(torch.randn(V, generator=g)) if bias else None, scale, softcap)


def teacher_side(kind: str, columns: int | None):
    """(what the loss is given, what the reference compares against) for each kind of teacher."""
    live = head(99)
    live = Scored(live.hidden.detach(), live.weight.detach())
    logits = live.logits()[:, :columns]
    if kind == "live":
        return live, logits
    if kind == "logits":
        return logits, logits
    width = logits.shape[1]
    stored = stored_rows.compress(logits, stored_rows.layout(8 if kind == "top-8" else width, width))
    cached = TeacherRows.from_stored(stored)
    return cached, cached


def reference(student: Scored, teacher, targets, objective: losses.Objective) -> torch.Tensor:
    """The objective from materialised logits, autograd through everything: today's path."""
    logits = student.logits()
    value = objective.alpha * F.cross_entropy(logits, targets, reduction="sum")
    if teacher is not None:
        kd = losses.KD_LOSSES[objective.kd_loss](logits[:, :objective.columns], teacher, objective.temperature,
                                                 **(objective.kd_options or {}))
        value = value + objective.kd_weight * kd
    return value


def gradients(student: Scored) -> list[torch.Tensor]:
    return [t.grad.clone() for t in (student.hidden, student.weight, student.bias) if t is not None]


@pytest.mark.parametrize("name", sorted(losses.KD_LOSSES))
@pytest.mark.parametrize("kind", ["live", "logits", "top-8", "full row", "none"])
@pytest.mark.parametrize("columns", [None, 30])
def test_the_fused_loss_and_gradients_equal_the_materialised_path(name, kind, columns, monkeypatch):
    monkeypatch.setattr(scored, "CHUNK_ELEMENTS", 5 * V)          # 5 chunks of 5 rows (the last 3)
    options = {"jsd": {"beta": 0.3}, "skew_kl": {"skew": 0.2}}.get(name, {})
    objective = losses.Objective(0.3, 2.5, name, options, columns)
    targets = torch.randint(0, columns or V, (N,), generator=torch.Generator().manual_seed(1))
    given, compared = teacher_side(kind, columns) if kind != "none" else (None, None)
    results = []
    for fused in (True, False):
        student = head(0, bias=True, scale=0.7, softcap=4.0)
        if fused:
            parts = losses.distillation_loss(student, given, targets, 0.3, 2.5, normalizer=1, kd_loss=name,
                                             kd_options=options, columns=columns)
            parts.loss.backward()
            value = parts.loss.detach()
        else:
            value = reference(student, compared, targets, objective)
            value.backward()
        results.append([value.detach(), *gradients(student)])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0


def test_without_grad_the_loss_is_the_same_and_nothing_is_kept(monkeypatch):
    monkeypatch.setattr(scored, "CHUNK_ELEMENTS", 4 * V)
    teacher, _ = teacher_side("live", None)
    targets = torch.zeros(N, dtype=torch.long)
    with_grad = losses.distillation_loss(head(0), teacher, targets, 0.5, 2.0, N)
    with torch.no_grad():
        without = losses.distillation_loss(head(0), teacher, targets, 0.5, 2.0, N)
    assert without.loss.grad_fn is None and torch.equal(without.loss, with_grad.loss.detach())


# ---- the loop's step: fused against the full path, and no (N, V) logits -------------------------

def tiny_pair(tokenizer, student_arch: dict | None = None):
    precision = hardware.resolve_precision("float32", torch.device("cpu"))
    torch.manual_seed(0)
    student = build.make_student(ModelSpec(arch=ArchSpec(**{"hidden_size": 32, "num_hidden_layers": 2,
                                                             "num_attention_heads": 2, "intermediate_size": 64,
                                                             "max_position_embeddings": 96, **(student_arch or {})})),
                                  tokenizer, precision)
    teacher = build.make_teacher(ModelSpec(arch=ArchSpec(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=96, max_position_embeddings=96)),
                                  tokenizer, precision)
    return student, teacher, precision


class InMemoryCache:
    """A teacher cache's rows(indices) over the whole batch, compressed in memory (top-16)."""

    def __init__(self, teacher_logits, lay):
        self.rows_ = TeacherRows.from_stored(stored_rows.compress(teacher_logits, lay))

    def rows(self, indices):
        return self.rows_


CASES = {"forward_kl": {}, "reverse_kl": {"kd_loss": "reverse_kl"}, "jsd": {"kd_loss": "jsd"},
         "tvd": {"kd_loss": "tvd"}, "cached teacher": {}, "features": {"feature_weight": 0.5},
         "moe student": {}, "on-policy batch": {}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_step_gives_the_full_paths_loss_and_gradients(world, tiny_config, case):
    """backward_step with the fused head against the same step with every model on its full path
    (the model's own logits, materialised), for each divergence, the cached teacher, feature
    distillation, a mixture-of-experts student and an on-policy batch; tied embeddings throughout."""
    from tune_kd.kd import features

    tokenizer = tokenized.load_tokenizer(world["tokenizer"])
    cfg = tiny_config(train={"alpha": 0.3, "temperature": 2.5, **CASES[case]})
    student_lm, teacher_lm, precision = tiny_pair(tokenizer, {"num_experts": 2} if case == "moe student" else None)
    assert student_lm.config.tie_word_embeddings
    batch = tokenized.collate(tokenized.tokenize_cached(world["train"], tokenizer, 64, world["cache"]), np.arange(12),
                         tokenizer.pad_token_id)
    n = int((batch["labels"][:, 1:] != -100).sum())
    pairs = features.layer_map(None, 2, 2) if case == "features" else []
    projector = features.FeatureProjector(len(pairs), 32, 48) if pairs else None
    results = []
    for full_path in (False, True):
        student = ScoredLM(student_lm, [p[0] for p in pairs], projector)
        teacher = ScoredLM(teacher_lm, [p[1] for p in pairs])
        student.full_path = teacher.full_path = full_path
        cache = None
        if case == "cached teacher":
            with torch.no_grad():
                positions = scoring.scored_positions(batch["labels"])[0]
                logits = teacher_lm(input_ids=batch["input_ids"]).logits[positions]
            cache = InMemoryCache(logits, stored_rows.layout(16, logits.shape[1]))
        student.zero_grad(set_to_none=True)                  # the projector's too
        parts = backward_step(step_run(cfg, student, teacher, precision, cache=cache), batch,
                              MicroStep(n, cfg.train.temperature, on_policy=case == "on-policy batch"))
        results.append((parts.loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    assert results[0][0] == pytest.approx(results[1][0].item(), rel=1e-5)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for fused, full in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-7)


def test_no_logits_tensor_is_larger_than_a_chunk_in_the_step_or_the_evaluation(world, tiny_config, monkeypatch):
    monkeypatch.setattr(scored, "CHUNK_ELEMENTS", 7 * 103)
    made = []
    original = Scored.project
    monkeypatch.setattr(Scored, "project", lambda self, *a: made.append(original(self, *a).numel()) or original(self, *a))
    tokenizer = tokenized.load_tokenizer(world["tokenizer"])
    cfg = tiny_config()
    student_lm, teacher_lm, precision = tiny_pair(tokenizer)
    val = tokenized.tokenize_cached(world["val"], tokenizer, 64, world["cache"]).subset(np.arange(40))
    batch = tokenized.collate(val, np.arange(32), tokenizer.pad_token_id)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert n > 100
    student, teacher = ScoredLM(student_lm), ScoredLM(teacher_lm)
    for _ in range(2):   # the first forwards also check each head on a few positions (check_head)
        made.clear()
        backward_step(step_run(cfg, student, teacher, precision), batch, MicroStep(n, cfg.train.temperature))
    evaluate(student, LiveTeacher(teacher, precision), val, tokenizer.pad_token_id, cfg, precision)
    assert len(made) > 2 * n // 7 and max(made) <= 7 * 103


# ---- models whose logits are post-processed -----------------------------------------------------

def tiny_config_of(kind: str, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(kind, vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=8, **extra)


@pytest.mark.parametrize("kind, extra", [("cohere", {"logit_scale": 0.25}), ("gemma2", {"final_logit_softcapping": 3.0}),
                                         ("granite", {"logits_scaling": 4.0})])
def test_logit_scales_and_soft_caps_are_reapplied_per_chunk(kind, extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config_of(kind, **extra))
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(40.0)    # logits large enough that a cap or a scale shows
    ids = torch.randint(0, 50, (2, 9))
    positions = torch.rand(2, 9) > 0.3
    model = ScoredLM(lm)
    out, _, _ = model(ids, positions)
    assert model.full_path is False and out.weight is not None
    torch.testing.assert_close(out.logits(), lm(input_ids=ids).logits[positions].float(), rtol=1e-5, atol=1e-5)


def test_a_model_whose_logits_are_not_reproduced_takes_the_full_path(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, logit_scale=0.25)   # a recipe the model itself does not apply
    lm = LlamaForCausalLM(config)
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(40.0)
    ids, positions = torch.randint(0, 50, (2, 9)), torch.ones(2, 9, dtype=torch.bool)
    model = ScoredLM(lm)
    with caplog.at_level("INFO"):
        out, _, _ = model(ids, positions)
    assert model.full_path is True and out.weight is None and "full path" in caplog.text
    torch.testing.assert_close(out.logits(), lm(input_ids=ids).logits[positions].float())


# ---- padded vocabularies ---------------------------------------------------------------------------

def padded_model(directory, tokenizer, rows: int, hidden: int, seed: int):
    """A Llama with `rows` embedding rows for the tokenizer's ids (the rest padding), saved as a user's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=96,
                                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_padding_rows_are_left_out_of_the_divergence(world, tiny_config):
    """Both models padded past the tokenizer's 103 ids: the teacher's padding rows, whatever they hold,
    change neither the loss nor the student's gradient; the student's CE keeps its own rows."""
    tokenizer = tokenized.load_tokenizer(world["tokenizer"])
    precision = hardware.resolve_precision("float32", torch.device("cpu"))
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    make = lambda width: LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=width, intermediate_size=2 * width,  # noqa: E731
                                                      num_hidden_layers=1, num_attention_heads=2))
    student_lm, teacher_lm = make(16), make(32)
    columns = build.check_models(tokenizer, student_lm, teacher_lm)
    assert columns == len(tokenizer) == 103
    batch = tokenized.collate(tokenized.tokenize_cached(world["train"], tokenizer, 64, world["cache"]), np.arange(8),
                         tokenizer.pad_token_id)
    n = int((batch["labels"][:, 1:] != -100).sum())
    cfg = tiny_config()
    results = []
    for padding_scale in (1.0, 50.0):
        with torch.no_grad():
            teacher_lm.get_output_embeddings().weight[103:] *= padding_scale
        student_lm.zero_grad(set_to_none=True)
        parts = backward_step(step_run(cfg, ScoredLM(student_lm), ScoredLM(teacher_lm), precision, columns), batch,
                              MicroStep(n, cfg.train.temperature))
        results.append((parts.loss.item(), student_lm.get_output_embeddings().weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][1][103:].abs().sum() > 0          # CE still pushes the student's own padding rows down


@pytest.mark.slow
def test_a_teacher_padded_less_than_the_student_distils_over_the_tokenizers_ids(world, tiny_config, tmp_path):
    """Teacher 110 rows, student 128, tokenizer 103 ids (both covering it): trains, cached over 103
    columns, where it used to be refused."""
    tokenizer = tokenized.load_tokenizer(world["tokenizer"])
    teacher = padded_model(tmp_path / "teacher", tokenizer, 110, 32, seed=1)
    student = padded_model(tmp_path / "student", tokenizer, 128, 16, seed=2)
    cfg = tiny_config(teacher={"path": teacher}, student={"path": student, "arch": None}, tokenizer=None,
                      data={"max_train_examples": 200, "cache_dir": str(tmp_path / "cache")},
                      train={"epochs": 1}, teacher_cache={"mode": "on", "top_k": 16})
    result = loop.train(cfg)
    assert np.isfinite(result.metrics["val_kl"]) and result.student.get_output_embeddings().weight.shape[0] == 128
    (built,) = [cache_store.TeacherCache(d) for d in (tmp_path / "cache" / "teacher").iterdir()
                if (d / "meta.json").is_file()]
    assert built.meta["vocab"] == 103 and built.meta["columns"] == 103 and int(built.ids.max()) < 103
