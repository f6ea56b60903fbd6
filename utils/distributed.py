"""Process-group setup and the few collectives the launchers use.

Design choices:
- A process group exists only when torchrun launched us (env RANK and WORLD_SIZE); a plain
  `python pretrain.py` runs single-process without touching torch.distributed.
- The backend follows the device: NCCL for CUDA (one GPU per local rank), gloo for CPU, so the
  same code runs the 2-process CI test on a laptop. An Apple GPU (`device=mps`) runs one process:
  no backend reduces MPS tensors.
- `distributed_context` pairs setup with teardown so the group is destroyed even when training
  raises (a leaked NCCL group makes the other ranks hang until their timeout).
- Gradients are summed with one all-reduce over a flat concatenated buffer: one collective per
  step instead of one per parameter. The same buffer carries one extra element that is NaN on a
  rank whose loss (or other local tensors) is not finite, so after the sum every rank holds the
  same buffer and reaches the same skip/step decision with no extra collective. A rank asking to stop
  (SIGINT / SIGTERM, utils/interrupt.py) sets its finite marker to 1 instead of 0, so the summed marker
  also counts the stop requests: every rank stops at the same step, the gradients summed as before.
- Every collective has a bound: the process group gets `timeout_s` (config `dist_timeout_s`,
  default 600 s, honoured by gloo and by NCCL's watchdog). When a peer dies, gloo fails at once
  ("connection reset"); when it hangs, the collective fails after the timeout. Either way the
  surviving ranks leave through `DistributedFailure`: one line naming the rank, exit status 5.
  Under torchrun the agent also notices a dead worker (every 0.1 s), sends SIGTERM to the
  others and exits non-zero (or restarts the group with `--max-restarts`).
- A DataLoader worker is forked after the process group exists, so it holds copies of the group's
  sockets. When only the training process is killed (a crash, the OOM killer, `kill -9 PID`), the
  loader worker would keep those sockets open until its watchdog notices the missing parent (up to
  5 s), and the peers would not see the connection drop until then. `exit_with_parent` (the loaders'
  `worker_init_fn`) makes the kernel kill the loader worker with its parent (Linux prctl); the worker
  also ignores SIGINT and SIGTERM, which are the training process's to act on (utils/interrupt.py).
- `torchrun --max-restarts N` restarts a failed group, but by default (torch >= 2.5) its workers share
  the agent's TCP store, which outlives the group with the old group's connection keys in it: the new
  workers can read a dead worker's address and fail to connect (seen with torch 2.13 and gloo; see
  pytorch/pytorch#135712). `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` in torchrun's environment gives
  every group a fresh store; rank 0 warns when restarts are enabled without it.
"""

import ctypes
import datetime
import math
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from utils.interrupt import ignore_in_loader_worker

DEFAULT_TIMEOUT_S = 600.0


class DistributedFailure(RuntimeError):
    """A collective failed: another rank died, or did not answer within the process-group timeout."""

    exit_code = 5


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
    """'auto' → CUDA when available, else CPU; 'cuda' picks the GPU of this local rank; 'mps' is Apple's
    GPU, only when asked for (so `auto` computes on a Mac what it always did)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("config key 'device': cuda requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "mps":
        if not torch.backends.mps.is_available():
            built = torch.backends.mps.is_built()
            why = (
                "needs macOS 12.3+ on Apple silicon" if built else "this torch build has none: Apple silicon Macs only"
            )
            raise ValueError(f"config key 'device': device=mps: the MPS backend is not available ({why})")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"config key 'device': expected auto, cuda, mps or cpu, got {name!r}")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed(device_name: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Initialise the process group under torchrun (NCCL on GPU, gloo on CPU); otherwise single process.

    `timeout_s` bounds every collective (and the initial rendezvous) of the group.
    """
    if not launched_by_torchrun():
        return DistInfo(rank=0, world_size=1, local_rank=0, device=resolve_device(device_name))
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"config key 'dist_timeout_s': must be a positive number of seconds, got {timeout_s}")
    if os.environ.get("RANK") == "0" and restarts_share_agent_store():
        print(
            "warning: torchrun --max-restarts with the agent's shared TCP store: a restarted group can read the "
            "previous group's addresses and fail to connect; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
            file=sys.stderr,
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "mps" and int(os.environ["WORLD_SIZE"]) > 1:
        raise ValueError("config key 'device': device=mps runs one process (neither gloo nor NCCL reduces MPS tensors)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def restarts_share_agent_store() -> bool:
    """True under `torchrun --max-restarts N` (N > 0) whose workers use the agent's store (module docstring)."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restarts.isdigit() and int(restarts) > 0


def exit_with_parent(parent_pid: int, exiting: Any = None, _worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: leave SIGINT / SIGTERM to the training process, and on Linux have the kernel
    SIGKILL this loader worker when the process that forked it dies (see module docstring); elsewhere the loader's
    own watchdog still ends it. `exiting`: `utils.interrupt.loader_exit_event()` of the training process."""
    ignore_in_loader_worker(exiting)
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(0)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_collective_failure(error: BaseException) -> bool:
    """True for an exception raised inside a torch.distributed call (gloo raises plain RuntimeErrors)."""
    if isinstance(error, dist.DistError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return any(os.path.join("torch", "distributed") in frame.filename for frame in frames)


def describe_collective_failure(error: BaseException, info: DistInfo, timeout_s: float) -> str:
    """One line: which rank, why, and the bound that applied."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if first.startswith("[") and "] " in first:  # drop gloo's "[/path/to/file.cc:123] " source prefix
        first = first.split("] ", 1)[1]
    first = first.split(". ", 1)[0]
    return (
        f"rank {info.rank} of {info.world_size}: a collective failed ({first}); another rank died or did not "
        f"answer within the process-group timeout (dist_timeout_s={timeout_s:g})"
    )


@contextmanager
def distributed_context(device_name: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistInfo]:
    """setup_distributed / cleanup_distributed as a pair that also tears down on exceptions.

    A failed collective (a peer died or hung) leaves as `DistributedFailure` with a one-line message.
    """
    info = setup_distributed(device_name, timeout_s)
    try:
        yield info
    except (RuntimeError, dist.DistError) as e:
        if info.world_size > 1 and not isinstance(e, DistributedFailure) and is_collective_failure(e):
            raise DistributedFailure(describe_collective_failure(e, info, timeout_s)) from e
        raise
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
def all_reduce_sum_flat_and_check_finite_(
    tensors: Sequence[torch.Tensor], local_checks: Sequence[torch.Tensor] = ()
) -> torch.Tensor:
    """Sum `tensors` across ranks in place (one all-reduce) and return a 0-dim bool tensor, on device,
    that is True on every rank iff every summed value is finite and every `local_checks` tensor was
    finite on every rank. Nothing is read back to the host here.
    """
    return all_reduce_sum_flat_with_votes_(tensors, local_checks)[0]


@torch.no_grad()
def all_reduce_sum_flat_with_votes_(
    tensors: Sequence[torch.Tensor], local_checks: Sequence[torch.Tensor] = (), vote: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`all_reduce_sum_flat_and_check_finite_`, and each rank's `vote` (a stop request) counted in the same
    all-reduce: (all finite, 0-dim float tensor on device: number of ranks voting, NaN when not all finite).
    The vote is the value of the marker element, so the summed gradients are the same with or without it.
    """
    devices = [t.device for t in (*tensors, *local_checks)]
    if not devices:
        return torch.ones((), dtype=torch.bool), torch.tensor(float(vote))
    # One element per rank: 0 (1 with a vote) when its local checks pass, NaN otherwise; NaN survives the sum.
    local_ok = torch.stack([torch.isfinite(t).all() for t in local_checks]).all() if local_checks else True
    marker = torch.where(torch.as_tensor(local_ok, device=devices[0]), float(vote), math.nan).reshape(1)
    dtype = tensors[0].dtype if tensors else marker.dtype
    flat = torch.cat([t.reshape(-1) for t in tensors] + [marker.to(dtype)])  # [sum of numels + 1]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return torch.isfinite(flat).all(), flat[-1].float()
