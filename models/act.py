"""Adaptive computation time (ACT): the wrapper HRM and TRM share around their inner recurrent model.

Design choices:
- One definition, subclassed per model (`HierarchicalReasoningModel_ACTV1`, `TinyRecursiveReasoningModel_ACTV1`):
  a subclass names its config, inner model and carry classes (state-dict keys `inner.*` and carry field names
  are an interface) and, where its halting differs, overrides `halt_signal` and `bootstraps_continue`.
- The carry lives across training batches: a row whose sequence halted restarts from the inner model's initial
  states with the next example of the batch, so the batch always stays full.
- Halting is a Q-learning problem on the first position of the answer state: in training a row halts at
  `halt_max_steps` or on its Q signal, after a random minimum number of steps for exploration
  (`torch.rand_like`, then `torch.randint_like`: the global RNG, in the references' order, so restoring the RNG
  state resumes exactly); the "continue" target bootstraps from a second inner pass. In eval every row runs
  `halt_max_steps` steps, so a batch stays in lockstep.
- No host synchronisation: every decision is a tensor op, so the wrapper compiles into one graph.
"""

from typing import Any, ClassVar

import torch
from torch import nn

from models.common import build_model_config


class ACTModel(nn.Module):
    config_cls: ClassVar[type]
    inner_cls: ClassVar[type]
    carry_cls: ClassVar[type]  # a dataclass (inner_carry, steps, halted, current_data)

    def __init__(self, config_dict: dict):
        super().__init__()
        self.config = build_model_config(self.config_cls, config_dict, type(self).__name__)
        self.inner = self.inner_cls(self.config)

    @property
    def puzzle_emb(self):
        return self.inner.puzzle_emb

    def halt_signal(self, q_halt_logits: torch.Tensor, q_continue_logits: torch.Tensor) -> torch.Tensor:
        """Rows whose Q head says halt (training only): Q-learning's greedy choice, halt over continue."""
        return q_halt_logits > q_continue_logits

    @property
    def bootstraps_continue(self) -> bool:
        """Whether the "continue" Q value is trained (a target from a second inner pass)."""
        return True

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> Any:
        batch_size = batch["inputs"].shape[0]
        device = batch["inputs"].device
        return self.carry_cls(
            inner_carry=self.inner.empty_carry(batch_size, device=device),
            steps=torch.zeros((batch_size,), dtype=torch.int32, device=device),
            halted=torch.ones((batch_size,), dtype=torch.bool, device=device),  # all halted: load data on first step
            current_data={k: torch.empty_like(v) for k, v in batch.items()},
        )

    def forward(self, carry: Any, batch: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        # Halted rows restart from the initial states with the next example of the batch.
        new_inner_carry = self.inner.reset_carry(carry.halted, carry.inner_carry)
        new_steps = torch.where(carry.halted, 0, carry.steps)
        new_current_data = {
            k: torch.where(carry.halted.view((-1,) + (1,) * (batch[k].ndim - 1)), batch[k], v)
            for k, v in carry.current_data.items()
        }

        new_inner_carry, logits, (q_halt_logits, q_continue_logits) = self.inner(new_inner_carry, new_current_data)
        outputs = {"logits": logits, "q_halt_logits": q_halt_logits, "q_continue_logits": q_continue_logits}

        with torch.no_grad():
            new_steps = new_steps + 1
            is_last_step = new_steps >= self.config.halt_max_steps
            halted = is_last_step

            # Eval keeps every row running to halt_max_steps, so a batch finishes together.
            if self.training and self.config.halt_max_steps > 1:
                halted = halted | self.halt_signal(q_halt_logits, q_continue_logits)

                # Exploration: with probability halt_exploration_prob a row must run at least
                # U{2..halt_max_steps} steps before it may halt.
                explore = torch.rand_like(q_halt_logits) < self.config.halt_exploration_prob
                min_halt_steps = explore * torch.randint_like(new_steps, low=2, high=self.config.halt_max_steps + 1)
                halted = halted & (new_steps >= min_halt_steps)

                if self.bootstraps_continue:
                    # Q-learning target for "continue": the value of the next step (no bootstrapping
                    # beyond the step limit, where only halting is possible).
                    next_q_halt_logits, next_q_continue_logits = self.inner(new_inner_carry, new_current_data)[-1]
                    outputs["target_q_continue"] = torch.sigmoid(
                        torch.where(
                            is_last_step, next_q_halt_logits, torch.maximum(next_q_halt_logits, next_q_continue_logits)
                        )
                    )

        return self.carry_cls(new_inner_carry, new_steps, halted, new_current_data), outputs
