"""The train state: what a run holds between steps, and its save / read / restore for exact resume.

Design choices:
- `TrainState` is a dataclass with `state_dict()` / `load_state_dict()` (lingua's pattern): the
  uncompiled loss head (checkpoints are written from it, so keys need no fixing), the module to call
  (compiled or not), every optimizer and its base lr, step, total steps, the data-loader position
  (iterations completed, batches consumed in the current one), the ACT carry and the EMA.
- A train state file (`train_state_step_{N:06d}.pt`, written atomically by rank 0) adds what is
  per rank: every rank's ACT carry and RNG states, gathered to rank 0, plus world size and config.
  Only the newest is kept; resuming needs the same world size, and lists changed config keys.
- Every rank looks for the train state itself (`resume=auto` on every node), and the ranks compare what
  they found before anyone loads it: a checkpoint folder that not every node sees would otherwise let
  rank 0 resume while the others start fresh, training different weights until a collective mismatches.
- `call` is the one place the (compiled) head is called: under CUDA graphs a replay reuses the
  memory of the previous one's outputs, so the carry that lives on across calls is copied out.
"""

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from utils import checkpointing as ckpt
from utils.config import PretrainConfig
from utils.distributed import DistInfo
from utils.ema import ModelEMA

TRAIN_STATE_FORMAT = "hrm-train-state-v1"


@dataclass
class TrainState:
    model: nn.Module  # the uncompiled loss head: checkpoints are written from it
    forward: Callable[..., Any]  # the module to call (compiled or not)
    optimizers: list[torch.optim.Optimizer]
    optimizer_lrs: list[float]
    total_steps: int
    step: int = 0
    carry: Any = None
    data_iters: int = 0  # train loader iterations completed
    data_batches: int = 0  # batches consumed in the current iteration
    pending_carry: Any = None  # a restored carry, filled into a template at the next train batch
    ema: Optional[ModelEMA] = None  # `ema: true`: the averaged parameters
    sparse_grads: Any = None  # `grad_accum_steps > 1` with a puzzle embedding: utils.train_step's accumulator
    skipped_steps: int = 0  # updates dropped for a non-finite loss or gradient (in this process)
    nonfinite_stop: bool = False  # `nonfinite: stop` was hit: the loop saves a train state and exits
    cuda_graphs: bool = False  # the compiled forward replays CUDA graphs (compile_mode reduce-overhead/max-autotune)

    def state_dict(self) -> dict[str, Any]:
        """Everything shared by all ranks (the rank-local carry and RNG are added by `save_train_state`)."""
        state = {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "step": self.step,
            "total_steps": self.total_steps,
            "data_iters": self.data_iters,
            "data_batches": self.data_batches,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        ckpt.load_model_weights(self.model, state["model"], source)
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"{source}: holds {len(state['optimizers'])} optimizers, this model uses {len(self.optimizers)}"
            )
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        self.step = int(state["step"])
        self.data_iters = int(state["data_iters"])
        self.data_batches = int(state["data_batches"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"], source)
            else:  # a run without EMA continued with it: start the average from the restored weights
                self.ema = ModelEMA(self.model, self.ema.rate)
                print(f"warning: {source} holds no EMA; starting the average from its weights", file=sys.stderr)

    def call(self, carry: Any, batch: dict[str, torch.Tensor], return_keys: Sequence[str]):
        """One call of the (compiled) loss head: (new carry, loss, metrics, outputs, all halted)."""
        if not self.cuda_graphs:
            return self.forward(carry=carry, batch=batch, return_keys=return_keys)
        torch.compiler.cudagraph_mark_step_begin()
        new_carry, loss, metrics, outputs, all_halted = self.forward(carry=carry, batch=batch, return_keys=return_keys)
        return map_carry(torch.clone, new_carry), loss, metrics, outputs, all_halted


def map_carry(fn: Callable[[torch.Tensor], torch.Tensor], carry: Any) -> Any:
    """Apply `fn` to every tensor of an ACT carry (a tree of dataclasses, dicts and tensors)."""
    if isinstance(carry, torch.Tensor):
        return fn(carry)
    if dataclasses.is_dataclass(carry):
        fields = {f.name: map_carry(fn, getattr(carry, f.name)) for f in dataclasses.fields(carry)}
        return dataclasses.replace(carry, **fields)
    if isinstance(carry, dict):
        return {k: map_carry(fn, v) for k, v in carry.items()}
    return carry


# ------------------------------------------------------------------------------------------- saving


def gather_rank_states(state: TrainState, info: DistInfo) -> list[dict[str, Any]] | None:
    """Every rank's ACT carry and RNG state, collected on rank 0."""
    carry = state.carry if state.carry is not None else state.pending_carry
    local = {
        "carry": ckpt.carry_to_state(carry) if carry is not None else None,
        "rng": ckpt.rng_state(info.device),
    }
    if info.world_size == 1:
        return [local]
    gathered: list[Any] = [None] * info.world_size if info.is_main else []
    dist.gather_object(local, gathered if info.is_main else None, dst=0)
    return gathered if info.is_main else None


def save_train_state(config: PretrainConfig, state: TrainState, info: DistInfo) -> str | None:
    """Collective: write `train_state_step_{step:06d}.pt` atomically on rank 0, then drop older ones."""
    rank_states = gather_rank_states(state, info)
    if not info.is_main:
        return None
    assert config.checkpoint_path is not None and rank_states is not None
    path = ckpt.train_state_path(config.checkpoint_path, state.step)
    payload = {
        "format": TRAIN_STATE_FORMAT,
        **state.state_dict(),
        "world_size": info.world_size,
        "ranks": rank_states,
        "config": config.model_dump(),
    }
    ckpt.atomic_torch_save(payload, path)
    # Keep only the newest train state (each holds optimizer moments: 3x the weights); weights
    # files `step_N` are kept for every evaluation, like the reference.
    for name in os.listdir(config.checkpoint_path):
        m = ckpt.TRAIN_STATE_PATTERN.match(name)
        if m and int(m.group(1)) < state.step:
            os.unlink(os.path.join(config.checkpoint_path, name))
    ckpt.remove_stale_temp_files(config.checkpoint_path)  # left by a run killed mid-write
    return path


# ----------------------------------------------------------------------------------------- resuming


def resolve_resume_path(config: PretrainConfig) -> str | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        if config.checkpoint_path is None:
            raise ValueError("config key 'resume': resume=auto needs checkpoint_path (the run folder to search)")
        return ckpt.find_latest_train_state(config.checkpoint_path)
    if not os.path.isfile(config.resume):
        raise FileNotFoundError(f"config key 'resume': train state not found: {config.resume}")
    return config.resume


def resolve_resume_path_on_every_rank(config: PretrainConfig, info: DistInfo) -> str | None:
    """Collective: `resolve_resume_path` on every rank, the same answer everywhere or the same error on all."""
    try:
        found, error = resolve_resume_path(config), None
    except (ValueError, FileNotFoundError) as e:
        found, error = None, e
    if info.world_size == 1:
        if error is not None:
            raise error
        return found
    answers: list[Any] = [None] * info.world_size
    failure = None if error is None else (isinstance(error, FileNotFoundError), str(error))
    dist.all_gather_object(answers, (found, failure))
    for rank, (_, failed) in enumerate(answers):
        if failed is not None:  # every rank leaves with the same one-line error (status 2)
            not_found, message = failed
            raise (FileNotFoundError if not_found else ValueError)(f"{message} (on rank {rank} of {info.world_size})")
    for rank, (path, _) in enumerate(answers):
        if path != answers[0][0]:
            raise ValueError(
                f"config key 'resume': rank 0 finds {answers[0][0] or 'no train state'}, rank {rank} finds "
                f"{path or 'no train state'} in checkpoint_path={config.checkpoint_path}: it must be a folder "
                "every node sees"
            )
    return found


def read_train_state(path: str) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{path}: not a readable train state ({type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path}: not a train state written by pretrain.py")
    return payload


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], int, Optional[dict[str, Any]]]:
    """(weights, step, saved config or None) from a `step_N` weights file or a train-state file.

    A train state of a run with `ema` gives its averaged parameters, as its `step_N` files hold them.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if ckpt.TRAIN_STATE_PATTERN.match(os.path.basename(path)):
        payload = read_train_state(path)
        weights = {**ckpt.strip_compile_prefix(payload["model"]), **payload.get("ema", {})}
        return weights, int(payload["step"]), payload["config"]
    return ckpt.load_weights_file(path), ckpt.step_from_filename(path), None


# Keys that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = {
    "resume",
    "stop_at_step",
    "checkpoint_interval_steps",
    "use_wandb",
    "compile",
    "device",
    "async_metrics",
    "eval_halting",
    "early_stop_train_accuracy",
    "early_stop_window",
    "keep_best",
    "nonfinite",
    "dist_timeout_s",
}


def restore_train_state(payload: dict[str, Any], path: str, config: PretrainConfig, state: TrainState, info: DistInfo):
    if payload["world_size"] != info.world_size:
        raise ValueError(f"{path}: saved with {payload['world_size']} ranks, resumed with {info.world_size}")
    changed = sorted(
        k for k, v in config.model_dump().items() if k not in RESUME_FREE_KEYS and payload["config"].get(k) != v
    )
    if changed and info.is_main:
        print(f"warning: resuming with changed config keys: {', '.join(changed)}", file=sys.stderr)
    state.load_state_dict(payload, path)
    local = payload["ranks"][info.rank]
    state.carry = None
    state.pending_carry = local["carry"]
    ckpt.set_rng_state(local["rng"], info.device)


def names_from_resume(config: PretrainConfig) -> PretrainConfig:
    """When resuming, names not given on the command line are the saved run's (same folder, same W&B names)."""
    if config.resume is None or (config.resume == "auto" and config.checkpoint_path is None):
        return config
    path = resolve_resume_path(config)
    if path is None:
        return config
    saved = read_train_state(path)["config"]
    update = {k: saved.get(k) for k in ("project_name", "run_name", "checkpoint_path") if getattr(config, k) is None}
    return config.model_copy(update=update)
