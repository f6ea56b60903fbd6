"""HRM with Adaptive Computation Time (ACT), version 1 — the paper's model.

Design choices:
- Two recurrent transformer modules: a slow high level H and a fast low level L. Within one ACT
  step L runs `L_cycles` times per H update and H runs `H_cycles` times; all but the last update
  of each run without gradients and only the final L and H updates are differentiated
  ("1-step gradient", a cheap stand-in for the implicit-function gradient of the paper).
- The recurrent state (carry) is detached between ACT steps and lives across training batches:
  a row whose sequence halted is reset to the fixed (not trained) initial states `H_init`/`L_init` and
  loaded with the next example, so the batch always stays full.
- Halting is a Q-learning problem: `q_head` predicts (halt, continue) values from the first
  position of z_H. In training a sequence halts when q_halt > q_continue (after a random minimum
  number of steps for exploration) and the continue target bootstraps from a second inner pass;
  in eval every sequence runs `halt_max_steps` steps so a batch stays in lockstep.
- No host synchronisation in the forward (no `.item()`, no branching on tensor values): all
  halting decisions are tensor ops, so the model compiles into one graph. Exploration draws from
  the global torch RNG on the model's device, so saving/restoring RNG state resumes exactly.
- Class, attribute and parameter names follow the reference, because state-dict keys are an
  interface (released checkpoints load unchanged).
"""

from dataclasses import dataclass

import torch
from pydantic import field_validator, model_validator

from models.act import ACTModel, RecursiveInner, RecursiveModelConfig
from models.layers import PostNormBlock, ReasoningModule


@dataclass
class HierarchicalReasoningModel_ACTV1InnerCarry:
    z_H: torch.Tensor
    z_L: torch.Tensor


@dataclass
class HierarchicalReasoningModel_ACTV1Carry:
    inner_carry: HierarchicalReasoningModel_ACTV1InnerCarry
    steps: torch.Tensor
    halted: torch.Tensor
    current_data: dict[str, torch.Tensor]


class HierarchicalReasoningModel_ACTV1Config(RecursiveModelConfig):
    """HRM's keys are the shared ones (models/act.py); positions are `rope` or `learned`, and H has >= 1 layer."""

    @field_validator("pos_encodings")
    @classmethod
    def _check_pos_encodings(cls, v: str) -> str:
        if v not in ("rope", "learned"):
            raise ValueError(f"expected 'rope' or 'learned', got {v!r}")
        return v

    @field_validator("H_layers")
    @classmethod
    def _check_h_layers(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _check_heads(self):
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.pos_encodings == "rope" and (self.hidden_size // self.num_heads) % 2 != 0:
            raise ValueError(f"hidden_size/num_heads = {self.hidden_size // self.num_heads} must be even for rope")
        if self.puzzle_emb_ndim < 0:
            raise ValueError(f"puzzle_emb_ndim must be >= 0, got {self.puzzle_emb_ndim}")
        return self


class HierarchicalReasoningModel_ACTV1Block(PostNormBlock):
    """Post-norm transformer block (models/layers.py): x = norm(x + attn(x)); x = norm(x + mlp(x))."""

    def __init__(self, config: HierarchicalReasoningModel_ACTV1Config) -> None:
        super().__init__(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            expansion=config.expansion,
            norm_eps=config.rms_norm_eps,
            fused_ops=config.fused_ops,
        )


class HierarchicalReasoningModel_ACTV1ReasoningModule(ReasoningModule):
    """One level (H or L): a stack of blocks applied to `hidden_states + input_injection`."""


class HierarchicalReasoningModel_ACTV1_Inner(RecursiveInner):
    """HRM's recursion between the shared input/output layers (models/act.py): a high level H and a low level L."""

    carry_cls = HierarchicalReasoningModel_ACTV1InnerCarry

    def build_levels(self) -> None:
        self.H_level = HierarchicalReasoningModel_ACTV1ReasoningModule(
            layers=[HierarchicalReasoningModel_ACTV1Block(self.config) for _ in range(self.config.H_layers)]
        )
        self.L_level = HierarchicalReasoningModel_ACTV1ReasoningModule(
            layers=[HierarchicalReasoningModel_ACTV1Block(self.config) for _ in range(self.config.L_layers)]
        )

    def forward(
        self, carry: HierarchicalReasoningModel_ACTV1InnerCarry, batch: dict[str, torch.Tensor]
    ) -> tuple[HierarchicalReasoningModel_ACTV1InnerCarry, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        seq_info = dict(cos_sin=self.rotary_emb() if hasattr(self, "rotary_emb") else None)

        input_embeddings = self._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])

        # All updates but the last L and H ones run without gradient (1-step gradient approximation).
        with torch.no_grad():
            z_H, z_L = carry.z_H, carry.z_L
            for _H_step in range(self.config.H_cycles):
                for _L_step in range(self.config.L_cycles):
                    if not (_H_step == self.config.H_cycles - 1 and _L_step == self.config.L_cycles - 1):
                        z_L = self.L_level(z_L, z_H + input_embeddings, **seq_info)
                if _H_step != self.config.H_cycles - 1:
                    z_H = self.H_level(z_H, z_L, **seq_info)

        z_L = self.L_level(z_L, z_H + input_embeddings, **seq_info)
        z_H = self.H_level(z_H, z_L, **seq_info)

        return self.outputs(z_H, z_L)


class HierarchicalReasoningModel_ACTV1(ACTModel):
    """ACT wrapper (models/act.py): keeps the carry of every batch row, decides halting, and refills halted rows."""

    config_cls = HierarchicalReasoningModel_ACTV1Config
    inner_cls = HierarchicalReasoningModel_ACTV1_Inner
    carry_cls = HierarchicalReasoningModel_ACTV1Carry
