"""The train state: what a run holds between steps, and its save / read / restore for exact resume.

Design choices:
- `TrainState` is a dataclass with `state_dict()` / `load_state_dict()` (lingua's pattern): the
  uncompiled loss head (checkpoints are written from it, so keys need no fixing), the module to call
  (compiled or not), every optimizer and its base lr, step, total steps, the data-loader position
  (iterations completed, batches consumed in the current one), the ACT carry and the EMA.
- A train state file (`train_state_step_{N:06d}.pt`, written atomically by rank 0) adds what is
  per rank: every rank's ACT carry and RNG states, gathered to rank 0, plus world size and config.
  Only the newest is kept. It also records the run id (training/run_folder.py), the training dataset's sizes
  (`dataset_fingerprint`) and, when saved just before an evaluation, that evaluation (`pending_eval`).
- A resume is checked before anything is written: the fields it needs (`check_resume_fields`; with
  `resume=auto` a damaged newest state falls back to an older one), then what the state can continue
  (`check_resume_compatible`: world size, global batch, model, dataset); other changed keys are listed.
- Every rank looks for the train state itself (`resume=auto` on every node), and the ranks compare what
  they found before anyone loads it: a checkpoint folder that not every node sees would otherwise let
  rank 0 resume while the others start fresh, training different weights until a collective mismatches.
- `call_head` is the one place the (compiled) head is called (`TrainState.call`, `EvalState.call`, the
  latter what an evaluation of a checkpoint needs: no optimizers): under CUDA graphs a replay reuses the
  memory of the previous one's outputs, so the carry that lives on across calls is copied out.
"""

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from training import carry as carry_tree
from training.config import PretrainConfig
from training.ema import ModelEMA
from utils import checkpointing as ckpt
from utils.distributed import DistInfo

TRAIN_STATE_FORMAT = "hrm-train-state-v1"


def call_head(
    forward: Callable[..., Any],
    cuda_graphs: bool,
    carry: Any,
    batch: dict[str, torch.Tensor],
    return_keys: Sequence[str],
):
    """One call of the (compiled) loss head `forward`: (new carry, loss, metrics, outputs, all halted). Under CUDA
    graphs a replay reuses the memory of the previous one's outputs, so the carry that lives on is copied out."""
    if not cuda_graphs:
        return forward(carry=carry, batch=batch, return_keys=return_keys)
    torch.compiler.cudagraph_mark_step_begin()
    new_carry, loss, metrics, outputs, all_halted = forward(carry=carry, batch=batch, return_keys=return_keys)
    return carry_tree.map_tensors(torch.clone, new_carry), loss, metrics, outputs, all_halted


@dataclass
class EvalState:
    """What an evaluation needs of a model: the uncompiled loss head, the module to call (compiled or not) and the
    step its weights are at. evaluate.py builds one from a checkpoint; a `TrainState` serves as one in training."""

    model: nn.Module
    forward: Callable[..., Any]
    step: int = 0
    cuda_graphs: bool = False

    def call(self, carry: Any, batch: dict[str, torch.Tensor], return_keys: Sequence[str]):
        return call_head(self.forward, self.cuda_graphs, carry, batch, return_keys)


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
    sparse_grads: Any = None  # `grad_accum_steps > 1` with a puzzle embedding: training.train_step's accumulator
    skipped_steps: int = 0  # updates dropped for a non-finite loss or gradient (in this process)
    nonfinite_stop: bool = False  # `nonfinite: stop` was hit: the loop saves a train state and exits
    cuda_graphs: bool = False  # the compiled forward replays CUDA graphs (compile_mode reduce-overhead/max-autotune)
    run_id: Optional[str] = None  # the run's id (training/run_folder.py), saved in every train state
    dataset: Optional[dict[str, Any]] = None  # what the data position refers to (`dataset_fingerprint`)
    pending_eval: Optional[dict[str, Any]] = None  # saved just before an evaluation: {"iter_id", "early_stop"}
    stop_agreed: bool = False  # every rank knows a rank asked to stop (SIGINT / SIGTERM): save and leave

    def state_dict(self) -> dict[str, Any]:
        """Everything shared by all ranks (the rank-local carry and RNG are added by `save_train_state`)."""
        state = {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "step": self.step,
            "total_steps": self.total_steps,
            "data_iters": self.data_iters,
            "data_batches": self.data_batches,
            "pending_eval": self.pending_eval,
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
        self.pending_eval = state.get("pending_eval")
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"], source)
            else:  # a run without EMA continued with it: start the average from the restored weights
                self.ema = ModelEMA(self.model, self.ema.rate)
                print(f"warning: {source} holds no EMA; starting the average from its weights", file=sys.stderr)

    def call(self, carry: Any, batch: dict[str, torch.Tensor], return_keys: Sequence[str]):
        """One call of the (compiled) loss head: (new carry, loss, metrics, outputs, all halted)."""
        return call_head(self.forward, self.cuda_graphs, carry, batch, return_keys)

    # The ACT carry's lifecycle (its tree operations: training/carry.py).
    def ensure_carry(self, batch: dict[str, torch.Tensor], device: torch.device) -> None:
        """Build the carry on first use (from the first batch), filling in a restored one if resuming."""
        if self.carry is not None:
            return
        with torch.device(device):
            template = self.model.initial_carry(batch)
        if self.pending_carry is not None:
            self.carry = carry_tree.from_state(template, self.pending_carry)
            self.pending_carry = None
        else:
            self.carry = template

    def restore_carry(self, saved: Any) -> None:
        """A train state's carry, filled into a template at the next train batch."""
        self.carry, self.pending_carry = None, saved

    def drop_carry(self) -> None:
        """No carry to continue (a skipped last step): the next batch starts fresh, and a save holds none."""
        self.carry = None

    def saved_carry(self) -> Any:
        """The carry as a train state holds it (one not yet filled in is saved as restored); None without one."""
        carry = self.carry if self.carry is not None else self.pending_carry
        return carry_tree.to_state(carry) if carry is not None else None


# ------------------------------------------------------------------------------------------- saving


def gather_rank_states(state: TrainState, info: DistInfo) -> list[dict[str, Any]] | None:
    """Every rank's ACT carry and RNG state, collected on rank 0."""
    local = {
        "carry": state.saved_carry(),
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
        "run_id": state.run_id,
        "dataset": state.dataset,
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


# What a train state needs to be resumed from, and the type of each.
RESUME_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "optimizers": list,
    "step": int,
    "total_steps": int,
    "data_iters": int,
    "data_batches": int,
    "world_size": int,
    "ranks": list,
    "config": dict,
}


def check_resume_fields(payload: dict[str, Any], path: str) -> None:
    """One line naming the first field a train state lacks (or holds in another shape) to be resumed from."""
    for key, kind in RESUME_FIELDS.items():
        if key not in payload:
            raise ValueError(f"{path}: damaged train state: field '{key}' missing")
        if not isinstance(payload[key], kind) or isinstance(payload[key], bool):
            raise ValueError(f"{path}: damaged train state: field '{key}' holds {type(payload[key]).__name__}")
    ranks = payload["ranks"]
    if len(ranks) != payload["world_size"]:
        raise ValueError(
            f"{path}: damaged train state: field 'ranks' has {len(ranks)} entries for world_size {payload['world_size']}"
        )
    for rank, local in enumerate(ranks):
        if not isinstance(local, dict) or "carry" not in local or not isinstance(local.get("rng"), dict):
            raise ValueError(f"{path}: damaged train state: field 'ranks' entry {rank} lacks its carry or RNG state")
        if not isinstance(local["rng"].get("torch_cpu"), torch.Tensor):
            raise ValueError(f"{path}: damaged train state: rank {rank}'s RNG state lacks 'torch_cpu'")


def load_resume_state(config: PretrainConfig, path: str, quiet: bool = False) -> tuple[dict[str, Any], str]:
    """(payload, path) of the train state to resume from: `path`, checked; with `resume=auto`, a damaged or
    unreadable newest state falls back to the next older one in the folder (a warning line each), and
    when none is good the newest one's problem is the one error line."""
    candidates = [path]
    if config.resume == "auto":
        candidates += [p for p in ckpt.train_states_newest_first(os.path.dirname(path)) if p != path]
    problems: list[str] = []
    for candidate in candidates:
        try:
            payload = read_train_state(candidate)
            check_resume_fields(payload, candidate)
        except ValueError as e:
            if config.resume != "auto":
                raise
            problems.append(str(e))
            continue
        if problems and not quiet:
            for problem in problems:
                print(f"warning: {problem}; resuming from the previous train state {candidate}", file=sys.stderr)
        return payload, candidate
    more = f" (and {len(problems) - 1} older ones)" if len(problems) > 1 else ""
    raise ValueError(f"{problems[0]}{more}; no good train state to fall back to in {os.path.dirname(path)}")


def load_resume_state_on_every_rank(config: PretrainConfig, path: str, info: DistInfo) -> tuple[dict[str, Any], str]:
    """Collective: `load_resume_state` on every rank (warnings on rank 0), the same file everywhere or one error
    on all (a folder whose files differ between nodes would otherwise mix two states)."""
    try:
        payload, chosen = load_resume_state(config, path, quiet=not info.is_main)
        found, error = chosen, None
    except ValueError as e:
        found, error = None, e
    if info.world_size == 1:
        if error is not None:
            raise error
        return payload, chosen
    answers: list[Any] = [None] * info.world_size
    dist.all_gather_object(answers, (found, None if error is None else str(error)))
    for rank, (_, message) in enumerate(answers):
        if message is not None:
            raise ValueError(f"{message} (on rank {rank} of {info.world_size})")
    for rank, (chosen_there, _) in enumerate(answers):
        if chosen_there != answers[0][0]:
            raise ValueError(
                f"config key 'resume': rank 0 resumes from {answers[0][0]}, rank {rank} from {chosen_there}: "
                "checkpoint_path must be a folder every node sees"
            )
    return payload, chosen


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
    "overwrite",
}


# Dataset metadata a train state's data position and ACT carry depend on.
DATASET_FIELDS = ("seq_len", "vocab_size", "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "sets")


def dataset_fingerprint(metadata: Any) -> dict[str, Any]:
    """What a train state records of its training data: the dataset may move (another data_path), not change."""
    return {k: getattr(metadata, k) for k in DATASET_FIELDS}


def check_resume_compatible(
    payload: dict[str, Any], path: str, config: PretrainConfig, info: DistInfo, dataset: dict[str, Any]
) -> None:
    """Refuse, in one line and before anything is written, a resume the saved state cannot continue: another
    world size, global batch, model or training data (the data position, the ACT carry and the weights would not
    fit); warn about the other changed keys (those of `RESUME_FREE_KEYS` aside)."""
    saved = payload["config"]
    if payload["world_size"] != info.world_size:
        raise ValueError(
            f"{path}: saved with {payload['world_size']} ranks, resumed with {info.world_size} "
            "(a resumed run keeps its number of processes)"
        )
    if saved.get("global_batch_size") != config.global_batch_size:
        raise ValueError(
            f"{path}: saved with global_batch_size={saved.get('global_batch_size')}, resumed with "
            f"{config.global_batch_size} (a resumed run keeps its batch size: its data position and ACT carry are "
            "counted in batches)"
        )
    saved_arch = saved.get("arch") or {}
    names = {
        "arch.name": (saved_arch.get("name"), config.arch.name),
        "arch.loss.name": ((saved_arch.get("loss") or {}).get("name"), config.arch.loss.name),
    }
    for key, (then, now) in names.items():
        if then != now:
            raise ValueError(f"{path}: saved with {key}={then}, resumed with {now} (another model)")
    recorded = payload.get("dataset")  # absent from train states of earlier versions
    if recorded is not None:
        changed = [k for k in DATASET_FIELDS if recorded.get(k) != dataset.get(k)]
        if changed:
            k = changed[0]
            raise ValueError(
                f"{path}: saved with other training data ({k}={recorded.get(k)} then, {dataset.get(k)} now): a "
                "resumed run trains on the same dataset"
            )
    changed = sorted(k for k, v in config.model_dump().items() if k not in RESUME_FREE_KEYS and saved.get(k) != v)
    if changed and info.is_main:
        print(f"warning: resuming with changed config keys: {', '.join(changed)}", file=sys.stderr)


def restore_train_state(payload: dict[str, Any], path: str, config: PretrainConfig, state: TrainState, info: DistInfo):
    """Load a checked payload (`load_resume_state`, `check_resume_compatible`) into `state` on this rank."""
    if payload["world_size"] != info.world_size:
        raise ValueError(f"{path}: saved with {payload['world_size']} ranks, resumed with {info.world_size}")
    state.load_state_dict(payload, path)
    local = payload["ranks"][info.rank]
    state.restore_carry(local["carry"])
    ckpt.set_rng_state(local["rng"], info.device)


def names_from_resume(config: PretrainConfig) -> PretrainConfig:
    """When resuming, names not given on the command line are the saved run's (same folder, same W&B names)."""
    if config.resume is None or (config.resume == "auto" and config.checkpoint_path is None):
        return config
    path = resolve_resume_path(config)
    if path is None:
        return config
    saved = load_resume_state(config, path, quiet=True)[0]["config"]
    update = {k: saved.get(k) for k in ("project_name", "run_name", "checkpoint_path") if getattr(config, k) is None}
    return config.model_copy(update=update)
