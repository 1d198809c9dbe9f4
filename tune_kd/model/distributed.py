"""Data-parallel set-up: which rank, of how many, on which device a training run is.

Without --ddp a run is rank 0 of 1 on train.device. Under torchrun with --ddp each process joins
the process group (NCCL on GPU, gloo on CPU) on its own GPU (LOCAL_RANK).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from tune_kd.config.errors import UserError
from tune_kd.model import hardware


def setup_distributed(ddp: bool, requested_device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); under torchrun with --ddp: NCCL on GPU, gloo on CPU."""
    if not ddp:
        return 0, 1, hardware.resolve_device(requested_device)
    if "RANK" not in os.environ:
        raise UserError("--ddp needs to be launched by torchrun (torchrun --nproc_per_node N -m tune_kd.train --ddp)")
    device = hardware.resolve_device(requested_device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # torchrun shows every GPU; a launcher may show each worker only its own
        device = torch.device("cuda", local_rank if local_rank < torch.cuda.device_count() else 0)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device
