"""The fast step (LM head on assistant positions only, chunked loss, bucketed batches) gives the
plain step's loss and gradients: speed never changes what is optimised."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tune_kd.config.experiment import ArchSpec, ModelSpec
from tune_kd.data import tokenized
from tune_kd.kd.scored import ScoredLM
from tune_kd.model import build, hardware
from tune_kd.train.step import MicroStep, backward_step

from conftest import step_run
from test_losses import seed_objective


def tiny_models(tokenizer, precision):
    torch.manual_seed(0)
    student = build.make_student(ModelSpec(arch=ArchSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=64, max_position_embeddings=96)),
                                  tokenizer, precision)
    teacher = build.make_teacher(ModelSpec(arch=ArchSpec(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=96, max_position_embeddings=96)),
                                  tokenizer, precision)
    return student, teacher


def compare(world, tiny_config, device, dtype, rtol, atol):
    tokenizer = tokenized.load_tokenizer(world["tokenizer"])
    cfg = tiny_config(train={"alpha": 0.3, "temperature": 2.5, "dtype": dtype, "device": device})
    precision = hardware.resolve_precision(dtype, torch.device(device))
    student, teacher = tiny_models(tokenizer, precision)
    pool = tokenized.tokenize_cached(world["train"], tokenizer, 64, world["cache"])
    indices = np.arange(16)
    tight = tokenized.collate(pool, indices, tokenizer.pad_token_id)                 # padded to the longest row
    padded = {k: F.pad(v, (0, 96 - v.shape[1]), value=tokenizer.pad_token_id if k == "input_ids" else -100)
              for k, v in tight.items() if k in ("input_ids", "labels")}        # padded like the seed
    n = int((tight["labels"][:, 1:] != -100).sum())

    # plain: full logits of the HF models on the seed's padded batch, the seed's formula
    ids, labels = padded["input_ids"].to(device), padded["labels"].to(device)
    with precision.autocast():
        s_logits = student(input_ids=ids).logits
    with torch.no_grad(), precision.autocast():
        t_logits = teacher(input_ids=ids).logits
    plain = seed_objective(s_logits.float(), t_logits.float(), labels, 0.3, 2.5)
    plain.backward()
    plain_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)

    # fast: the loop's own step on the tight batch (chunking itself: test_losses)
    parts = backward_step(step_run(cfg, ScoredLM(student), ScoredLM(teacher), precision), tight,
                          MicroStep(n, cfg.train.temperature))
    assert parts.loss.item() == pytest.approx(plain.item(), rel=rtol, abs=atol)
    for p, g in zip(student.parameters(), plain_grads):
        torch.testing.assert_close(p.grad, g, rtol=rtol, atol=atol)


def test_fast_step_matches_plain_step_fp32(world, tiny_config):
    compare(world, tiny_config, "cpu", "float32", rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_fast_step_matches_plain_step_bf16_on_gpu(world, tiny_config):
    compare(world, tiny_config, "cuda", "bfloat16", rtol=2e-2, atol=2e-3)
