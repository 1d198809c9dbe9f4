"""student.init: teacher: a student that starts from its teacher's weights (student_init.py), its
layer choice, its width reduction by weight norms, its refusals, and that init random is unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from tune_kd.config.errors import ConfigError, UserError
from tune_kd.config.experiment import ArchSpec, ModelSpec, load_config
from tune_kd.model import build, hardware, student_init

from conftest import TINY_ARCH

VOCAB = 48
FP32 = hardware.resolve_precision("float32", torch.device("cpu"))


class Tokenizer:
    """What build_model reads of a tokenizer."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return VOCAB


def spec(init=None, layers=None, **arch) -> ModelSpec:
    arch = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 64, **arch}
    return ModelSpec(arch=ArchSpec(**arch), init=init, init_layers=layers)


# the teacher's own settings, unlike the student's defaults: the student must take them
TEACHER_SETTINGS = {"rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}


def teacher_model(seed=0, **arch):
    """A built teacher with every weight random, norms included (they start at 1)."""
    torch.manual_seed(seed)
    model = build.build_model(spec(**arch), Tokenizer(), "teacher", TEACHER_SETTINGS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
    return model.eval()


def from_teacher(teacher, teacher_spec=None, **student):
    """A student (init teacher) made from the teacher held in this process."""
    return build.make_student(spec("teacher", **student), Tokenizer(), FP32, teacher_spec or spec(), teacher).eval()


def sequences(n=3, length=12):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(7))


# ---- 1. an equal-shaped student is the teacher ---------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_a_student_shaped_like_the_teacher_reproduces_its_logits_exactly(tie):
    teacher = teacher_model(tie_word_embeddings=tie)
    student = from_teacher(teacher, tie_word_embeddings=tie)
    with torch.no_grad():
        for ids in sequences():
            assert torch.equal(student(ids[None]).logits, teacher(ids[None]).logits)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_a_process_without_the_teacher_reads_it_from_teacher_path_into_the_same_student(tmp_path, teacher_dtype):
    teacher = teacher_model(tie_word_embeddings=False, num_hidden_layers=3)
    teacher.save_pretrained(tmp_path / "teacher")                       # saved in fp32
    precision = hardware.Precision(torch.device("cpu"), None, teacher_dtype, False, "the trial's teacher dtype")
    narrow = spec("teacher", hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
    held = build.make_student(narrow, Tokenizer(), precision, spec(num_hidden_layers=3),
                               copy.deepcopy(teacher).to(teacher_dtype))   # as make_teacher holds it
    read = build.make_student(narrow, Tokenizer(), precision, ModelSpec(path=str(tmp_path / "teacher")), None)
    held_state, read_state = held.state_dict(), read.state_dict()
    assert held_state.keys() == read_state.keys()
    assert all(torch.equal(held_state[k], read_state[k]) and held_state[k].dtype == torch.float32 for k in held_state)


# ---- 2. which teacher layers --------------------------------------------------------------------

def test_layer_rules():
    assert student_init.layer_map("every_kth", 6, 12) == [0, 2, 4, 6, 8, 10]    # DistilBERT's every other layer
    assert student_init.layer_map("every_kth", 3, 4) == [0, 1, 3]               # round(4/3), round(8/3)
    assert student_init.layer_map("every_kth", 2, 5) == [0, 3]                  # 2.5 rounds up
    assert student_init.layer_map("every_kth", 4, 4) == [0, 1, 2, 3]
    assert student_init.layer_map("first", 2, 5) == [0, 1]
    assert student_init.layer_map("last", 2, 5) == [3, 4]


@pytest.mark.parametrize("rule, picked", [("every_kth", [0, 2]), ("first", [0, 1]), ("last", [2, 3]), (None, [0, 2])])
def test_each_student_layer_holds_the_teacher_layer_its_rule_picks(rule, picked):
    teacher = teacher_model(num_hidden_layers=4)
    student = from_teacher(teacher, spec(num_hidden_layers=4), num_hidden_layers=2, layers=rule)
    for layer, t in zip(student.model.layers, picked):
        source = teacher.model.layers[t]
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "input_layernorm"):
            assert torch.equal(layer.get_submodule(name).weight, source.get_submodule(name).weight), (rule, t, name)


# ---- 3. narrower: the highest-norm channels and heads ------------------------------------------

def dominant_teacher(hidden, mlp, groups, heads_in_group, shrink=1e-3):
    """A 2-layer teacher (hidden 32, 4 heads of 8 in 2 kv groups, MLP 64, tied embeddings) whose
    weights outside the given hidden channels, MLP channels (per layer), kv groups and query heads
    are shrunk: the teacher is in effect the narrow model those indices make."""
    teacher = teacher_model(seed=3)
    drop_h = torch.ones(32, dtype=torch.bool)
    drop_h[hidden] = False
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, drop_h] *= shrink
        teacher.model.embed_tokens.weight *= 20       # (tied: the output layer too) peaked, not near-uniform, logits
        for i, layer in enumerate(teacher.model.layers):
            attn, ffn = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, ffn.gate_proj, ffn.up_proj):
                proj.weight[:, drop_h] *= shrink
            for proj in (attn.o_proj, ffn.down_proj):
                proj.weight[drop_h] *= shrink
            drop_m = torch.ones(64, dtype=torch.bool)
            drop_m[mlp[i]] = False
            ffn.gate_proj.weight[drop_m] *= shrink
            ffn.up_proj.weight[drop_m] *= shrink
            ffn.down_proj.weight[:, drop_m] *= shrink
            for g in range(2):
                if g not in groups[i]:
                    attn.k_proj.weight[g * 8:(g + 1) * 8] *= shrink
                    attn.v_proj.weight[g * 8:(g + 1) * 8] *= shrink
            for h in range(4):
                if h not in heads_in_group[i]:
                    attn.q_proj.weight[h * 8:(h + 1) * 8] *= shrink
                    attn.o_proj.weight[:, h * 8:(h + 1) * 8] *= shrink
    return teacher


def kl(teacher_logits, student_logits):
    return torch.nn.functional.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


def test_a_narrower_student_keeps_the_highest_norm_channels_and_whole_gqa_groups():
    hidden = torch.randperm(32, generator=torch.Generator().manual_seed(1))[:16]
    mlp = [torch.randperm(64, generator=torch.Generator().manual_seed(2 + i))[:24] for i in range(2)]
    groups, heads = [[1], [0]], [[2, 3], [0, 1]]             # layer 0 keeps kv head 1 (query heads 2, 3)
    teacher = dominant_teacher(hidden, mlp, groups, heads)
    student = build.build_model(spec(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=24), Tokenizer(), "student")
    plan = student_init.initialise(student, teacher.config, teacher.state_dict().get)
    assert plan.hidden.tolist() == sorted(hidden.tolist())
    assert [m.tolist() for m in plan.mlp] == [sorted(m.tolist()) for m in mlp]
    assert [g.tolist() for g in plan.kv_heads] == groups
    assert [h.tolist() for h in plan.heads] == heads
    for heads_kept, kv_kept in zip(plan.heads, plan.kv_heads):   # student kv head j's query heads used it
        assert (heads_kept.reshape(len(kv_kept), -1) // 2 == kv_kept[:, None]).all()
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, plan.hidden])
    assert torch.equal(student.model.layers[0].self_attn.k_proj.weight,
                       teacher.model.layers[0].self_attn.k_proj.weight[8:16][:, plan.hidden])

    ids = sequences(8, 16)
    torch.manual_seed(11)
    random_student = build.build_model(spec(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                             intermediate_size=24), Tokenizer(), "student").eval()
    with torch.no_grad():
        t, s, r = teacher(ids).logits, student.eval()(ids).logits, random_student(ids).logits
    assert torch.isfinite(s).all()
    assert kl(t, s) < 0.1 * kl(t, r), (kl(t, s), kl(t, r))


def top(scores, k):
    return sorted(torch.sort(scores, descending=True).indices[:k].tolist())


def scaled_rows(rows: int, cols: int, norms: torch.Tensor, seed: int) -> torch.Tensor:
    """A random (rows, cols) matrix whose row blocks (len(norms) of them) have the given L2 norms."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).reshape(len(norms), -1)
    return (w / w.norm(dim=1, keepdim=True) * norms[:, None]).reshape(rows, cols)


def test_hidden_and_mlp_channels_rank_by_the_product_of_their_slices_norms():
    teacher = teacher_model()
    g = torch.Generator().manual_seed(5)
    embed, scale = torch.rand(32, generator=g) + 0.5, torch.rand(32, generator=g) * 4 + 0.1
    gate, up, down = (torch.rand(64, generator=g) * 3 + 0.1 for _ in range(3))
    with torch.no_grad():
        teacher.model.embed_tokens.weight.copy_(scaled_rows(32, VOCAB, embed, 1).T)   # columns of norm embed[c]
        for name, param in teacher.named_parameters():
            if "norm" in name:
                param.copy_(scale)
        mlp = teacher.model.layers[1].mlp
        mlp.gate_proj.weight.copy_(scaled_rows(64, 32, gate, 2))
        mlp.up_proj.weight.copy_(scaled_rows(64, 32, up, 3))
        mlp.down_proj.weight.copy_(scaled_rows(64, 32, down, 4).T)
    student = build.build_model(spec(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=24), Tokenizer(), "student")
    plan = student_init.initialise(student, teacher.config, teacher.state_dict().get)
    assert plan.hidden.tolist() == top(embed * scale, 16)
    assert top(embed * scale, 16) not in (top(embed, 16), top(scale, 16), top(embed + scale, 16))   # the test can tell
    assert plan.mlp[1].tolist() == top(gate * up * down, 24)
    assert top(gate * up * down, 24) not in (top(gate, 24), top(gate + up + down, 24))


def attention(head_scores, groups, d=4, hidden=16):
    """q, k, v, o of one layer whose head h has importance head_scores[h] (k, v, o slices of norm 1)."""
    heads = len(head_scores)
    ones = lambda n: torch.ones(n)  # noqa: E731
    return (scaled_rows(heads * d, hidden, torch.tensor(head_scores), 1),
            scaled_rows(groups * d, hidden, ones(groups), 2), scaled_rows(groups * d, hidden, ones(groups), 3),
            scaled_rows(heads * d, hidden, ones(heads), 4).T)


def shape(heads, kv, d=4):
    from types import SimpleNamespace
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv, head_dim=d, hidden_size=heads * d)


def test_query_heads_rank_within_their_group_and_groups_by_the_heads_they_keep():
    # two groups of four query heads: group 0 has two strong heads, group 1 four middling ones
    q, k, v, o = attention([5, 0.1, 4.9, 0.1, 4, 4.5, 3.5, 4], groups=2)
    heads, groups = student_init.pick_heads(q, k, v, o, shape(8, 2), shape(2, 1))
    assert (heads.tolist(), groups.tolist()) == ([0, 2], [0])        # 9.9 kept beats 8.5 kept (though 16 in all)
    heads, groups = student_init.pick_heads(q, k, v, o, shape(8, 2), shape(4, 1))
    assert (heads.tolist(), groups.tolist()) == ([4, 5, 6, 7], [1])  # four kept: 16 beats 10.1
    heads, groups = student_init.pick_heads(q, k, v, o, shape(8, 2), shape(2, 2))
    assert (heads.tolist(), groups.tolist()) == ([0, 5], [0, 1])     # one per group: each group's best
    q, k, v, o = attention([1, 1, 1, 1], groups=2)
    with torch.no_grad():
        v[4:8] *= 3                                                   # kv head 1's values count too
    assert student_init.pick_heads(q, k, v, o, shape(4, 2), shape(2, 1))[1].tolist() == [1]


# ---- 4. refusals, one line each, naming the key -------------------------------------------------

@pytest.mark.parametrize("teacher, student, key", [
    ({}, {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4},
     "student.arch.hidden_size 64 > the teacher's 32"),
    ({}, {"num_hidden_layers": 3}, "student.arch.num_hidden_layers 3 > the teacher's 2"),
    ({}, {"intermediate_size": 128}, "student.arch.intermediate_size 128 > the teacher's 64"),
    ({"num_key_value_heads": 1}, {}, "student.arch.num_key_value_heads 2 > the teacher's 1"),
    ({}, {"hidden_size": 16, "num_attention_heads": 4}, "student.arch.num_attention_heads: the student's head_dim 4"),
    ({"num_key_value_heads": 4}, {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1},
     "student.arch.num_key_value_heads: the student shares each kv head among 2"),
])
def test_students_the_teacher_cannot_narrow_into_are_refused(teacher, student, key):
    with pytest.raises(UserError) as refused:
        from_teacher(teacher_model(**teacher), spec(**teacher), **student)
    assert key in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


def test_moe_and_foreign_teachers_are_refused():
    moe = build.build_model(spec(num_experts=2), Tokenizer(), "teacher")
    with pytest.raises(UserError, match="MoE init is not supported yet"):
        from_teacher(moe, spec(num_experts=2))
    from transformers import Qwen2Config
    with pytest.raises(UserError, match="teacher: a qwen2 model"):
        student_init.check_teacher(Qwen2Config(hidden_size=32, num_attention_heads=4, num_hidden_layers=2))


CONFIG_REFUSALS = [
    ({"student": {"path": "somewhere", "init": "teacher"}}, "student.init: teacher builds the student"),
    ({"teacher": {"path": "t", "init": "teacher"}}, "teacher.init: only the student"),
    ({"teacher": {"path": "t", "init_layers": "first"}}, "teacher.init_layers: only the student"),
    ({"student": {"arch": {"hidden_size": 32, "num_experts": 2}, "init": "teacher"}}, "student.arch.num_experts"),
    ({"teacher": {"path": "t", "trust_remote_code": True}}, "teacher.trust_remote_code"),
    ({"student": {"preset": "minimind-student", "init_layers": "last"}}, "student.init_layers: is only used"),
    ({"teacher": None, "train": {"alpha": 1.0}}, "student.init: teacher needs a teacher"),
    ({"student": {"preset": "minimind-student", "init": "teachers"}}, "student.init"),
]


@pytest.mark.parametrize("sections, message", CONFIG_REFUSALS)
def test_config_refusals_name_the_key(sections, message):
    raw = {"teacher": {"path": "t"}, "student": {"preset": "minimind-student", "init": "teacher"}, **sections}
    with pytest.raises(ConfigError) as refused:
        load_config(raw=raw)
    assert len(refused.value.problems) == 1 and message in refused.value.problems[0], refused.value.problems


# ---- 5. init random is today's student --------------------------------------------------------

def test_init_random_and_the_order_of_building_keep_the_weights_bit_for_bit():
    torch.manual_seed(0)
    before = build.make_student(spec(), Tokenizer(), FP32).state_dict()
    torch.manual_seed(0)
    now = build.make_student(spec("random"), Tokenizer(), FP32).state_dict()
    assert all(torch.equal(before[k], now[k]) for k in before)

    class Config:   # make_models: the student before the teacher, as the loop always built them
        teacher, student = spec(hidden_size=64, num_attention_heads=8), spec("random")
    torch.manual_seed(0)
    student, teacher = build.make_models(Config, Tokenizer(), FP32)
    torch.manual_seed(0)
    old_student = build.make_student(spec(), Tokenizer(), FP32)
    old_teacher = build.make_teacher(Config.teacher, Tokenizer(), FP32)
    for new, old in ((student, old_student), (teacher, old_teacher)):
        assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))


# ---- 6. training: a head start -------------------------------------------------------------------

def test_a_student_started_from_the_teacher_is_ahead_after_one_epoch(tiny_config):
    from tune_kd.train.loop import train

    # the world's teacher: hidden 64, 2 heads of 32; a student of 1 head keeps its head_dim
    arch = dict(TINY_ARCH, num_attention_heads=1)
    common = {"train": {"epochs": 1}, "data": {"max_train_examples": 300}}
    started = train(tiny_config(student={"arch": arch, "init": "teacher"}, **common)).metrics
    fresh = train(tiny_config(student={"arch": arch}, **common)).metrics
    assert started["val_ce"] < fresh["val_ce"] - 0.1, (started["val_ce"], fresh["val_ce"])


def test_head_dim_set_apart_lets_width_and_heads_vary_alone():
    """arch.head_dim (as Gemma and Qwen3 set it): a student half the teacher's width keeps 4 whole heads
    of the teacher's 8 dims (hidden 16 < 4 x 8 = 32 query channels), built, initialised and runnable; the
    same teacher's shape with head_dim given reproduces its logits, as without it."""
    teacher = teacher_model(head_dim=8)
    assert teacher.config.head_dim == 8 == teacher.config.hidden_size // teacher.config.num_attention_heads
    student = from_teacher(teacher, hidden_size=16, head_dim=8)
    attention = student.model.layers[0].self_attn
    assert (attention.q_proj.weight.shape, attention.o_proj.weight.shape) == ((32, 16), (16, 32))
    with torch.no_grad():
        assert torch.isfinite(student(sequences()).logits).all()
        assert torch.equal(from_teacher(teacher, head_dim=8)(sequences()).logits, teacher(sequences()).logits)
    from tune_kd.model.student_shape import shape_problem

    assert shape_problem({"hidden_size": 16, "num_attention_heads": 4, "head_dim": 8}) is None
    assert shape_problem({"hidden_size": 16, "num_attention_heads": 3, "head_dim": 8}) is None   # 24 query channels
    assert "head_dim 7 is odd" in shape_problem({"hidden_size": 16, "num_attention_heads": 4, "head_dim": 7})
