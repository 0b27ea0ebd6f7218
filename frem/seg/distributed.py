"""Multi-GPU training through PyTorch's own engine: ``torchrun ... -m frem train``.

FREM needs no communication: its channels are a pure function of (seed,
epoch), so every rank draws the same ones. DDP averages the gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def resolve_device(name) -> torch.device:
    """``--device``: ``auto`` (every command's default) is cuda where there is one, else the CPU."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"--device {name}: there is no CUDA GPU on this machine (or no driver for it): use "
                             "--device cpu, or auto (a GPU where there is one)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
                             f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available here: use --device cpu or auto")
    return device


def setup(device_name: str) -> tuple[Context, torch.device]:
    """Read torchrun's environment, start the process group, pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    context = Context(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", context.local_rank if context.active else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if context.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return context, device


def teardown(context: Context) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.active:
        dist.barrier()
