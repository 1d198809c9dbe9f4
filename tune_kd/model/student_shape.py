"""The student's shape as a search varies it: checked before it trains, measured once it has.

A search may sample `student.arch.*` (checks.STUDENT_SEARCHABLE) like any train key, and
not every combination is a model: the hidden size must split into the attention heads, the heads
into key/value groups, a head's dimension must be even (rotary embeddings turn pairs of channels),
and an MoE student routes each token to at most its number of experts. Instead of constraining the
space (TPE samples each key on its own), a trial whose shape breaks a rule, or whose parameter count
passes `student.max_params`, is rejected before it builds anything: loop.train raises ShapeRejected,
the trainable reports one result with the worst metric and the reason (status REJECTED, Optuna's
PRUNED), so the searcher learns that corner is bad and no trial crashes. The count is taken on the
meta device: no memory, no init.

Every epoch also reports the student's size (student_params, student_embedding_params: the input
embeddings plus an untied output layer, which a vocabulary of 150k makes most of a small model) and,
measured once per run, gen_tokens_per_s: greedy decoding at batch 1 on the run's device over
SPEED_PROMPTS fixed validation prompts, SPEED_NEW_TOKENS tokens each (forced: the count does not
depend on when a reply would end).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tune_kd.config.errors import UserError

SPEED_PROMPTS = 4            # validation prompts timed (on_policy.generation_subset's first ones)
SPEED_NEW_TOKENS = 24        # tokens decoded per prompt


class ShapeRejected(UserError):
    """A sampled student shape that cannot be built or passes student.max_params: the trial reports
    REJECTED instead of training."""


def shape_problem(arch: dict) -> str | None:
    """Why these Llama/Mixtral sizes make no model (None when they do); arch: build.architecture's."""
    hidden, heads, head_dim = arch["hidden_size"], arch["num_attention_heads"], arch.get("head_dim")
    kv = arch.get("num_key_value_heads") or heads
    if head_dim is None and hidden % heads:
        return f"hidden_size {hidden} is not divisible by num_attention_heads {heads}"
    if heads % kv:
        return f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}"
    if head_dim is not None and head_dim % 2:
        return f"head_dim {head_dim} is odd (rotary embeddings turn pairs)"
    if head_dim is None and (hidden // heads) % 2:
        return f"the head dimension {hidden}/{heads} = {hidden // heads} is odd (rotary embeddings turn pairs)"
    experts = arch.get("num_experts")
    if experts is not None and not 1 <= arch.get("num_experts_per_tok", 2) <= experts:
        return f"num_experts_per_tok {arch.get('num_experts_per_tok', 2)} is not in [1, num_experts {experts}]"
    return None


def parameter_counts(lm) -> tuple[int, int]:
    """(all parameters, those of the input embeddings and an untied output layer)."""
    total = sum(p.numel() for p in lm.parameters())
    embedding = lm.get_input_embeddings().weight
    output = lm.get_output_embeddings().weight
    return total, embedding.numel() + (0 if output is embedding else output.numel())


def check_student(cfg, tokenizer) -> None:
    """Raise ShapeRejected when the student cfg builds is no model, one student.init: teacher cannot
    make from the teacher (student_init.check_fits), or one over student.max_params;
    a student loaded from student.path is counted as loaded (loop.train calls check_loaded)."""
    from tune_kd.model import build

    spec = cfg.student
    if spec.path is not None:
        return
    try:
        arch = build.architecture(spec, "student")
    except UserError as exc:
        raise ShapeRejected(f"student shape rejected: {exc}") from None
    problem = shape_problem(arch)
    if problem:
        raise ShapeRejected(f"student shape rejected: {problem}")
    if spec.max_params is None and spec.init != "teacher":
        return
    with torch.device("meta"):
        built = build.build_model(spec, tokenizer, "student")
    if spec.init == "teacher" and cfg.teacher is not None and cfg.teacher.path is not None:
        from tune_kd.model import student_init

        try:   # a sampled shape init: teacher cannot make (wider, another head_dim, ...) is a rejection too
            student_init.check_fits(built.config, build.model_config(cfg.teacher, "teacher"))
        except UserError as exc:
            raise ShapeRejected(f"student shape rejected: {exc}") from None
    if spec.max_params is not None:
        check_budget(parameter_counts(built)[0], spec.max_params)


def check_teacher_for_init(cfg) -> None:
    """A search whose students may start from the teacher (student.init: teacher, fixed or among the
    searched values) with a teacher student_init cannot copy (MoE, not a Llama, biased projections):
    one UserError before the search, not every such trial REJECTED by check_student."""
    from tune_kd.model import build, student_init

    searched = cfg.parameters.get("student.init", {}).get("values", [])
    if cfg.teacher is not None and cfg.teacher.path is not None and (cfg.student.init == "teacher"
                                                                      or "teacher" in searched):
        student_init.check_teacher(build.model_config(cfg.teacher, "teacher"))


def check_budget(total: int, max_params: int | None) -> None:
    if max_params is not None and total > max_params:
        raise ShapeRejected(f"student shape rejected: {total:,} parameters, above student.max_params {max_params:,}")


@torch.inference_mode()
def generation_speed(lm, prompts: list[np.ndarray], pad_id: int, autocast) -> float:
    """Tokens per second of greedy decoding at batch 1 (KV cache), SPEED_NEW_TOKENS per prompt;
    one untimed warm-up prompt first. NaN without prompts."""
    if not prompts:
        return float("nan")
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    try:
        def decode(prompt):
            ids = torch.as_tensor(prompt, dtype=torch.long, device=device)[None]
            with autocast():
                lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=SPEED_NEW_TOKENS,
                            min_new_tokens=SPEED_NEW_TOKENS, do_sample=False, pad_token_id=pad_id, use_cache=True)
        decode(prompts[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for prompt in prompts:
            decode(prompt)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(prompts) * SPEED_NEW_TOKENS / (time.perf_counter() - started)
    finally:
        lm.train(was_training)
