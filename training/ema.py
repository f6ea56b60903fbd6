"""Exponential moving average (EMA) of a model's parameters, for evaluation and checkpoints (`ema: true`).

Design choices:
- TRM's semantics (its `ema` / `ema_rate` keys): after every train step of the loop, for each parameter `w`
  that requires grad, `ema = (1 - rate) * w + rate * ema`, in that order of operations, so the values are
  TRM's to the bit; a constant rate; the average starts as a copy of the initial (or loaded) weights, in the
  parameters' own dtype. Like TRM it also updates on the loop's last batches past the final step (the
  weights no longer change then) and on a step whose update the non-finite guard dropped.
- Parameters only, not buffers. In particular the sparse puzzle-embedding table (`weights`, a buffer
  trained by sign-SGD) is used live: averaging it would double its memory (about 2 GB for ARC's ~1M
  rows) and touch every row each step, and TRM's EMA does not average it either. Fixed buffers
  (`H_init`, `L_init`, RoPE tables) need no averaging.
- Evaluation swaps the averaged values into the live parameters in place and restores them
  bit-exactly afterwards (`swapped_in`), so a compiled forward keeps working and no second model is built.
- `state_dict()` maps parameter names to the averaged tensors, so the train state resumes bit-exactly.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].copy_((1.0 - self.rate) * p + self.rate * self.shadow[name])

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Within the block the model's parameters hold the averaged values; the live ones come back after."""
        params = {name: p for name, p in model.named_parameters() if name in self.shadow}
        live = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(live[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"{source}: EMA lacks parameter {missing[0]!r} ({len(missing)} missing)")
        for name, value in self.shadow.items():
            if tuple(state[name].shape) != tuple(value.shape):
                raise ValueError(
                    f"{source}: EMA of {name!r} has shape {list(state[name].shape)}, expected {list(value.shape)}"
                )
            value.copy_(state[name])
