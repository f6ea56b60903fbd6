"""Per-puzzle embedding trained sparsely with sign-SGD.

Design choices:
- The full table `weights [num, dim]` is a persistent fp32 *buffer*, not a parameter: with
  ~1M ARC puzzle variants a dense Adam state would dwarf the model, and only the rows of the
  current batch ever receive gradient.
- In training the looked-up rows are copied into `local_weights [batch, dim]`, a small leaf
  tensor that requires grad; the optimizer reads its `.grad` together with `local_ids` and
  writes the update back into `weights`. Both locals are non-persistent (not in checkpoints).
  The copy is a fixed-shape `copy_`, so the forward has no host synchronisation.
- The optimizer all-gathers gradients and ids across ranks, sums gradients of repeated ids
  once, and applies sign-SGD with decoupled weight decay to the touched rows only.
- `step(skip_if=flag)` writes the rows back unchanged when the 0-dim bool tensor `flag` holds True,
  decided on the device (no host synchronisation), so a launcher can drop a non-finite step cheaply.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import Optimizer, ParamsT

from models.common import trunc_normal_init_


class CastedSparseEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, batch_size: int, init_std: float, cast_to: torch.dtype):
        super().__init__()
        self.cast_to = cast_to
        self.weights = nn.Buffer(
            trunc_normal_init_(torch.empty((num_embeddings, embedding_dim)), std=init_std), persistent=True
        )
        self.local_weights = nn.Buffer(torch.zeros(batch_size, embedding_dim, requires_grad=True), persistent=False)
        self.local_ids = nn.Buffer(torch.zeros(batch_size, dtype=torch.int32), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.weights[inputs].to(self.cast_to)
        with torch.no_grad():
            self.local_weights.copy_(self.weights[inputs])
            self.local_ids.copy_(inputs)
        return self.local_weights.to(self.cast_to)


class CastedSparseEmbeddingSignSGD_Distributed(Optimizer):
    """Sign-SGD for one `CastedSparseEmbedding`; its param group holds exactly its three buffers."""

    def __init__(self, params: ParamsT, world_size: int, lr: float = 1e-3, weight_decay: float = 1e-2):
        if not lr >= 0.0:
            raise ValueError(f"CastedSparseEmbeddingSignSGD_Distributed: invalid lr {lr} (must be >= 0)")
        if not weight_decay >= 0.0:
            raise ValueError(f"CastedSparseEmbeddingSignSGD_Distributed: invalid weight_decay {weight_decay}")
        if world_size < 1:
            raise ValueError(f"CastedSparseEmbeddingSignSGD_Distributed: invalid world_size {world_size}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, world_size=world_size))

    @torch.no_grad()
    def step(self, closure=None, skip_if: torch.Tensor | None = None):
        """One update; with `skip_if` (a 0-dim bool tensor) holding True, no row changes."""
        for group in self.param_groups:
            local_weights_grad = local_ids = weights = None
            if len(group["params"]) != 3:
                raise ValueError(
                    "CastedSparseEmbeddingSignSGD_Distributed: each param group must hold exactly the "
                    f"3 buffers of a CastedSparseEmbedding, got {len(group['params'])} tensors"
                )
            for p in group["params"]:
                if p.requires_grad:
                    local_weights_grad = p.grad
                elif p.ndim == 1:
                    local_ids = p
                elif p.ndim == 2:
                    weights = p
            if local_ids is None or weights is None:
                raise ValueError("CastedSparseEmbeddingSignSGD_Distributed: param group lacks local_ids or weights")
            if local_weights_grad is None:
                continue  # no backward since the last zero_grad: nothing to apply
            _sparse_emb_signsgd_dist(
                local_weights_grad,
                local_ids,
                weights,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                world_size=group["world_size"],
                skip_if=skip_if,
            )


def _sparse_emb_signsgd_dist(
    local_weights_grad: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    lr: float,
    weight_decay: float,
    world_size: int,
    skip_if: torch.Tensor | None = None,
) -> None:
    n, dim = local_weights_grad.shape
    all_weights_grad, all_ids = local_weights_grad, local_ids
    if world_size > 1:
        all_weights_grad = local_weights_grad.new_empty((world_size * n, dim))  # [W*N, D], rank-major
        all_ids = local_ids.new_empty((world_size * n,))
        # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; same semantics.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(all_weights_grad, local_weights_grad.contiguous())
        all_gather(all_ids, local_ids)

    # Sum gradients of repeated ids, so a row seen several times gets one sign step. `unique` would give
    # a data-dependent shape (a host synchronisation every step); instead sort the ids, number the runs
    # of equal ids, sum the gradients per run, and let every occurrence write its run's new row: the
    # copies are identical, so which write lands does not matter. All shapes stay [N] / [N, D].
    sorted_ids, order = torch.sort(all_ids.to(torch.int64))
    starts_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts_run[1:] = sorted_ids[1:] != sorted_ids[:-1]
    run_index = torch.cumsum(starts_run, dim=0) - 1  # [N], run of each sorted occurrence
    grad = all_weights_grad.new_zeros((sorted_ids.shape[0], dim))
    grad.index_add_(0, run_index, all_weights_grad[order])  # [N, D], rows past the last run stay 0

    old_rows = weights[sorted_ids]  # [N, D], gathered before any write
    rows = (old_rows * (1.0 - lr * weight_decay)).add_(torch.sign(grad[run_index]), alpha=-lr)
    if skip_if is not None:
        rows = torch.where(skip_if.to(rows.device), old_rows, rows)
    weights.index_put_((sorted_ids,), rows)
