"""The machine a run uses: its device, its precision (and why), and the process's memory hygiene."""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tune_kd.config.errors import UserError

log = logging.getLogger(__name__)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere). CPU
    training allocates and frees tensors of many sizes each step, and glibc keeps what was freed: a
    trial at V = 151,936 held 1.96 GB at peak, 1.5 GB when trimmed after every step (at ~10% of the
    step's time on the 2-core CPU; GPU steps leave the host heap alone and are not trimmed)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


LOG_FORMAT = {"format": "%(asctime)s %(message)s", "datefmt": "%H:%M:%S"}


class CurrentStderr(logging.StreamHandler):
    """A log handler writing to sys.stderr as it is at each line, not as it was when the handler
    was made: Ray points sys.stderr at each trial's own stderr.log, and a reused trial actor runs
    several trials, each with its own."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):   # StreamHandler.__init__ and setStream assign it; sys.stderr is the stream
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """How every tune_kd process logs (a command, a trial, the served teacher's actor): lines with
    the time on stderr (CurrentStderr) at `level`, transformers' progress bars off (a log wants one
    line per event). Nothing changes where the root logger already has a handler."""
    logging.basicConfig(level=level, handlers=[CurrentStderr()], **LOG_FORMAT)
    quiet_progress_bars()


def quiet_progress_bars() -> None:
    """transformers draws a progress bar per load/save; a log wants one line per event."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


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
