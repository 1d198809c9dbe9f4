"""A student initialised from its teacher (`student.init: teacher`): the student is built from its
architecture as usual, then every one of its weights is copied from a slice of the teacher's.

Depth (DistilBERT's idea): student layer i takes one teacher layer, chosen by `student.init_layers`:
every_kth (teacher layer round(i * L_t / L_s), halves up: 12 -> 6 takes 0, 2, 4, 6, 8, 10), first
(0 .. L_s - 1) or last (the last L_s).

Width (Minitron's width pruning, with importance read from the teacher's weights alone, no
calibration data): where the student is narrower, it keeps the teacher's most important channels
and heads, then keeps them in the teacher's order. Ties go to the lower index.

    hidden channel c       ||E[:, c]|| * sum_n |w_n[c]|: the embedding column's L2 norm (the channel's
                           size in the residual stream) times its summed scale in every RMSNorm the
                           student copies (each mapped layer's two and the final one). One selection
                           for the embedding, every projection, every norm and the output layer.
    MLP channel j          ||gate[j, :]|| * ||up[j, :]|| * ||down[:, j]||: the channel's output is the
                           product of the three (per layer).
    query head h           ||q_h|| * ||o_h|| * ||k_g|| * ||v_g||, g = h's kv head (Frobenius norms of
                           the head's slices; per layer).
    kv head (GQA group) g  the sum of the scores of the query heads the student keeps in it (its top
                           num_attention_heads / num_key_value_heads of the student).

Whole GQA groups stay consistent: a student kv head is one teacher kv head, and the query heads
that use it in the student all used it in the teacher. Nothing is rescaled after slicing; training
recovers what the dropped channels carried. The copy runs in fp32 on the CPU, before the student
moves to its device, and draws no random numbers (the student's random base init, every value of
which is overwritten, draws as it always has, so the RNG stream after the student is unchanged).

Refused, one line each (check_fits): a student wider than the teacher in any dimension (hidden,
intermediate, heads, kv heads, vocabulary) or deeper, another head_dim, more query heads per kv
head than the teacher has, a teacher that is not a Llama (or has biases the student lacks), and
mixture-of-experts models on either side. build.make_student supplies the teacher's tensors.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from tune_kd.config.errors import UserError

log = logging.getLogger(__name__)

# settings the copied weights were trained under; the student takes them from the teacher
INHERITED = ("hidden_act", "rms_norm_eps", "rope_parameters")
RANDOM = " (use student.init: random)"


@dataclass
class Plan:
    """What the student took: teacher indices, each ascending except `heads` (student order)."""

    layers: list[int]                 # student layer i <- teacher layer layers[i]
    hidden: torch.Tensor              # the teacher's hidden channels kept
    heads: list[torch.Tensor]         # per student layer: teacher query heads, student head order
    kv_heads: list[torch.Tensor]      # per student layer: teacher kv heads (GQA groups)
    mlp: list[torch.Tensor]           # per student layer: teacher MLP channels


def layer_map(rule: str, student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer starts from (student_layers <= teacher_layers)."""
    if rule == "first":
        return list(range(student_layers))
    if rule == "last":
        return list(range(teacher_layers - student_layers, teacher_layers))
    # round(i * L_t / L_s), halves rounded up, in integers
    return [(2 * i * teacher_layers + student_layers) // (2 * student_layers) for i in range(student_layers)]


def inherited_settings(teacher_config) -> dict:
    """The student's config keys that come from the teacher rather than student.arch: the copied
    weights compute the teacher's function only under its activation, norm epsilon and rotary setup."""
    return {key: copy.deepcopy(getattr(teacher_config, key)) for key in INHERITED
            if getattr(teacher_config, key, None) is not None}


def _experts(config) -> int:
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_teacher(teacher_config) -> None:
    """Refuse a teacher whose weights cannot be copied into a Llama student (UserError, one line)."""
    if _experts(teacher_config):
        raise UserError(f"teacher: a mixture-of-experts teacher ({_experts(teacher_config)} experts): "
                        f"student.init: teacher: MoE init is not supported yet{RANDOM}")
    family = getattr(teacher_config, "model_type", None)
    if family != "llama":
        raise UserError(f"teacher: a {family} model, but student.init: teacher copies weights into the student's "
                        f"Llama architecture, so the teacher must be a llama model{RANDOM}")
    if getattr(teacher_config, "attention_bias", False) or getattr(teacher_config, "mlp_bias", False):
        raise UserError("teacher: its attention or MLP projections have biases, which the built Llama student has "
                        f"not: student.init: teacher cannot copy them{RANDOM}")


def check_fits(student_config, teacher_config) -> None:
    """Refuse, in one line naming the key, a student that student.init: teacher cannot make from
    this teacher: it only narrows and shortens, whole heads of the same size."""
    check_teacher(teacher_config)
    s, t = student_config, teacher_config
    if _experts(s):
        raise UserError(f"student.arch.num_experts: student.init: teacher: MoE init is not supported yet{RANDOM}")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        mine, theirs = getattr(s, key), getattr(t, key)
        if mine > theirs:
            what = "deepens" if key == "num_hidden_layers" else "widens"
            raise UserError(f"student.arch.{key} {mine} > the teacher's {theirs}: student.init: teacher only narrows "
                            f"and shortens, it never {what}{RANDOM}")
    if s.vocab_size > t.vocab_size:
        raise UserError(f"tokenizer: the student's {s.vocab_size} vocabulary rows > the teacher's {t.vocab_size}: "
                        "student.init: teacher copies the teacher's rows (use the teacher's tokenizer)")
    if head_dim(s) != head_dim(t):
        raise UserError(f"student.arch.num_attention_heads: the student's head_dim {head_dim(s)} (hidden_size "
                        f"{s.hidden_size} / {s.num_attention_heads} heads) differs from the teacher's {head_dim(t)}: "
                        "student.init: teacher copies whole heads (set num_attention_heads to hidden_size / "
                        f"{head_dim(t)}){RANDOM}")
    group_s = s.num_attention_heads // s.num_key_value_heads
    group_t = t.num_attention_heads // t.num_key_value_heads
    if group_s > group_t:
        raise UserError(f"student.arch.num_key_value_heads: the student shares each kv head among {group_s} query "
                        f"heads, the teacher among {group_t}: student.init: teacher keeps whole GQA groups, so a "
                        f"student kv head can carry at most {group_t} (raise num_key_value_heads to "
                        f"num_attention_heads / {group_t}){RANDOM}")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest scores (ties: the lower index), in ascending order."""
    if k == scores.numel():
        return torch.arange(k)
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


def _rows(heads: torch.Tensor, size: int) -> torch.Tensor:
    """The projection rows of whole heads: head h is rows h*size .. (h+1)*size - 1."""
    return (heads[:, None] * size + torch.arange(size)).reshape(-1)


def pick_heads(q, k, v, o, teacher_config, student_config) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher query heads in student order, teacher kv heads) for one layer: kv heads by their
    groups' scores, the query heads of each kept group by their own (see the module's table).
    q: (H_t*d, D), k, v: (K_t*d, D), o: (D, H_t*d)."""
    heads, groups, d = teacher_config.num_attention_heads, teacher_config.num_key_value_heads, head_dim(teacher_config)
    per_group_t = heads // groups
    per_group_s = student_config.num_attention_heads // student_config.num_key_value_heads
    q_norm = q.reshape(heads, -1).norm(dim=1)
    o_norm = o.reshape(o.shape[0], heads, d).transpose(0, 1).reshape(heads, -1).norm(dim=1)
    kv_norm = k.reshape(groups, -1).norm(dim=1) * v.reshape(groups, -1).norm(dim=1)
    score = (q_norm * o_norm * kv_norm.repeat_interleave(per_group_t)).reshape(groups, per_group_t)
    within = [_top(score[g], per_group_s) for g in range(groups)]          # query head h uses kv head h // group
    kept_groups = _top(torch.stack([score[g][within[g]].sum() for g in range(groups)]),
                       student_config.num_key_value_heads)
    kept_heads = torch.cat([within[g] + g * per_group_t for g in kept_groups.tolist()])
    return kept_heads, kept_groups


@torch.no_grad()
def initialise(student: torch.nn.Module, teacher_config, tensor: Callable[[str], torch.Tensor | None],
               rule: str = "every_kth") -> Plan:
    """Overwrite every weight of `student` (a built Llama, fp32, on the CPU) with the teacher's slices.

    tensor(name) returns the teacher's tensor by its Hugging Face name (model.layers.3.mlp.up_proj.weight),
    in any dtype or device, or None when absent (lm_head of a tied teacher). Returns what was kept.
    """
    s, t = student.config, teacher_config
    check_fits(s, t)

    def read(name: str) -> torch.Tensor:
        value = tensor(name)
        if value is None:
            raise UserError(f"teacher: its weights have no {name}, which student.init: teacher copies{RANDOM}")
        return value.detach().to("cpu").float()   # to the CPU first: no fp32 copy on the GPU

    layers = layer_map(rule, s.num_hidden_layers, t.num_hidden_layers)
    vocab, d = s.vocab_size, head_dim(t)
    embed = read("model.embed_tokens.weight")[:vocab]                                   # (V_s, D_t)
    norms = [read(f"model.layers.{i}.{n}.weight") for i in layers
             for n in ("input_layernorm", "post_attention_layernorm")]
    hidden = _top(embed.norm(dim=0) * torch.stack(norms + [read("model.norm.weight")]).abs().sum(0), s.hidden_size)
    written = []

    def put(param: torch.nn.Parameter, value: torch.Tensor) -> None:
        param.copy_(value)
        written.append(param)

    put(student.get_input_embeddings().weight, embed[:, hidden])
    out = student.get_output_embeddings().weight
    if out is not student.get_input_embeddings().weight:
        head = embed if getattr(t, "tie_word_embeddings", False) else read("lm_head.weight")[:vocab]
        put(out, head[:, hidden])
    elif not getattr(t, "tie_word_embeddings", False):
        log.info("student.init: teacher: the student ties its output layer to its embedding, the teacher does not: "
                 "both start from the teacher's input embedding")
    del embed
    put(student.model.norm.weight, read("model.norm.weight")[hidden])
    plan = Plan(layers, hidden, [], [], [])
    for layer, i in zip(student.model.layers, layers):
        prefix = f"model.layers.{i}."
        q, k, v, o = (read(f"{prefix}self_attn.{n}_proj.weight") for n in "qkvo")
        heads, groups = pick_heads(q, k, v, o, t, s)
        q_rows, kv_rows = _rows(heads, d), _rows(groups, d)
        attn = layer.self_attn
        put(attn.q_proj.weight, q[q_rows][:, hidden])
        put(attn.k_proj.weight, k[kv_rows][:, hidden])
        put(attn.v_proj.weight, v[kv_rows][:, hidden])
        put(attn.o_proj.weight, o[hidden][:, q_rows])
        gate, up, down = (read(f"{prefix}mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
        mlp = _top(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0), s.intermediate_size)
        put(layer.mlp.gate_proj.weight, gate[mlp][:, hidden])
        put(layer.mlp.up_proj.weight, up[mlp][:, hidden])
        put(layer.mlp.down_proj.weight, down[hidden][:, mlp])
        for name in ("input_layernorm", "post_attention_layernorm"):
            put(getattr(layer, name).weight, read(f"{prefix}{name}.weight")[hidden])
        plan.heads.append(heads)
        plan.kv_heads.append(groups)
        plan.mlp.append(mlp)
    done = {id(p) for p in written}
    left = [n for n, p in student.named_parameters() if id(p) not in done]
    if left:   # a student module this copy does not know: better loud than half random
        raise RuntimeError(f"student.init: teacher left {left[:3]} uncopied")
    log.info("student.init: teacher (%s): student layers <- teacher layers %s; kept hidden %d of %d, MLP %d of %d, "
             "heads %d of %d (kv %d of %d), by weight norm", rule, layers, s.hidden_size, t.hidden_size,
             s.intermediate_size, t.intermediate_size, s.num_attention_heads, t.num_attention_heads,
             s.num_key_value_heads, t.num_key_value_heads)
    return plan
