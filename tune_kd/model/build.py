"""Device and precision resolution; loading or building teacher and student; compatibility checks
(vocabulary sizes, padded rows). scored.py runs either model on its scored positions.

Precision is decided here, once, with the reason logged:

    device  requested   student                          teacher weights
    cuda    bfloat16    fp32 master weights, bf16 autocast  bf16
    cuda    float16     fp32 master weights, fp16 autocast + GradScaler  fp16
    cpu     bfloat16    bf16 autocast only where the CPU has native bf16 (AVX512-BF16/AMX), else fp32
    any     float32     fp32                             fp32

Models come from a local Hugging Face directory (safetensors by default; pickle-based weights only
when the YAML allows them, then through torch.load(weights_only=True); trust_remote_code off unless
the YAML allows it) or are built from a preset / architecture spec as a Llama-family model, whose
weights may start from the teacher's (student.init: teacher, student_init.py). The driver checks
both directories on the meta device (preflight) before any trial starts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import ModelSpec
from tune_kd.model import student_init
from tune_kd.model.hardware import Precision

log = logging.getLogger(__name__)

# Presets for the seed's sizes (MiniMind: vocab 6400, max_seq_len 512; its heads 8, kv heads 2).
# The vocab always comes from the tokenizer actually used.
PRESETS = {
    "minimind-student": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                         "num_key_value_heads": 2, "max_position_embeddings": 512},
    "minimind-teacher": {"hidden_size": 768, "num_hidden_layers": 16, "num_attention_heads": 8,
                         "num_key_value_heads": 2, "max_position_embeddings": 512},
}
DEFAULT_ARCH = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                "max_position_embeddings": 512, "tie_word_embeddings": True}


# ----------------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Building and loading models
# ----------------------------------------------------------------------------------------------

def seed_intermediate_size(hidden_size: int) -> int:
    """The seed's MLP width: 8/3 * hidden, rounded up to a multiple of 64."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


def architecture(spec: ModelSpec, role: str) -> dict:
    """The resolved architecture keys of a built model: defaults < preset < explicit arch keys."""
    arch = dict(DEFAULT_ARCH)
    if spec.preset is not None:
        if spec.preset not in PRESETS:
            raise UserError(f"{role}.preset: unknown preset {spec.preset!r} (allowed: {', '.join(PRESETS)})")
        arch.update(PRESETS[spec.preset])
    if spec.arch is not None:
        arch.update({k: v for k, v in asdict(spec.arch).items() if v is not None})
    arch.setdefault("num_key_value_heads", arch["num_attention_heads"])
    if arch.get("intermediate_size") is None:
        arch["intermediate_size"] = seed_intermediate_size(arch["hidden_size"])
    if arch.get("num_experts") is not None:
        arch.setdefault("num_experts_per_tok", 2)
        arch.setdefault("router_aux_loss_coef", 0.01)
        if not 1 <= arch["num_experts_per_tok"] <= arch["num_experts"]:
            raise UserError(f"{role}.arch.num_experts_per_tok: must be in [1, num_experts = {arch['num_experts']}], "
                            f"got {arch['num_experts_per_tok']}")
    elif arch.get("num_experts_per_tok") is not None or arch.get("router_aux_loss_coef") is not None:
        raise UserError(f"{role}.arch: num_experts_per_tok / router_aux_loss_coef need num_experts (an MoE model)")
    if arch.get("head_dim") is None and arch["hidden_size"] % arch["num_attention_heads"]:
        raise UserError(f"{role}.arch: hidden_size {arch['hidden_size']} is not divisible by "
                        f"num_attention_heads {arch['num_attention_heads']}")
    if arch["num_attention_heads"] % arch["num_key_value_heads"]:
        raise UserError(f"{role}.arch: num_attention_heads {arch['num_attention_heads']} is not divisible by "
                        f"num_key_value_heads {arch['num_key_value_heads']}")
    return arch


def build_model(spec: ModelSpec, tokenizer, role: str, settings: dict | None = None):
    """A freshly initialised Llama-family model (fp32) with the tokenizer's vocab and special ids;
    with arch.num_experts, its mixture-of-experts variant (Mixtral: Llama attention, routed FFNs).
    settings: further config keys (student_init.inherited_settings), none by default."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    arch = architecture(spec, role)
    special = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "attn_implementation": "sdpa", **(settings or {})}
    if arch.get("num_experts") is None:
        return LlamaForCausalLM(LlamaConfig(**special, **arch))
    config = MixtralConfig(**special, num_local_experts=arch.pop("num_experts"), output_router_logits=True, **arch)
    return MixtralForCausalLM(config)


def moe_settings(config) -> tuple[int, int, float] | None:
    """(experts, experts per token, aux loss weight) of a mixture-of-experts model, else None."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not experts or not hasattr(config, "router_aux_loss_coef"):
        return None
    return int(experts), int(getattr(config, "num_experts_per_tok", 2)), float(config.router_aux_loss_coef)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def weight_files(spec: ModelSpec, role: str) -> tuple[str, list[Path]]:
    """("safetensors" | "pickle", files): a model directory's weights. Pickle-based files are refused
    unless the YAML allows them (unpickling can run arbitrary code)."""
    directory = Path(spec.path)
    if not directory.is_dir():
        raise UserError(f"{role}.path: {spec.path} is not a directory (give a local Hugging Face model directory)")
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        return "safetensors", safetensors
    pickled = sorted({f for pattern in PICKLE_WEIGHTS for f in directory.glob(pattern)})
    if pickled and not spec.allow_pickle_weights:
        raise UserError(f"{role}.path: {spec.path} holds only pickle-based weights ({pickled[0].name}), refused because "
                        "unpickling can run code: convert them with save_pretrained(safe_serialization=True), or, if "
                        f"you trust their source, set {role}.allow_pickle_weights: true (loaded with weights_only=True)")
    if pickled:
        return "pickle", pickled
    raise UserError(f"{role}.path: {spec.path} holds no weights (no *.safetensors file): point it at a saved model "
                    "directory (save_pretrained)")


def load_pickled_weights(files: list[Path], role: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """State dict from pickle-based files with torch.load(weights_only=True): tensors only, no code."""
    import pickle

    state = {}
    for file in files:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise UserError(f"{role}.path: {file}: refused or unreadable under torch.load(weights_only=True) "
                            f"({str(exc).splitlines()[0][:200]}): convert it to safetensors") from None
        if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
            raise UserError(f"{role}.path: {file} is not a state dict of tensors (save model.state_dict())")
        state.update(loaded)
    return state


def weight_shapes(kind: str, files: list[Path], role: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from file headers (safetensors) or a memory map (pickle)."""
    if kind == "pickle":
        return {k: tuple(v.shape) for k, v in load_pickled_weights(files, role, mmap=True).items()}
    from safetensors import safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
        except Exception as exc:   # safetensors raises its own SafetensorError for damaged files
            raise UserError(f"{role}.path: {file} is not a readable safetensors file ({exc}): re-save the model") from None
    return shapes


def weights_fit(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps `shapes` (a checkpoint) from loading into `model`: missing tensors and wrong shapes.

    Tied tensors (lm_head = embed_tokens) are one parameter under several names; any one name will do.
    """
    aliases: dict[int, list[str]] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(tensor), []).append(name)
        expected[name] = tuple(tensor.shape)
    persistent = set(model.state_dict())
    for name, tensor in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            aliases.setdefault(id(tensor), []).append(name)
            expected[name] = tuple(tensor.shape)
    missing = [names[0] for names in aliases.values() if not any(n in shapes for n in names)]
    wrong = [f"{n} is {list(shapes[n])}, expected {list(expected[n])}" for n in expected
             if n in shapes and shapes[n] != expected[n]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing ({', '.join(missing[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape ({'; '.join(wrong[:3])})")
    return problems


def model_config(spec: ModelSpec, role: str):
    """The directory's config.json, with remote code only when the YAML allows it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{role}.path: {spec.path} needs custom code; set {role}.trust_remote_code: true only if "
                            "you trust its source") from None
        raise UserError(f"{role}.path: {spec.path}: cannot read its config.json ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise UserError(f"{role}.path: {spec.path}: cannot read its config.json ({str(exc).splitlines()[0]})") from None


def inspect_model_dir(spec: ModelSpec, role: str):
    """Everything about a model directory that can fail, checked without loading its weights: the
    config (and its need for remote code), the weight format, and that every tensor fits the declared
    architecture. Returns (the model skeleton on the meta device, its config, weight kind, files)."""
    from transformers import AutoModelForCausalLM

    kind, files = weight_files(spec, role)
    config = model_config(spec, role)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    problems = weights_fit(skeleton, weight_shapes(kind, files, role))
    if problems:
        raise UserError(f"{role}.path: {spec.path}: the weights do not fit the architecture in its config.json: "
                        f"{'; '.join(problems)} (were the files of two models mixed?)")
    return skeleton, config, kind, files


def load_model_dir(spec: ModelSpec, role: str, dtype: torch.dtype):
    """Load a causal LM from a local HF directory, after inspect_model_dir's checks."""
    from transformers import AutoModelForCausalLM

    _, config, kind, files = inspect_model_dir(spec, role)
    try:
        if kind == "safetensors":
            return AutoModelForCausalLM.from_pretrained(spec.path, config=config, dtype=dtype, use_safetensors=True,
                                                        trust_remote_code=spec.trust_remote_code,
                                                        attn_implementation="sdpa")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code,
                                                 attn_implementation="sdpa")
        model.load_state_dict(load_pickled_weights(files, role), strict=False)   # fit checked above
        model.tie_weights()
        return model
    except (ValueError, OSError, RuntimeError) as exc:
        raise UserError(f"{role}.path: {spec.path}: cannot load model ({str(exc).splitlines()[0]})") from None


def preflight(cfg, tokenizer, teacher_tokenizer=None) -> None:
    """The driver's check of both models before any trial starts: directories, weights, remote code,
    architecture fit, vocab sizes and (student.init: teacher) that the student can start from the
    teacher, on the meta device (no weights are loaded). teacher_tokenizer: the teacher's, when it
    differs from the student's `tokenizer` (distilling across tokenizers)."""
    skeletons = {}
    for role, spec in (("teacher", cfg.teacher), ("student", cfg.student)):
        if spec is None:
            continue
        if spec.path is not None:
            skeletons[role] = inspect_model_dir(spec, role)[0]
        else:
            with torch.device("meta"):
                skeletons[role] = build_model(spec, teacher_tokenizer or tokenizer if role == "teacher" else tokenizer,
                                              role)
    if cfg.student.init == "teacher" and "teacher" in skeletons:
        if teacher_tokenizer is not None:
            raise UserError("student.init: teacher copies the teacher's embeddings, which index the teacher's "
                            "tokenizer, not the student's: drop student.init, or give the student the teacher's tokenizer")
        student_init.check_fits(skeletons["student"].config, skeletons["teacher"].config)
    teacher = skeletons.get("teacher")
    check_models(tokenizer, skeletons["student"], teacher, teacher_tokenizer)


def check_models(tokenizer, student, teacher, teacher_tokenizer=None) -> int | None:
    """Both models' output rows against their tokenizers; the teacher's vocabulary columns the
    divergence (and the teacher cache) compares (check_vocab). teacher: the model, its row count (a
    served one), or None. Across tokenizers each model is checked against its own, and the
    teacher's columns are its tokenizer's ids (None: all rows)."""
    rows = teacher if teacher is None or isinstance(teacher, int) else vocab_rows(teacher)
    if teacher_tokenizer is None:
        return check_vocab(len(tokenizer), vocab_rows(student), rows)
    check_vocab(len(tokenizer), vocab_rows(student), None)
    return teacher_columns(len(teacher_tokenizer), rows)


def teacher_columns(n_tok: int, n_teacher: int) -> int | None:
    """A teacher on its own tokenizer: the columns its ids use (None: every row), or a UserError when
    it has fewer rows than its tokenizer has ids."""
    if n_teacher < n_tok:
        raise UserError(f"teacher vocab has {n_teacher} rows but its tokenizer emits {n_tok} ids: the teacher was built "
                        "for another tokenizer (set teacher.tokenizer to the teacher's own)")
    return None if n_teacher == n_tok else n_tok


def make_models(cfg, tokenizer, precision: Precision, teacher_here: bool = True, teacher_tokenizer=None):
    """(student, teacher or None) as every process that makes a trial's models makes them; the teacher
    only when teacher_here (else another process serves it), built for teacher_tokenizer when it has
    its own. The student comes first, its random init drawing from the seed as it always has, except
    that a student initialised from the teacher needs the teacher's weights (and then keeps none of
    what its random init drew)."""
    teacher_lm = None
    teacher_tokenizer = teacher_tokenizer or tokenizer
    if teacher_here and cfg.teacher is not None and cfg.student.init == "teacher":
        teacher_lm = make_teacher(cfg.teacher, teacher_tokenizer, precision)
    lm = make_student(cfg.student, tokenizer, precision, cfg.teacher, teacher_lm)
    if teacher_here and cfg.teacher is not None and teacher_lm is None:
        teacher_lm = make_teacher(cfg.teacher, teacher_tokenizer, precision)
    return lm, teacher_lm


def make_student(spec: ModelSpec, tokenizer, precision: Precision, teacher_spec: ModelSpec | None = None,
                 teacher_lm=None):
    """The student: fp32 master weights on the device, in train mode; with spec.init teacher, started
    from the teacher's weights (teacher_lm where this process holds it, else teacher_spec.path)."""
    if spec.path is not None:
        model = load_model_dir(spec, "student", torch.float32)
    elif spec.init == "teacher":
        model = student_from_teacher(spec, tokenizer, precision, teacher_spec, teacher_lm)
    else:
        model = build_model(spec, tokenizer, "student")
    return model.to(precision.device).train()


def student_from_teacher(spec: ModelSpec, tokenizer, precision: Precision, teacher_spec: ModelSpec | None,
                         teacher_lm=None):
    """The student built from its arch (with the teacher's activation, norm epsilon and rotary
    settings), then initialised from the teacher's weights (student_init.py), in fp32 on the CPU.
    The teacher's tensors are taken as the trial's teacher holds them (precision.teacher_dtype),
    from teacher_lm or read from teacher_spec.path, so every process makes the same student."""
    if teacher_lm is not None:
        config, tensor = teacher_lm.config, teacher_lm.state_dict().get
    elif teacher_spec is not None and teacher_spec.path is not None:
        # This process does not hold the teacher (a served one answers for it: teacher_server), yet
        # its student must be the one a process holding it makes. Read the teacher's tensors from
        # its directory on the CPU, one at a time as they are copied, each rounded to the dtype the
        # teacher runs in; they are freed when the copy is done (nothing keeps a second teacher).
        config, tensor = model_config(teacher_spec, "teacher"), stored_tensors(teacher_spec, precision.teacher_dtype)
    else:
        raise UserError("student.init: teacher needs the teacher's weights: this process holds no teacher and "
                        "teacher.path is not set (give teacher.path, or use student.init: random)")
    student_init.check_teacher(config)
    model = build_model(spec, tokenizer, "student", student_init.inherited_settings(config))
    student_init.initialise(model, config, tensor, spec.init_layers or "every_kth")
    return model


def stored_tensors(spec: ModelSpec, dtype: torch.dtype):
    """name -> the tensor stored in a model directory (in `dtype`), or None; read one tensor a call."""
    try:
        kind, files = weight_files(spec, "teacher")
    except UserError as exc:   # e.g. teacher_server.url's folder: a config and a tokenizer, no weights
        raise UserError(f"student.init: teacher reads the teacher's weights here: {exc}") from None
    if kind == "pickle":
        state = load_pickled_weights(files, "teacher", mmap=True)
        return lambda name: state[name].to(dtype) if name in state else None
    from safetensors import safe_open

    def tensor(name: str) -> torch.Tensor | None:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                if name in handle.keys():
                    return handle.get_tensor(name).to(dtype)
        return None
    return tensor


def make_teacher(spec: ModelSpec, tokenizer, precision: Precision):
    """The teacher: eval mode, frozen, weights in precision.teacher_dtype on the device."""
    if spec.path is not None:
        model = load_model_dir(spec, "teacher", precision.teacher_dtype)
    else:  # an untrained teacher is only useful in tests, but the spec allows it
        model = build_model(spec, tokenizer, "teacher").to(precision.teacher_dtype)
    model.eval().requires_grad_(False)
    return model.to(precision.device)


def vocab_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_vocab(n_tok: int, n_student: int, n_teacher: int | None) -> int | None:
    """The number of vocabulary columns the divergence (and the teacher cache) compares: None for all
    of them when both models have exactly the tokenizer's ids, else n_tok. Rows past the tokenizer's
    last id are padding (Qwen2.5 pads 151,646 ids to 151,936 rows): the tokenizer never emits them, so
    they carry no distribution to learn. Raises UserError when a model has fewer rows than the
    tokenizer has ids (it was built for another tokenizer)."""
    if n_student < n_tok:
        raise UserError(f"student vocab has {n_student} rows but the tokenizer emits {n_tok} ids: the student was built "
                        "for another tokenizer (rebuild it from this tokenizer)")
    if n_teacher is None:
        return None
    if n_teacher < n_tok:
        raise UserError(f"teacher vocab has {n_teacher} rows but the tokenizer emits {n_tok} ids: the teacher was built "
                        "for another tokenizer (use a student built with this teacher's tokenizer)")
    if n_teacher == n_student == n_tok:
        return None
    log.info("vocab: tokenizer %d ids, student %d rows, teacher %d rows: rows past id %d are padding the tokenizer "
             "never emits; the divergence compares the first %d columns (the student's CE keeps all its rows)",
             n_tok, n_student, n_teacher, n_tok - 1, n_tok)
    return n_tok
