"""Device and precision resolution; loading or building teacher and student; compatibility checks.

Precision is decided here, once, with the reason logged:

    device  requested   student                          teacher weights
    cuda    bfloat16    fp32 master weights, bf16 autocast  bf16
    cuda    float16     fp32 master weights, fp16 autocast + GradScaler  fp16
    cpu     bfloat16    bf16 autocast only where the CPU has native bf16 (AVX512-BF16/AMX), else fp32
    any     float32     fp32                             fp32

Models come from a local Hugging Face directory (safetensors only, trust_remote_code off unless
the YAML allows it) or are built from a preset / architecture spec as a Llama-family model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tune_kd.config import ModelSpec, UserError

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


def quiet_progress_bars() -> None:
    """transformers draws a progress bar per load/save; a training log wants one line per event."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    device: torch.device
    autocast_dtype: torch.dtype | None     # None: no autocast, plain fp32
    teacher_dtype: torch.dtype
    grad_scaler: bool                      # fp16 needs loss scaling; bf16 and fp32 do not
    reason: str

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device: {requested!r} asked for, but CUDA is not available here (use auto or cpu)")
    return device


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    """Pick autocast dtype, teacher weight dtype and loss scaling for `dtype` on `device`."""
    fp32 = torch.float32
    if dtype == "float32":
        return Precision(device, None, fp32, False, "float32 requested")
    if device.type == "cuda":
        if dtype == "float16":
            return Precision(device, torch.float16, torch.float16, True, "float16 requested: fp16 autocast with GradScaler")
        if torch.cuda.is_bf16_supported():
            return Precision(device, torch.bfloat16, torch.bfloat16, False, "bfloat16 autocast, teacher weights in bf16")
        return Precision(device, None, fp32, False, f"{torch.cuda.get_device_name(device)} has no bf16: using fp32")
    if device.type == "cpu" and dtype == "bfloat16" and cpu_has_native_bf16():
        return Precision(device, torch.bfloat16, torch.bfloat16, False, "CPU has native bf16: bf16 autocast")
    return Precision(device, None, fp32, False,
                     f"{dtype} requested but {device.type} has no native {dtype} support: using fp32 "
                     "(emulated low precision would be slower and less accurate)")


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
    if arch["hidden_size"] % arch["num_attention_heads"]:
        raise UserError(f"{role}.arch: hidden_size {arch['hidden_size']} is not divisible by "
                        f"num_attention_heads {arch['num_attention_heads']}")
    if arch["num_attention_heads"] % arch["num_key_value_heads"]:
        raise UserError(f"{role}.arch: num_attention_heads {arch['num_attention_heads']} is not divisible by "
                        f"num_key_value_heads {arch['num_key_value_heads']}")
    return arch


def build_model(spec: ModelSpec, tokenizer, role: str):
    """A freshly initialised Llama-family model (fp32) with the tokenizer's vocab and special ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         attn_implementation="sdpa", **architecture(spec, role))
    return LlamaForCausalLM(config)


def load_model_dir(path: str, role: str, trust_remote_code: bool, dtype: torch.dtype):
    """Load a causal LM from a local HF directory: safetensors only, remote code only when allowed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{role}.path: {path} is not a directory (give a local Hugging Face model directory)")
    if not (list(directory.glob("*.safetensors")) or list(directory.glob("*.safetensors.index.json"))):
        raise UserError(f"{role}.path: {path} has no *.safetensors weights (only safetensors are loaded; convert "
                        "pickled .bin weights with save_pretrained(safe_serialization=True))")
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(directory), config=config, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code,
                                                     attn_implementation="sdpa")
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{role}.path: {path} needs custom code; set {role}.trust_remote_code: true only if you "
                            "trust its source") from None
        raise UserError(f"{role}.path: {path}: cannot load model ({str(exc).splitlines()[0]})") from None
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{role}.path: {path}: cannot load model ({str(exc).splitlines()[0]})") from None
    return model


def make_student(spec: ModelSpec, tokenizer, precision: Precision):
    """The student: fp32 master weights on the device, in train mode."""
    if spec.path is not None:
        model = load_model_dir(spec.path, "student", spec.trust_remote_code, torch.float32)
    else:
        model = build_model(spec, tokenizer, "student")
    return model.to(precision.device).train()


def make_teacher(spec: ModelSpec, tokenizer, precision: Precision):
    """The teacher: eval mode, frozen, weights in precision.teacher_dtype on the device."""
    if spec.path is not None:
        model = load_model_dir(spec.path, "teacher", spec.trust_remote_code, precision.teacher_dtype)
    else:  # an untrained teacher is only useful in tests, but the spec allows it
        model = build_model(spec, tokenizer, "teacher").to(precision.teacher_dtype)
    model.eval().requires_grad_(False)
    return model.to(precision.device)


def maybe_compile(setting: str, device: torch.device, *lms) -> bool:
    """torch.compile the transformer bodies of `lms` in place when `setting` says so (auto: CUDA only).

    In place keeps state-dict keys plain; dynamic=True because bucketed batches vary in shape.
    """
    enabled = setting == "on" or (setting == "auto" and device.type == "cuda")
    if enabled:
        for lm in lms:
            if lm is not None:
                lm.base_model.compile(dynamic=True)
    return enabled


def vocab_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_compatibility(teacher, student, tokenizer) -> int | None:
    """Check the two models can be distilled with this tokenizer.

    Returns the number of teacher logit columns to keep (None: all), when the teacher has extra
    vocab rows that are padding the tokenizer never emits; raises UserError otherwise.
    """
    n_tok, n_student = len(tokenizer), vocab_rows(student)
    if n_student < n_tok:
        raise UserError(f"student vocab has {n_student} rows but the tokenizer emits {n_tok} ids: the student was built "
                        "for another tokenizer (rebuild it from this tokenizer)")
    if teacher is None:
        return None
    n_teacher = vocab_rows(teacher)
    if n_teacher < n_student:
        raise UserError(f"teacher vocab ({n_teacher}) is smaller than the student's ({n_student}): they cannot share a "
                        "tokenizer (use a student built with this teacher's tokenizer)")
    if n_teacher > n_student:
        log.info("teacher has %d vocab rows, student %d: the tokenizer never emits ids >= %d, so the teacher's extra "
                 "%d rows are padding and are dropped from its logits", n_teacher, n_student, n_tok,
                 n_teacher - n_student)
        return n_student
    return None


def tokenizer_dir(teacher: ModelSpec | None, student: ModelSpec, explicit: str | None) -> str:
    """Which tokenizer to use: explicit, else the teacher's directory, else the student's."""
    for candidate in (explicit, teacher.path if teacher else None, student.path):
        if candidate is not None:
            return candidate
    raise UserError("tokenizer: required when neither teacher nor student is a model directory "
                    "(set tokenizer: to a local HF tokenizer dir)")


def check_shared_tokenizer(tokenizer, teacher: ModelSpec | None, student: ModelSpec, used: str) -> None:
    """Every model directory that ships a tokenizer must ship the same vocabulary as the one used."""
    from transformers import AutoTokenizer

    vocab = tokenizer.get_vocab()
    for role, spec in (("teacher", teacher), ("student", student)):
        if spec is None or spec.path is None or Path(spec.path) == Path(used):
            continue
        if not any((Path(spec.path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            continue
        other = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=False)
        if other.get_vocab() != vocab:
            raise UserError(f"{role}.path: {spec.path} ships a tokenizer different from {used}: teacher and student "
                            "must share one tokenizer")
