"""Process-group setup and the few collectives the launchers use.

Design choices:
- A process group exists only when torchrun launched us (env RANK and WORLD_SIZE); a plain
  `python pretrain.py` runs single-process without touching torch.distributed.
- The backend follows the device: NCCL for CUDA (one GPU per local rank), gloo for CPU, so the
  same code runs the 2-process CI test on a laptop.
- `distributed_context` pairs setup with teardown so the group is destroyed even when training
  raises (a leaked NCCL group makes the other ranks hang until their timeout).
- Gradients are summed with one all-reduce over a flat concatenated buffer: one collective per
  step instead of one per parameter.
"""

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda' picks the GPU of this local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("config key 'device': cuda requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"config key 'device': expected auto, cuda or cpu, got {name!r}")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed(device_name: str = "auto") -> DistInfo:
    """Initialise the process group under torchrun (NCCL on GPU, gloo on CPU); otherwise single process."""
    if not launched_by_torchrun():
        return DistInfo(rank=0, world_size=1, local_rank=0, device=resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_context(device_name: str = "auto") -> Iterator[DistInfo]:
    """setup_distributed / cleanup_distributed as a pair that also tears down on exceptions."""
    info = setup_distributed(device_name)
    try:
        yield info
    finally:
        cleanup_distributed()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank `src`'s `obj` on every rank (identity when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


@torch.no_grad()
def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (after model creation)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor, src=src)


@torch.no_grad()
def all_reduce_sum_flat_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum `tensors` across ranks in place with a single all-reduce over one flat buffer."""
    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])  # [sum of numels]
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
