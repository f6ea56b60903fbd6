"""Train an HRM model: `python pretrain.py [overrides]` or `torchrun --nproc-per-node N pretrain.py [overrides]`.

Design choices:
- Hydra composes `config/cfg_pretrain.yaml` + `config/arch/*.yaml`; the result is validated at once
  into the typed `PretrainConfig` (unknown keys refused at top level, free-form under `arch`, which
  is passed to the model). Config errors are one line naming the key, exit status 2.
- The training algorithm is the reference's (SPEC §6): two optimizers (SignSGD on the sparse puzzle
  embedding, AdamATan2 on everything else), warmup + cosine schedule recomputed every step, loss
  scaled by 1/global batch, gradients summed over ranks, an ACT carry that persists across batches,
  `eval_interval` epochs per loader iteration followed by evaluation and a checkpoint.
- Each piece of a step is a small top-level function, so tests and later options can reuse them.
- Additions over the reference: CPU/GPU device choice (bf16 forward on GPU, float32 allowed on CPU),
  gloo for CPU multi-process runs, `torch.compile` on for CUDA only, W&B optional and never
  prompting, metrics as JSON lines, and a resumable train state (model, optimizers, step, data
  position, ACT carry and RNG of every rank, config) so a stopped run continues bit-exactly.
"""

import dataclasses
import functools
import inspect
import json
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Optional

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import checkpointing as ckpt
from utils.distributed import (
    DistInfo,
    DistributedFailure,
    all_reduce_sum_flat_and_check_finite_,
    broadcast_module_state,
    broadcast_object,
    distributed_context,
)
from utils.ema import ModelEMA
from utils.logging_utils import MetricLogger, create_logger

# ------------------------------------------------------------------------------------------- config


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras (loss_type, ...) go to the loss head

    name: str


class ArchConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras go to the model's own config

    name: str
    loss: LossConfig


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: ArchConfig
    data_path: str

    global_batch_size: int
    epochs: int
    eval_interval: Optional[int] = None
    checkpoint_every_eval: bool = False

    lr: float
    lr_min_ratio: float
    lr_warmup_steps: int

    weight_decay: float
    beta1: float
    beta2: float

    puzzle_emb_lr: float
    puzzle_emb_weight_decay: float

    project_name: Optional[str] = None
    run_name: Optional[str] = None
    checkpoint_path: Optional[str] = None

    seed: int = 0
    eval_save_outputs: list[str] = []

    # Additions beyond the reference (see config/cfg_pretrain.yaml).
    use_wandb: bool = True
    compile: Optional[bool] = None
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    resume: Optional[str] = None
    checkpoint_interval_steps: Optional[int] = None
    stop_at_step: Optional[int] = None
    nonfinite: Literal["skip", "stop"] = "skip"  # README "Reliability"
    dist_timeout_s: float = 600.0
    async_metrics: Optional[bool] = None  # None: on for CUDA unless nonfinite=stop or early stopping

    # Research options beyond the reference, each off by default (README "Research options").
    ema: bool = False
    ema_rate: float = 0.999
    eval_halting: Literal["fixed", "learned"] = "fixed"
    early_stop_train_accuracy: Optional[float] = None
    early_stop_window: int = 100
    keep_best: Optional[str] = None
    grad_accum_steps: int = 1

    @model_validator(mode="after")
    def _check_research_options(self) -> "PretrainConfig":
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"config key 'ema_rate': must be in [0, 1), got {self.ema_rate}")
        for key in ("early_stop_window", "grad_accum_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}': must be >= 1, got {getattr(self, key)}")
        if self.early_stop_train_accuracy is not None and not 0.0 < self.early_stop_train_accuracy <= 1.0:
            raise ValueError(
                f"config key 'early_stop_train_accuracy': must be in (0, 1], got {self.early_stop_train_accuracy}"
            )
        if self.async_metrics and (self.nonfinite == "stop" or self.early_stop_train_accuracy is not None):
            raise ValueError(
                "config key 'async_metrics': needs each step's outcome at once, so it cannot be combined with "
                "nonfinite=stop or early_stop_train_accuracy"
            )
        if self.keep_best is not None and "/" not in self.keep_best:
            raise ValueError(
                f"config key 'keep_best': expected an eval metric as '<set>/<metric>', got {self.keep_best!r}"
            )
        return self

    @model_validator(mode="after")
    def _check_values(self) -> "PretrainConfig":
        for key in ("global_batch_size", "epochs", "eval_interval", "checkpoint_interval_steps", "stop_at_step"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"config key '{key}': must be >= 1, got {value}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"config key 'lr_warmup_steps': must be >= 0, got {self.lr_warmup_steps}")
        if self.eval_interval is not None and self.epochs % self.eval_interval != 0:
            raise ValueError(
                f"config key 'eval_interval': epochs ({self.epochs}) must be divisible by eval_interval ({self.eval_interval})"
            )
        return self


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<config>"
    more = f" (and {err.error_count() - 1} more errors)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'{more}"
    if first["type"] == "missing":
        return f"config key '{key}' is required{more}"
    if first["type"] == "value_error":  # our own validators already name the key
        return first["msg"].removeprefix("Value error, ") + more
    return f"config key '{key}': {first['msg']} (got {first.get('input')!r}){more}"


def config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    """Validate a plain dict into `PretrainConfig`; raises a one-line ValueError naming the key."""
    try:
        return PretrainConfig(**values)
    except ValidationError as e:
        raise ValueError(_format_validation_error(e)) from None


def config_from_hydra(cfg: DictConfig) -> PretrainConfig:
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return config_from_dict(values)  # type: ignore[arg-type]


def derive_names(
    config: PretrainConfig, model_class_name: str, slug: Callable[[], str] | None = None
) -> PretrainConfig:
    """Fill project/run name and checkpoint path the way the reference does (done on rank 0 only)."""
    import coolname

    update: dict[str, Any] = {}
    project = config.project_name
    if project is None:
        project = f"{os.path.basename(config.data_path.rstrip('/')).capitalize()} ACT-torch"
        update["project_name"] = project
    run = config.run_name
    if run is None:
        run = f"{model_class_name} {(slug or (lambda: coolname.generate_slug(2)))()}"
        update["run_name"] = run
    if config.checkpoint_path is None:
        update["checkpoint_path"] = os.path.join("checkpoints", project, run)
    return config.model_copy(update=update)


# ----------------------------------------------------------------------------------------- schedule


def cosine_schedule_with_warmup_lr_lambda(
    current_step: int, *, base_lr: float, num_warmup_steps: int, num_training_steps: int, min_ratio: float = 0.0
) -> float:
    """Linear warmup from 0, then cosine decay from `base_lr` to `min_ratio * base_lr` at the last step."""
    if current_step < num_warmup_steps:
        return base_lr * float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))))


def compute_total_steps(config: PretrainConfig, total_groups: int, mean_puzzle_examples: float) -> int:
    return int(config.epochs * total_groups * mean_puzzle_examples / config.global_batch_size)


def epochs_per_iter(config: PretrainConfig) -> int:
    return config.eval_interval if config.eval_interval is not None else config.epochs


# --------------------------------------------------------------------------------------------- data


def create_dataloader(config: PretrainConfig, split: str, info: DistInfo, *, test_set_mode: bool, epochs: int):
    """(dataset, loader) for one split; the dataset is returned too, for its metadata and `set_position`."""
    from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig

    dataset = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=config.seed,
            dataset_path=config.data_path,
            global_batch_size=config.global_batch_size,
            test_set_mode=test_set_mode,
            epochs_per_iter=epochs,
            rank=info.rank,
            num_replicas=info.world_size,
        ),
        split=split,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=1,
        prefetch_factor=8,
        pin_memory=info.device.type == "cuda",
        persistent_workers=True,
        # A private generator: worker seeding must not draw from the global RNG, or a resumed run's
        # ACT exploration noise would drift from the uninterrupted run's.
        generator=torch.Generator(),
    )
    return dataset, loader


# -------------------------------------------------------------------------------------------- model


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
    sparse_grads: Optional["SparseEmbeddingGradAccumulator"] = None  # `grad_accum_steps > 1` with a puzzle embedding
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


def use_compile(config: PretrainConfig, device: torch.device) -> bool:
    if "DISABLE_COMPILE" in os.environ:
        return False
    return config.compile if config.compile is not None else device.type == "cuda"


def model_config_dict(config: PretrainConfig, metadata: Any, world_size: int) -> dict[str, Any]:
    if config.global_batch_size % world_size != 0:
        raise ValueError(
            f"config key 'global_batch_size': {config.global_batch_size} is not divisible by the world size {world_size}"
        )
    local_batch_size = config.global_batch_size // world_size
    if local_batch_size % config.grad_accum_steps != 0:
        raise ValueError(
            f"config key 'grad_accum_steps': the per-rank batch {local_batch_size} is not divisible by {config.grad_accum_steps}"
        )
    # The launcher's values win over same-named arch keys (an arch yaml may carry `causal` for other uses).
    return {
        **(config.arch.model_extra or {}),
        "batch_size": local_batch_size // config.grad_accum_steps,  # the model sees one micro-batch at a time
        "vocab_size": metadata.vocab_size,
        "seq_len": metadata.seq_len,
        "num_puzzle_identifiers": metadata.num_puzzle_identifiers,
        "causal": False,  # puzzles are read as a whole
    }


def create_model(config: PretrainConfig, metadata: Any, info: DistInfo) -> tuple[nn.Module, list[str]]:
    """The loss head wrapping the model, identical on every rank; also returns the source files to archive."""
    from utils.functions import load_model_class

    model_cls = load_model_class(config.arch.name)
    loss_head_cls = load_model_class(config.arch.loss.name)
    with torch.device(info.device):
        model = model_cls(model_config_dict(config, metadata, info.world_size))
        head = loss_head_cls(model, **(config.arch.loss.model_extra or {}))
    broadcast_module_state(head)
    sources = [inspect.getsourcefile(model_cls) or "", inspect.getsourcefile(loss_head_cls) or ""]
    return head, sources


def create_optimizers(
    config: PretrainConfig,
    head: nn.Module,
    world_size: int,
    sparse_grads: Optional["SparseEmbeddingGradAccumulator"] = None,
):
    """[SignSGD on the puzzle embedding (if any)], [AdamATan2 on the parameters], with their base lrs.

    With `sparse_grads` (gradient accumulation) SignSGD reads the accumulated rows and ids of the whole
    per-rank batch instead of the embedding's own micro-batch-sized buffers.
    """
    from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
    from utils.optimizers import AdamATan2

    optimizers: list[torch.optim.Optimizer] = []
    base_lrs: list[float] = []
    puzzle_emb = getattr(head.model, "puzzle_emb", None)
    if puzzle_emb is not None:
        optimizers.append(
            CastedSparseEmbeddingSignSGD_Distributed(
                puzzle_emb.buffers() if sparse_grads is None else sparse_grads.buffers(),
                world_size=world_size,
                lr=0,
                weight_decay=config.puzzle_emb_weight_decay,
            )
        )
        base_lrs.append(config.puzzle_emb_lr)
    hook = getattr(head.model, "optimizer_param_groups", None)
    params = hook() if callable(hook) else head.parameters()
    optimizers.append(AdamATan2(params, lr=0, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)))
    base_lrs.append(config.lr)
    return optimizers, base_lrs


def init_train_state(config: PretrainConfig, metadata: Any, info: DistInfo) -> tuple[TrainState, list[str]]:
    total_steps = compute_total_steps(config, metadata.total_groups, metadata.mean_puzzle_examples)
    head, sources = create_model(config, metadata, info)
    puzzle_emb = getattr(head.model, "puzzle_emb", None)
    sparse_grads = None
    if config.grad_accum_steps > 1 and puzzle_emb is not None:
        sparse_grads = SparseEmbeddingGradAccumulator(puzzle_emb, config.global_batch_size // info.world_size)
    optimizers, base_lrs = create_optimizers(config, head, info.world_size, sparse_grads)
    compiled = use_compile(config, info.device)
    forward = torch.compile(head, dynamic=False, mode=config.compile_mode) if compiled else head
    ema = ModelEMA(head, config.ema_rate) if config.ema else None
    state = TrainState(head, forward, optimizers, base_lrs, total_steps, ema=ema, sparse_grads=sparse_grads)
    state.cuda_graphs = compiled and config.compile_mode in ("reduce-overhead", "max-autotune")
    return state, sources


def call_head(state: TrainState, carry: Any, batch: dict[str, torch.Tensor], return_keys: Sequence[str]):
    """One call of the (compiled) loss head. Under CUDA graphs a replay reuses the memory of the previous
    one's outputs, so the carry that lives on across calls is copied out of it."""
    if not state.cuda_graphs:
        return state.forward(carry=carry, batch=batch, return_keys=return_keys)
    torch.compiler.cudagraph_mark_step_begin()
    new_carry, loss, metrics, outputs, all_halted = state.forward(carry=carry, batch=batch, return_keys=return_keys)
    return map_carry(torch.clone, new_carry), loss, metrics, outputs, all_halted


# --------------------------------------------------------------------------------------------- step


def sync_gradients(model: nn.Module, local_checks: list[torch.Tensor] | tuple = ()) -> torch.Tensor:
    """Sum parameter gradients over ranks (the loss is already divided by the global batch).

    Returns a 0-dim bool tensor on the device, equal on every rank: every summed gradient is finite and
    so was every tensor of `local_checks` (the loss, the sparse embedding's gradient) on every rank.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return all_reduce_sum_flat_and_check_finite_(grads, local_checks)


def sparse_gradients(state: TrainState) -> list[torch.Tensor]:
    """Gradients the optimizers read that are not parameter gradients (SignSGD's puzzle-embedding rows)."""
    params = {id(p) for p in state.model.parameters()}
    return [
        p.grad
        for optimizer in state.optimizers
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None and id(p) not in params
    ]


def record_skipped_step(config: PretrainConfig, state: TrainState, info: DistInfo, step: int) -> None:
    """Book-keeping for step `step`, whose update the optimizers dropped on the device (non-finite values).

    The step still counts (its batch is consumed, the LR schedule moves on). The ACT carry restarted
    on the device (every row marked halted); when `step` is the latest step the carry is also dropped
    here, so a train state saved now holds none.
    """
    if step == state.step:
        state.carry = None
    state.skipped_steps += 1
    if config.nonfinite == "stop":
        state.nonfinite_stop = True
    elif info.is_main:  # through tqdm, so the line is not glued to the progress bar
        tqdm.write(f"warning: step {step}: non-finite loss or gradients, update skipped (nonfinite=skip)", sys.stderr)


@functools.cache
def _steps_with_skip_if(optimizer_cls: type) -> bool:
    """Whether an optimizer class's `step` takes `skip_if` (asked once per class, not every step)."""
    return "skip_if" in inspect.signature(optimizer_cls.step).parameters


def apply_lr_and_step(config: PretrainConfig, state: TrainState, skip_if: torch.Tensor | None = None) -> float:
    """Set each optimizer's scheduled lr (times a group's `lr_scale`), step, zero grads; returns the last lr.

    `skip_if`: a 0-dim bool device tensor; where it holds True the optimizers leave everything unchanged.
    Ours decide that on the device; another optimizer (no `skip_if` argument) is skipped by the host.
    """
    lr = 0.0
    host_skip: list[bool] = []
    for optimizer, base_lr in zip(state.optimizers, state.optimizer_lrs):
        lr = cosine_schedule_with_warmup_lr_lambda(
            state.step,
            base_lr=base_lr,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=state.total_steps,
            min_ratio=config.lr_min_ratio,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if skip_if is None:
            optimizer.step()
        elif _steps_with_skip_if(type(optimizer)):
            optimizer.step(skip_if=skip_if)
        else:
            if not host_skip:
                host_skip.append(bool(skip_if.item()))
            if not host_skip[0]:
                optimizer.step()
        optimizer.zero_grad()
    return lr


@dataclass
class PendingStep:
    """A launched train step whose metric sums and non-finite flag are on their way to the host."""

    step: int
    lr: float
    global_batch_size: int
    keys: list[str]  # metric names in `values` order; empty on ranks other than 0
    values: torch.Tensor  # host tensor [len(keys) + 1]: the metric sums over ranks, then 1.0 iff all finite
    ready: Optional[torch.cuda.Event]  # recorded after the device-to-host copy; None if the copy was synchronous

    @classmethod
    def launch(cls, step, lr, global_batch_size, metrics, all_finite, info: DistInfo) -> "PendingStep":
        """Sum the metrics onto rank 0 and start copying them (and the flag) to the host, without waiting."""
        keys = sorted(metrics)
        flag = all_finite.to(torch.float32).reshape(1)
        if keys:
            values = torch.stack([metrics[k].detach().to(torch.float32) for k in keys])  # [num_metrics]
            if info.world_size > 1:
                dist.reduce(values, dst=0)
            payload = torch.cat([values, flag]) if info.is_main else flag
        else:
            payload = flag
        if not info.is_main:
            keys = []
        if payload.device.type != "cuda":
            return cls(step, lr, global_batch_size, keys, payload, None)
        host = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
        host.copy_(payload, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(step, lr, global_batch_size, keys, host, ready)

    def wait(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


def train_metrics(summed: dict[str, float], global_batch_size: int, lr: float) -> dict[str, float]:
    count = max(summed["count"], 1)
    out = {f"train/{k}": v / (global_batch_size if k.endswith("loss") else count) for k, v in summed.items()}
    out["train/lr"] = lr
    return out


def ensure_carry(state: TrainState, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    """Build the ACT carry on first use (from the first batch), filling in a restored one if resuming."""
    if state.carry is not None:
        return
    with torch.device(device):
        template = state.model.initial_carry(batch)
    if state.pending_carry is not None:
        state.carry = ckpt.carry_from_state(template, state.pending_carry)
        state.pending_carry = None
    else:
        state.carry = template


class SparseEmbeddingGradAccumulator:
    """The puzzle embedding's gradient rows and ids for the whole per-rank batch, gathered from its micro-batches.

    The embedding's own `local_weights`/`local_ids` are sized to one micro-batch and overwritten by each
    forward, so after each micro-batch's backward its rows are copied here, at that micro-batch's place in
    the batch; SignSGD reads these buffers, so it sees the same rows in the same order as with one full batch.
    """

    def __init__(self, puzzle_emb: nn.Module, local_batch_size: int):
        self.puzzle_emb = puzzle_emb
        weights = puzzle_emb.weights
        self.local_weights = torch.zeros(
            (local_batch_size, weights.shape[1]), dtype=weights.dtype, device=weights.device, requires_grad=True
        )
        self.local_ids = torch.zeros(local_batch_size, dtype=puzzle_emb.local_ids.dtype, device=weights.device)

    def buffers(self) -> list[torch.Tensor]:
        return [self.puzzle_emb.weights, self.local_weights, self.local_ids]

    @torch.no_grad()
    def collect(self, rows: slice) -> None:
        if self.local_weights.grad is None:  # the optimizer's zero_grad drops it after each step
            self.local_weights.grad = torch.zeros_like(self.local_weights)
        grad = self.puzzle_emb.local_weights.grad
        self.local_weights.grad[rows] = 0 if grad is None else grad
        self.local_ids[rows] = self.puzzle_emb.local_ids
        self.puzzle_emb.local_weights.grad = None  # the next micro-batch starts from zero


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


def cat_carries(parts: list[Any]) -> Any:
    """Concatenate carries of consecutive row slices along the batch dimension (inverse of slicing)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if dataclasses.is_dataclass(first):
        fields = {f.name: cat_carries([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)}
        return dataclasses.replace(first, **fields)
    if isinstance(first, dict):
        return {k: cat_carries([p[k] for p in parts]) for k in first}
    return first


def forward_backward(
    state: TrainState,
    batch: dict[str, torch.Tensor],
    global_batch_size: int,
    device: torch.device,
    grad_accum_steps: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one per-rank batch; returns the (unscaled, detached) loss and the metric sums.

    With `grad_accum_steps > 1` the batch is cut into that many row slices. One ACT carry still covers the
    whole batch; each micro-batch runs on its rows of it (rows never interact in the model) with its loss
    scaled by 1/global batch like the full batch's, so the summed gradients are the full batch's.
    """
    ensure_carry(state, batch, device)
    if grad_accum_steps == 1:
        state.carry, loss, metrics, _, _ = call_head(state, state.carry, batch, [])
        ((1 / global_batch_size) * loss).backward()
        return loss.detach(), metrics
    size = batch["inputs"].shape[0] // grad_accum_steps
    carries, losses, metric_sums = [], [], {}
    for i in range(grad_accum_steps):
        rows = slice(i * size, (i + 1) * size)
        carry, loss, metrics, _, _ = call_head(
            state, map_carry(lambda t, rows=rows: t[rows], state.carry), {k: v[rows] for k, v in batch.items()}, []
        )
        ((1 / global_batch_size) * loss).backward()
        if state.sparse_grads is not None:
            state.sparse_grads.collect(rows)
        carries.append(carry)
        losses.append(loss.detach())
        for k, v in metrics.items():  # all metrics are sums over rows
            metric_sums[k] = metric_sums[k] + v if k in metric_sums else v
    state.carry = cat_carries(carries)
    return torch.stack(losses).sum(), metric_sums


def use_async_metrics(config: PretrainConfig, info: DistInfo) -> bool:
    """Whether the train loop reads each step's metrics one step late (never waiting for the device)."""
    if config.async_metrics is not None:
        return config.async_metrics
    return info.device.type == "cuda" and config.nonfinite == "skip" and config.early_stop_train_accuracy is None


def mark_carry_halted(carry: Any, flag: torch.Tensor) -> None:
    """Where `flag` (0-dim bool) holds True, mark every row of the ACT carry halted: the next step restarts
    them from the initial state and the next batch, as a fresh carry would, without a host decision."""
    halted = getattr(carry, "halted", None)
    if isinstance(halted, torch.Tensor):
        halted.logical_or_(flag)


def launch_train_step(
    config: PretrainConfig, state: TrainState, batch: dict[str, torch.Tensor], global_batch_size: int, info: DistInfo
) -> PendingStep | None:
    """Issue one optimisation step without waiting for the device; None past the last step.

    A non-finite loss or gradient on any rank makes the optimizers drop the update on the device, and
    marks the carry's rows halted; the host learns of it from the returned `PendingStep`, which
    `finish_train_step` reads.
    """
    state.step += 1
    if state.step > state.total_steps:
        return None
    batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
    loss, metrics = forward_backward(state, batch, global_batch_size, info.device, config.grad_accum_steps)
    all_finite = sync_gradients(state.model, [loss, *sparse_gradients(state)])
    skip = ~all_finite
    lr = apply_lr_and_step(config, state, skip_if=skip)
    # EMA (opt-in) averages only applied updates; reading the flag here is its one host synchronisation.
    if state.ema is not None and bool(all_finite.item()):
        state.ema.update(state.model)
    mark_carry_halted(state.carry, skip)
    return PendingStep.launch(state.step, lr, global_batch_size, metrics, all_finite, info)


def finish_train_step(
    config: PretrainConfig, state: TrainState, pending: PendingStep, info: DistInfo
) -> dict[str, float] | None:
    """Wait for a launched step's results; returns its logged metrics on rank 0 (None elsewhere)."""
    values = pending.wait()
    if values[-1] == 0.0:
        record_skipped_step(config, state, info, pending.step)
    if not pending.keys:
        return None
    return train_metrics(dict(zip(pending.keys, values[:-1])), pending.global_batch_size, pending.lr)


def train_batch(
    config: PretrainConfig, state: TrainState, batch: dict[str, torch.Tensor], global_batch_size: int, info: DistInfo
) -> dict[str, float] | None:
    """One optimisation step, waited for; returns the logged metrics on rank 0 (None elsewhere or past the last step)."""
    pending = launch_train_step(config, state, batch, global_batch_size, info)
    return None if pending is None else finish_train_step(config, state, pending, info)


# --------------------------------------------------------------------------------------- evaluation


def eval_batch(config: PretrainConfig, state: TrainState, batch: dict[str, torch.Tensor], info: DistInfo):
    """One test batch from a fresh carry, the head called until every row halted: (batch, metrics, outputs).

    Asking whether all rows halted is a host synchronisation. An ACT model in eval mode halts only at
    `halt_max_steps`, so the calls before that one are issued without asking and the device never idles.
    """
    if config.eval_halting == "learned":
        return eval_batch_learned_halting(config, state, batch, info)
    model_config = getattr(state.model.model, "config", None)
    calls_before_check = 0 if state.model.training else max(0, getattr(model_config, "halt_max_steps", 1) - 1)
    with torch.inference_mode():
        batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
        with torch.device(info.device):
            carry = state.model.initial_carry(batch)
        calls = 0
        while True:
            carry, _, metrics, preds, all_halted = call_head(state, carry, batch, config.eval_save_outputs)
            calls += 1
            if calls > calls_before_check and all_halted:
                return batch, metrics, preds


class ReplayModel(nn.Module):
    """Stands in for the model inside a loss head: returns a recorded `(carry, outputs)` pair, so the head
    computes its metrics (and the outputs to save) for predictions recorded earlier."""

    def __init__(self, carry: Any, outputs: dict[str, torch.Tensor]):
        super().__init__()
        self.recorded = (carry, outputs)

    def forward(self, **_):
        return self.recorded


def eval_batch_learned_halting(
    config: PretrainConfig, state: TrainState, batch: dict[str, torch.Tensor], info: DistInfo
):
    """`eval_halting: learned`: each row stops at its first step with q_halt > q_continue (or at the model's own
    halt); like `eval_batch`, returns (batch, metrics, outputs), all taken at each row's stopping step.

    An ACT model in eval mode keeps every row running to halt_max_steps (lockstep batches), so the model
    is left as it is: after each step the outputs of rows stopping now are frozen, and their step is
    recorded. Then the loss head computes its usual metrics on the frozen outputs through a `ReplayModel`
    (steps = each row's stopping step, every row halted), so metric definitions stay in one place. The
    batch ends as soon as every row has stopped, saving the remaining steps.
    """
    from utils.functions import load_model_class

    keys = sorted(set(config.eval_save_outputs) | {"logits", "q_halt_logits", "q_continue_logits"})
    with torch.inference_mode():
        batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
        with torch.device(info.device):
            carry = state.model.initial_carry(batch)
        frozen: dict[str, torch.Tensor] = {}
        while True:
            carry, _, metrics, outputs, all_halted = call_head(state, carry, batch, keys)
            stop = carry.halted
            if "q_continue_logits" in outputs:
                stop = stop | (outputs["q_halt_logits"] > outputs["q_continue_logits"])
            if not frozen:  # first step: every row's outputs, replaced below for rows stopping later
                frozen, stop_steps, stopped = dict(outputs), carry.steps.clone(), stop
            else:
                new = stop & ~stopped
                for k, v in outputs.items():
                    frozen[k] = torch.where(new.view((-1,) + (1,) * (v.ndim - 1)), v, frozen[k])
                stop_steps = torch.where(new, carry.steps, stop_steps)
                stopped = stopped | stop
            if all_halted or bool(stopped.all()):
                break
        if all_halted and bool((stop_steps == carry.steps).all()):
            # Nobody stopped early (e.g. a single-step model): the head's own results are the answer.
            return batch, metrics, {k: v for k, v in outputs.items() if k in config.eval_save_outputs}
        final_carry = dataclasses.replace(carry, steps=stop_steps, halted=torch.ones_like(carry.halted))
        head = load_model_class(config.arch.loss.name)(
            ReplayModel(final_carry, frozen), **(config.arch.loss.model_extra or {})
        )
        _, _, metrics, preds, _ = head(return_keys=config.eval_save_outputs)
    return batch, metrics, preds


def evaluate(config: PretrainConfig, state: TrainState, loader: DataLoader, metadata: Any, info: DistInfo):
    """Run every test batch to the end of its ACT steps; per-set metrics (divided by count) on rank 0."""
    set_ids = {name: i for i, name in enumerate(metadata.sets)}
    save_keys = set(config.eval_save_outputs)
    saved: dict[str, list[torch.Tensor]] = {}
    metric_keys: list[str] = []
    metric_sums: torch.Tensor | None = None
    with torch.inference_mode():
        for set_name, batch, _global_size in tqdm(loader, desc="eval", disable=not info.is_main, leave=False):
            batch, metrics, preds = eval_batch(config, state, batch, info)
            for collection in (batch, preds):
                for k, v in collection.items():
                    if k in save_keys:
                        saved.setdefault(k, []).append(v.cpu())
            if metric_sums is None:
                metric_keys = sorted(metrics)
                metric_sums = torch.zeros((len(set_ids), len(metric_keys)), dtype=torch.float32, device=info.device)
            metric_sums[set_ids[set_name]] += torch.stack([metrics[k].to(torch.float32) for k in metric_keys])

    if saved:
        assert config.checkpoint_path is not None
        path = os.path.join(config.checkpoint_path, f"step_{state.step}_all_preds.{info.rank}")
        ckpt.atomic_torch_save({k: torch.cat(v, dim=0) for k, v in saved.items()}, path)

    if metric_sums is None:
        return None
    if info.world_size > 1:
        dist.reduce(metric_sums, dst=0)
    if not info.is_main:
        return None
    sums = metric_sums.cpu().numpy()
    results = {}
    for set_name, set_id in set_ids.items():
        values = dict(zip(metric_keys, sums[set_id].tolist()))
        count = values.pop("count")
        results[set_name] = {k: v / max(count, 1) for k, v in values.items()}
    return results


def flatten_eval_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{set_name}/{k}": v for set_name, metrics in results.items() for k, v in metrics.items()}


# -------------------------------------------------------------------------------------- checkpoints


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
        "format": "hrm-train-state-v1",
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


def read_train_state(path: str) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{path}: not a readable train state ({type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("format") != "hrm-train-state-v1":
        raise ValueError(f"{path}: not a train state written by pretrain.py")
    return payload


# Keys that may differ between a run and its resumption without changing what is computed.
_RESUME_FREE_KEYS = {
    "resume",
    "stop_at_step",
    "checkpoint_interval_steps",
    "use_wandb",
    "compile",
    "device",
    "async_metrics",
}
_RESUME_FREE_KEYS |= {"eval_halting", "early_stop_train_accuracy", "early_stop_window", "keep_best"}
_RESUME_FREE_KEYS |= {"nonfinite", "dist_timeout_s"}


def restore_train_state(payload: dict[str, Any], path: str, config: PretrainConfig, state: TrainState, info: DistInfo):
    if payload["world_size"] != info.world_size:
        raise ValueError(f"{path}: saved with {payload['world_size']} ranks, resumed with {info.world_size}")
    changed = sorted(
        k for k, v in config.model_dump().items() if k not in _RESUME_FREE_KEYS and payload["config"].get(k) != v
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


# --------------------------------------------------------------------------------------------- loop


def print_backends(info: DistInfo) -> None:
    from models.layers import ATTENTION_BACKEND
    from utils.optimizers import ADAM_ATAN2_BACKEND

    if info.is_main:
        print(
            f"device {info.device} x{info.world_size}, attention {ATTENTION_BACKEND}, AdamATan2 {ADAM_ATAN2_BACKEND}",
            file=sys.stderr,
        )


def prepare_config(config: PretrainConfig, info: DistInfo) -> PretrainConfig:
    """Names on rank 0, then the same config on every rank."""
    if info.is_main:
        config = names_from_resume(config)
        config = derive_names(config, config.arch.name.split("@")[-1])
    return broadcast_object(config)


def averaged_weights(state: TrainState):
    """Context in which the model holds the EMA weights (when `ema` is on; otherwise changes nothing)."""
    return state.ema.swapped_in(state.model) if state.ema is not None else nullcontext()


class EarlyStopping:
    """`early_stop_train_accuracy`: stop once the mean of train/exact_accuracy (the fraction of halted
    sequences entirely right) over the last `window` logged steps reaches `threshold`.

    The window is kept on rank 0 (the only rank with metrics) and the decision broadcast, so every rank
    stops at the same step. It must be full before it can trigger; a resumed run starts a new window.
    """

    def __init__(self, threshold: float, window: int):
        self.threshold = threshold
        self.recent: deque[float] = deque(maxlen=window)

    def update(self, metrics: dict[str, float] | None, info: DistInfo) -> bool:
        """Collective: record this step's metrics (rank 0) and say whether to stop."""
        if metrics is not None:
            self.recent.append(metrics["train/exact_accuracy"])
        full = len(self.recent) == self.recent.maxlen
        reached = info.is_main and full and sum(self.recent) / len(self.recent) >= self.threshold
        return bool(broadcast_object(reached))


class BestCheckpoint:
    """`keep_best`: the weights with the best value so far of one eval metric (`<set>/<metric>`), kept as
    `{checkpoint_path}/best` (same format as `step_N`) beside `best.json` (metric, value, step).

    Higher is better, except for metrics ending in `loss`. A resumed run continues from `best.json`.
    """

    def __init__(self, metric: str, checkpoint_path: str):
        self.metric = metric
        self.lower_is_better = metric.endswith("loss")
        self.weights_path = os.path.join(checkpoint_path, "best")
        self.json_path = os.path.join(checkpoint_path, "best.json")
        self.value: float | None = None
        if os.path.isfile(self.json_path):
            with open(self.json_path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("metric") == metric:
                self.value = float(saved["value"])

    def is_better(self, value: float) -> bool:
        if self.value is None:
            return not math.isnan(value)
        return value < self.value if self.lower_is_better else value > self.value

    def update(self, results: dict[str, dict[str, float]] | None, state: TrainState, info: DistInfo) -> None:
        """Collective (for the error only): on rank 0, save the model's weights if the metric improved."""
        flat = flatten_eval_metrics(results) if results is not None else {}
        error = None
        if info.is_main and self.metric not in flat:
            error = f"config key 'keep_best': {self.metric!r} is not an eval metric (have {', '.join(sorted(flat))})"
        error = broadcast_object(error)
        if error is not None:
            raise ValueError(error)
        if not info.is_main or not self.is_better(flat[self.metric]):
            return
        self.value = flat[self.metric]
        ckpt.atomic_torch_save(state.model.state_dict(), self.weights_path)
        record = {"metric": self.metric, "value": self.value, "step": state.step}
        ckpt.atomic_write(self.json_path, lambda f: json.dump(record, f), mode="w")


def train(config: PretrainConfig, info: DistInfo, logger: MetricLogger | None = None) -> TrainState:
    """The whole run; `config` must already carry its names (see `prepare_config`)."""
    assert config.checkpoint_path is not None
    torch.manual_seed(config.seed + info.rank)
    print_backends(info)

    train_epochs = epochs_per_iter(config)
    total_iters = config.epochs // train_epochs
    train_dataset, train_loader = create_dataloader(config, "train", info, test_set_mode=False, epochs=train_epochs)
    eval_dataset, eval_loader = create_dataloader(config, "test", info, test_set_mode=True, epochs=1)

    state, sources = init_train_state(config, train_dataset.metadata, info)
    resume_path = resolve_resume_path(config)
    if resume_path is not None:
        restore_train_state(read_train_state(resume_path), resume_path, config, state, info)
        if info.is_main:
            print(f"resumed from {resume_path} at step {state.step}", file=sys.stderr)
    elif config.resume == "auto" and info.is_main:
        print(f"resume=auto: no train state in {config.checkpoint_path}, starting fresh", file=sys.stderr)
    train_dataset.set_position(state.data_iters, state.data_batches)

    num_params = sum(p.numel() for p in state.model.parameters())
    if info.is_main:
        ckpt.save_code_and_config(config.checkpoint_path, config.model_dump(), sources)
        print(f"{config.run_name}: {num_params:,} parameters, {state.total_steps} steps", file=sys.stderr)
    if logger is None:
        logger = create_logger(
            is_main=info.is_main,
            use_wandb=config.use_wandb,
            project=config.project_name or "",
            run_name=config.run_name or "",
            config=config.model_dump(),
            jsonl_path=os.path.join(config.checkpoint_path, "metrics.jsonl"),
            resume_step=state.step if resume_path is not None else None,
        )
    if state.step == 0:
        logger.log({"num_params": num_params}, step=0)

    early_stop = None
    if config.early_stop_train_accuracy is not None:
        early_stop = EarlyStopping(config.early_stop_train_accuracy, config.early_stop_window)
    best = BestCheckpoint(config.keep_best, config.checkpoint_path) if config.keep_best is not None else None

    progress = tqdm(total=state.total_steps, initial=min(state.step, state.total_steps), disable=not info.is_main)
    # With async metrics, step N's metrics are read (and logged) after step N + 1 has been issued, so the
    # host never waits for the device between steps; every save and evaluation reads them first.
    async_metrics = use_async_metrics(config, info)
    pending: PendingStep | None = None

    def finish_pending() -> dict[str, float] | None:
        nonlocal pending
        if pending is None:
            return None
        done, pending = pending, None
        metrics = finish_train_step(config, state, done, info)
        if metrics is not None:
            logger.log(metrics, step=done.step)
            progress.update(done.step - progress.n)
        return metrics

    try:
        for iter_id in range(state.data_iters, total_iters):
            if info.is_main:
                print(f"epoch {iter_id * train_epochs}", file=sys.stderr)
            state.model.train()
            stopped_early = False
            for _set_name, batch, global_batch_size in train_loader:
                launched = launch_train_step(config, state, batch, global_batch_size, info)
                state.data_batches += 1
                metrics = finish_pending()  # the previous step's, when async
                pending = launched
                at_stop = config.stop_at_step is not None and state.step >= config.stop_at_step
                save_now = should_save_periodic(config, state)
                if not async_metrics or at_stop or save_now:
                    metrics = finish_pending()
                if state.nonfinite_stop:
                    stop_on_nonfinite(config, state, info)
                if save_now:
                    save_train_state(config, state, info)
                if at_stop:
                    save_train_state(config, state, info)
                    if info.is_main:
                        print(f"stopped at step {state.step} (stop_at_step)", file=sys.stderr)
                    return state
                if early_stop is not None and early_stop.update(metrics, info):
                    stopped_early = True  # the data position stays mid-iteration, so a resume continues exactly
                    break
            finish_pending()
            if not stopped_early:
                state.data_iters += 1
                state.data_batches = 0

            state.model.eval()
            with averaged_weights(state):  # with `ema`, evaluation and the step_N / best files use the average
                results = evaluate(config, state, eval_loader, eval_dataset.metadata, info)
                if results is not None:
                    logger.log(flatten_eval_metrics(results), step=state.step)
                if info.is_main and (config.checkpoint_every_eval or iter_id == total_iters - 1 or stopped_early):
                    ckpt.save_weights(state.model, config.checkpoint_path, state.step)
                if best is not None:
                    best.update(results, state, info)
            save_train_state(config, state, info)  # always: a later kill resumes from here at worst
            if stopped_early:
                if info.is_main:
                    print(
                        f"early stop at step {state.step}: mean train/exact_accuracy of the last "
                        f"{config.early_stop_window} steps >= {config.early_stop_train_accuracy}; evaluated and "
                        f"saved {ckpt.weights_path(config.checkpoint_path, state.step)} and the train state",
                        file=sys.stderr,
                    )
                return state
    finally:
        progress.close()
        logger.close()
    return state


def should_save_periodic(config: PretrainConfig, state: TrainState) -> bool:
    interval = config.checkpoint_interval_steps
    return interval is not None and state.step <= state.total_steps and state.step % interval == 0


class NonFiniteError(RuntimeError):
    """`nonfinite: stop` met a non-finite loss or gradient; the train state was saved first."""

    exit_code = 3


def stop_on_nonfinite(config: PretrainConfig, state: TrainState, info: DistInfo) -> None:
    """Collective: save the train state (the bad update already dropped), then leave with NonFiniteError."""
    save_train_state(config, state, info)
    raise NonFiniteError(
        f"non-finite loss or gradients at step {state.step} (nonfinite=stop): update skipped, "
        f"train state saved in {config.checkpoint_path}"
    )


def run(config: PretrainConfig) -> TrainState:
    with distributed_context(config.device, config.dist_timeout_s) as info:
        return train(prepare_config(config, info), info)


# ------------------------------------------------------------------------------------------ command


@contextmanager
def bad_input_exits():
    """Bad input (config, files) becomes `error: <one line>` on stderr and exit status 2, no traceback.

    A run that cannot go on leaves the same way with its own status (README "Reliability"): 3 non-finite
    loss with `nonfinite: stop`, 4 checkpoint not writable, 5 another rank died or timed out.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {one_line_config_error(e)}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteError, ckpt.CheckpointWriteError, DistributedFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def error_line(e: BaseException) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker (its text then holds the worker's
    traceback), the original message, which is the traceback's last line."""
    text = str(e).strip()
    if text.startswith("Caught ") and "DataLoader worker" in text.splitlines()[0]:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


def one_line_config_error(e: BaseException) -> str:
    """Hydra/OmegaConf composition errors span several lines; keep the first line of each part."""
    parts = [str(e).strip().splitlines()[0].rstrip(".")] if str(e).strip() else [type(e).__name__]
    if e.__cause__ is not None and str(e.__cause__).strip():
        parts.append(str(e.__cause__).strip().splitlines()[0])
    return ": ".join(parts)


def cli(entry: Callable[[], None]) -> None:
    """Run a Hydra entry point, turning composition errors into one line (the entry handles its own)."""
    # Let composition errors propagate to us instead of Hydra printing them over several lines.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    with bad_input_exits():
        entry()


# The config folder beside this file, absolute so `pretrain.main` also works when imported (Hydra would
# otherwise look for a Python package named `config`).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


@hydra.main(config_path=CONFIG_DIR, config_name="cfg_pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    # Errors are handled inside the task: Hydra would log a second line for an exception leaving it.
    with bad_input_exits():
        run(config_from_hydra(cfg))


if __name__ == "__main__":
    cli(main)
