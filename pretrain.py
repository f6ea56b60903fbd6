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

import inspect
import math
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
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
    all_reduce_sum_flat_,
    broadcast_module_state,
    broadcast_object,
    distributed_context,
)
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
    device: Literal["auto", "cuda", "cpu"] = "auto"
    resume: Optional[str] = None
    checkpoint_interval_steps: Optional[int] = None
    stop_at_step: Optional[int] = None

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

    def state_dict(self) -> dict[str, Any]:
        """Everything shared by all ranks (the rank-local carry and RNG are added by `save_train_state`)."""
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "step": self.step,
            "total_steps": self.total_steps,
            "data_iters": self.data_iters,
            "data_batches": self.data_batches,
        }

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


def use_compile(config: PretrainConfig, device: torch.device) -> bool:
    if "DISABLE_COMPILE" in os.environ:
        return False
    return config.compile if config.compile is not None else device.type == "cuda"


def model_config_dict(config: PretrainConfig, metadata: Any, world_size: int) -> dict[str, Any]:
    if config.global_batch_size % world_size != 0:
        raise ValueError(
            f"config key 'global_batch_size': {config.global_batch_size} is not divisible by the world size {world_size}"
        )
    return dict(
        **(config.arch.model_extra or {}),
        batch_size=config.global_batch_size // world_size,
        vocab_size=metadata.vocab_size,
        seq_len=metadata.seq_len,
        num_puzzle_identifiers=metadata.num_puzzle_identifiers,
        causal=False,  # puzzles are read as a whole
    )


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


def create_optimizers(config: PretrainConfig, head: nn.Module, world_size: int):
    """[SignSGD on the puzzle embedding (if any)], [AdamATan2 on the parameters], with their base lrs."""
    from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
    from utils.optimizers import AdamATan2

    optimizers: list[torch.optim.Optimizer] = []
    base_lrs: list[float] = []
    puzzle_emb = getattr(head.model, "puzzle_emb", None)
    if puzzle_emb is not None:
        optimizers.append(
            CastedSparseEmbeddingSignSGD_Distributed(
                puzzle_emb.buffers(), world_size=world_size, lr=0, weight_decay=config.puzzle_emb_weight_decay
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
    optimizers, base_lrs = create_optimizers(config, head, info.world_size)
    forward = torch.compile(head, dynamic=False) if use_compile(config, info.device) else head
    return TrainState(head, forward, optimizers, base_lrs, total_steps), sources


# --------------------------------------------------------------------------------------------- step


def sync_gradients(model: nn.Module) -> None:
    """Sum parameter gradients over ranks (the loss is already divided by the global batch)."""
    all_reduce_sum_flat_([p.grad for p in model.parameters() if p.grad is not None])


def apply_lr_and_step(config: PretrainConfig, state: TrainState) -> float:
    """Set each optimizer's scheduled lr (times a group's `lr_scale`), step, zero grads; returns the last lr."""
    lr = 0.0
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
        optimizer.step()
        optimizer.zero_grad()
    return lr


def reduce_metrics_to_main(metrics: dict[str, torch.Tensor], info: DistInfo) -> dict[str, float] | None:
    """Sum metric tensors over ranks in sorted-key order; the result exists on rank 0 only."""
    keys = sorted(metrics)
    values = torch.stack([metrics[k].detach().to(torch.float32) for k in keys])  # [num_metrics]
    if info.world_size > 1:
        dist.reduce(values, dst=0)
    if not info.is_main:
        return None
    return dict(zip(keys, values.cpu().tolist()))


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


def train_batch(
    config: PretrainConfig, state: TrainState, batch: dict[str, torch.Tensor], global_batch_size: int, info: DistInfo
) -> dict[str, float] | None:
    """One optimisation step; returns the logged metrics on rank 0 (None elsewhere or past the last step)."""
    state.step += 1
    if state.step > state.total_steps:
        return None
    batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
    ensure_carry(state, batch, info.device)
    state.carry, loss, metrics, _, _ = state.forward(carry=state.carry, batch=batch, return_keys=[])
    ((1 / global_batch_size) * loss).backward()
    sync_gradients(state.model)
    lr = apply_lr_and_step(config, state)
    summed = reduce_metrics_to_main(metrics, info) if metrics else None
    return train_metrics(summed, global_batch_size, lr) if summed is not None else None


# --------------------------------------------------------------------------------------- evaluation


def eval_batch(config: PretrainConfig, state: TrainState, batch: dict[str, torch.Tensor], info: DistInfo):
    """One test batch from a fresh carry, the head called until every row halted: (batch, metrics, outputs).

    Asking whether all rows halted is a host synchronisation. An ACT model in eval mode halts only at
    `halt_max_steps`, so the calls before that one are issued without asking and the device never idles.
    """
    model_config = getattr(state.model.model, "config", None)
    calls_before_check = 0 if state.model.training else max(0, getattr(model_config, "halt_max_steps", 1) - 1)
    with torch.inference_mode():
        batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
        with torch.device(info.device):
            carry = state.model.initial_carry(batch)
        calls = 0
        while True:
            carry, _, metrics, preds, all_halted = state.forward(
                carry=carry, batch=batch, return_keys=config.eval_save_outputs
            )
            calls += 1
            if calls > calls_before_check and all_halted:
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
_RESUME_FREE_KEYS = {"resume", "stop_at_step", "checkpoint_interval_steps", "use_wandb", "compile", "device"}


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
        )
    if state.step == 0:
        logger.log({"num_params": num_params}, step=0)

    progress = tqdm(total=state.total_steps, initial=min(state.step, state.total_steps), disable=not info.is_main)
    try:
        for iter_id in range(state.data_iters, total_iters):
            if info.is_main:
                print(f"epoch {iter_id * train_epochs}", file=sys.stderr)
            state.model.train()
            for _set_name, batch, global_batch_size in train_loader:
                metrics = train_batch(config, state, batch, global_batch_size, info)
                state.data_batches += 1
                if metrics is not None:
                    logger.log(metrics, step=state.step)
                    progress.update(state.step - progress.n)
                if should_save_periodic(config, state):
                    save_train_state(config, state, info)
                if config.stop_at_step is not None and state.step >= config.stop_at_step:
                    save_train_state(config, state, info)
                    if info.is_main:
                        print(f"stopped at step {state.step} (stop_at_step)", file=sys.stderr)
                    return state
            state.data_iters += 1
            state.data_batches = 0

            state.model.eval()
            results = evaluate(config, state, eval_loader, eval_dataset.metadata, info)
            if results is not None:
                logger.log(flatten_eval_metrics(results), step=state.step)

            if info.is_main and (config.checkpoint_every_eval or iter_id == total_iters - 1):
                ckpt.save_weights(state.model, config.checkpoint_path, state.step)
            save_train_state(config, state, info)  # always: a later kill resumes from here at worst
    finally:
        progress.close()
        logger.close()
    return state


def should_save_periodic(config: PretrainConfig, state: TrainState) -> bool:
    interval = config.checkpoint_interval_steps
    return interval is not None and state.step <= state.total_steps and state.step % interval == 0


def run(config: PretrainConfig) -> TrainState:
    with distributed_context(config.device) as info:
        return train(prepare_config(config, info), info)


# ------------------------------------------------------------------------------------------ command


@contextmanager
def bad_input_exits():
    """Bad input (config, files) becomes `error: <one line>` on stderr and exit status 2, no traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {one_line_config_error(e)}", file=sys.stderr)
        sys.exit(2)


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
