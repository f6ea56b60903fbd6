"""One optimisation step (the reference's) and its options: async metrics, gradient accumulation, non-finite guard.

Design choices:
- The algorithm is the reference's: the loss head runs one ACT step on the persistent carry, the loss
  is scaled by 1/global batch, gradients are summed over ranks, each optimizer gets the warmup +
  cosine lr of this step, steps, and zeroes its gradients.
- No host synchronisation inside a step. The gradient all-reduce also carries a flag that is true iff
  the loss and every gradient are finite on every rank (and counts the ranks asking to stop after a
  SIGINT / SIGTERM, utils/interrupt.py); the optimizers take it (`step(skip_if=...)`)
  and drop a non-finite update on the device, and the carry's rows are marked halted on the device.
  The metric sums and the flag are copied to pinned host memory; `launch_train_step` returns a
  `PendingStep` and `finish_train_step` reads it, one step later when `async_metrics` is on.
- Gradient accumulation (`grad_accum_steps`) runs row slices of the per-rank batch on their rows of
  one carry (rows never interact inside the model); the puzzle embedding's gradient rows of each
  micro-batch are collected so SignSGD sees the full batch.
"""

import functools
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from training import carry as carry_tree
from training.config import PretrainConfig
from training.train_state import TrainState
from utils.distributed import DistInfo, all_reduce_sum_flat_with_votes_
from utils.interrupt import requested as stop_requested


def cosine_schedule_with_warmup_lr_lambda(
    current_step: int, *, base_lr: float, num_warmup_steps: int, num_training_steps: int, min_ratio: float = 0.0
) -> float:
    """Linear warmup from 0, then cosine decay from `base_lr` to `min_ratio * base_lr` at the last step."""
    if current_step < num_warmup_steps:
        return base_lr * float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))))


class NonFiniteError(RuntimeError):
    """`nonfinite: stop` met a non-finite loss or gradient; the train state was saved first."""

    exit_code = 3


# --------------------------------------------------------------------------------- forward/backward


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
    state.ensure_carry(batch, device)
    if grad_accum_steps == 1:
        state.carry, loss, metrics, _, _ = state.call(state.carry, batch, [])
        ((1 / global_batch_size) * loss).backward()
        return loss.detach(), metrics
    size = batch["inputs"].shape[0] // grad_accum_steps
    carries, losses, metric_sums = [], [], {}
    for i in range(grad_accum_steps):
        rows = slice(i * size, (i + 1) * size)
        carry, loss, metrics, _, _ = state.call(
            carry_tree.map_tensors(lambda t, rows=rows: t[rows], state.carry),
            {k: v[rows] for k, v in batch.items()},
            [],
        )
        ((1 / global_batch_size) * loss).backward()
        if state.sparse_grads is not None:
            state.sparse_grads.collect(rows)
        carries.append(carry)
        losses.append(loss.detach())
        for k, v in metrics.items():  # all metrics are sums over rows
            metric_sums[k] = metric_sums[k] + v if k in metric_sums else v
    state.carry = carry_tree.join(carries)
    return torch.stack(losses).sum(), metric_sums


# ---------------------------------------------------------------------------------------- optimizers


def sync_gradients(
    model: nn.Module, local_checks: list[torch.Tensor] | tuple = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum parameter gradients over ranks (the loss is already divided by the global batch).

    Returns two 0-dim tensors on the device, equal on every rank: a bool, every summed gradient is finite
    and so was every tensor of `local_checks` (the loss, the sparse embedding's gradient) on every rank;
    and the number of ranks asking to stop (a SIGINT / SIGTERM received, utils/interrupt.py).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return all_reduce_sum_flat_with_votes_(grads, local_checks, vote=bool(stop_requested()))


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


# -------------------------------------------------------------------------------------------- metrics


@dataclass
class PendingStep:
    """A launched train step whose metric sums, non-finite flag and stop votes are on their way to the host."""

    step: int
    lr: float
    global_batch_size: int
    keys: list[str]  # metric names in `values` order; empty on ranks other than 0
    values: torch.Tensor  # host [len(keys) + 2]: the metric sums over ranks, 1.0 iff all finite, the stop votes
    ready: Optional[torch.cuda.Event]  # recorded after the device-to-host copy; None if the copy was synchronous

    @classmethod
    def launch(cls, step, lr, global_batch_size, metrics, all_finite, votes, info: DistInfo) -> "PendingStep":
        """Sum the metrics onto rank 0 and start copying them (and the flags) to the host, without waiting."""
        keys = sorted(metrics)
        flag = torch.stack([all_finite.to(torch.float32), votes.to(all_finite.device, torch.float32)])
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


def progress_postfix(metrics: dict[str, float]) -> str:
    """The progress bar's text for a step's logged metrics (already on the host): loss and accuracies."""
    shown = {"loss": "train/lm_loss", "acc": "train/accuracy", "exact": "train/exact_accuracy"}
    return ", ".join(f"{name} {metrics[key]:.4g}" for name, key in shown.items() if key in metrics)


def use_async_metrics(config: PretrainConfig, info: DistInfo) -> bool:
    """Whether the train loop reads each step's metrics one step late (never waiting for the device)."""
    if config.async_metrics is not None:
        return config.async_metrics
    return info.device.type == "cuda" and config.nonfinite == "skip" and config.early_stop_train_accuracy is None


# ----------------------------------------------------------------------------------------------- step


def record_skipped_step(config: PretrainConfig, state: TrainState, info: DistInfo, step: int) -> None:
    """Book-keeping for step `step`, whose update the optimizers dropped on the device (non-finite values).

    The step still counts (its batch is consumed, the LR schedule moves on). The ACT carry restarted
    on the device (every row marked halted); when `step` is the latest step the carry is also dropped
    here, so a train state saved now holds none.
    """
    if step == state.step:
        state.drop_carry()
    state.skipped_steps += 1
    if config.nonfinite == "stop":
        state.nonfinite_stop = True
    elif info.is_main:  # through tqdm, so the line is not glued to the progress bar
        tqdm.write(f"warning: step {step}: non-finite loss or gradients, update skipped (nonfinite=skip)", sys.stderr)


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
        if state.ema is not None:  # TRM averages after every batch of the loop, these last ones too
            state.ema.update(state.model)
        return None
    batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
    loss, metrics = forward_backward(state, batch, global_batch_size, info.device, config.grad_accum_steps)
    all_finite, votes = sync_gradients(state.model, [loss, *sparse_gradients(state)])
    skip = ~all_finite
    lr = apply_lr_and_step(config, state, skip_if=skip)
    if state.ema is not None:
        state.ema.update(state.model)
    carry_tree.mark_halted(state.carry, skip)
    return PendingStep.launch(state.step, lr, global_batch_size, metrics, all_finite, votes, info)


def finish_train_step(
    config: PretrainConfig, state: TrainState, pending: PendingStep, info: DistInfo
) -> dict[str, float] | None:
    """Wait for a launched step's results; returns its logged metrics on rank 0 (None elsewhere).

    When a rank asked to stop in that step (SIGINT / SIGTERM), every rank learns it here, at the same step,
    and sets `state.stop_agreed`."""
    values = pending.wait()
    if values[-2] == 0.0:
        record_skipped_step(config, state, info, pending.step)
    if values[-1] > 0:  # NaN (a non-finite step) compares False: the next step carries the request
        state.stop_agreed = True
    if not pending.keys:
        return None
    return train_metrics(dict(zip(pending.keys, values[:-2])), pending.global_batch_size, pending.lr)


def train_batch(
    config: PretrainConfig, state: TrainState, batch: dict[str, torch.Tensor], global_batch_size: int, info: DistInfo
) -> dict[str, float] | None:
    """One optimisation step, waited for; returns the logged metrics on rank 0 (None elsewhere or past the last step)."""
    pending = launch_train_step(config, state, batch, global_batch_size, info)
    return None if pending is None else finish_train_step(config, state, pending, info)
