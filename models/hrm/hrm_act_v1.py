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
from torch import nn

from models.act import ACTModel, RecursiveInner
from models.common import ModelConfig
from models.fused_ops import post_norm_block
from models.layers import Attention, ReasoningModule, SwiGLU


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


class HierarchicalReasoningModel_ACTV1Config(ModelConfig):
    batch_size: int
    seq_len: int
    puzzle_emb_ndim: int = 0
    num_puzzle_identifiers: int
    vocab_size: int

    H_cycles: int
    L_cycles: int

    H_layers: int
    L_layers: int

    # Transformer config
    hidden_size: int
    expansion: float
    num_heads: int
    pos_encodings: str

    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    # Halting Q-learning config
    halt_max_steps: int
    halt_exploration_prob: float

    forward_dtype: str = "bfloat16"
    # Beyond the reference, opt-in: run no-grad block calls through the fused Triton SwiGLU kernel of
    # models/fused_ops.py (CUDA, bf16/fp16; persistent TMA kernel on Hopper). Same math, the eager
    # path's bf16 roundings; on an H100 ~3% faster train steps and ~6% faster evaluation than
    # torch.compile + cuBLAS (benchmarks/RESULTS.md). Off by default: the default stays the reference's path.
    fused_ops: bool = False

    @field_validator("pos_encodings")
    @classmethod
    def _check_pos_encodings(cls, v: str) -> str:
        if v not in ("rope", "learned"):
            raise ValueError(f"expected 'rope' or 'learned', got {v!r}")
        return v

    @field_validator(
        "batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "H_cycles", "L_cycles", "H_layers",
        "L_layers", "hidden_size", "num_heads", "halt_max_steps",
    )  # fmt: skip
    @classmethod
    def _check_positive(cls, v: int) -> int:
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


class HierarchicalReasoningModel_ACTV1Block(nn.Module):
    """Post-norm transformer block: x = norm(x + attn(x)); x = norm(x + mlp(x))."""

    def __init__(self, config: HierarchicalReasoningModel_ACTV1Config) -> None:
        super().__init__()
        self.self_attn = Attention(
            hidden_size=config.hidden_size,
            head_dim=config.hidden_size // config.num_heads,
            num_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            causal=False,
        )
        self.mlp = SwiGLU(hidden_size=config.hidden_size, expansion=config.expansion)
        self.norm_eps = config.rms_norm_eps
        self.fused_ops = config.fused_ops

    def forward(self, cos_sin, hidden_states: torch.Tensor) -> torch.Tensor:
        # With fused_ops, no-grad passes on the GPU (40 of the 48 block calls of a train step, all of
        # evaluation) fuse the SwiGLU gating into its projection's matmul (models/fused_ops.py).
        return post_norm_block(self.self_attn, self.mlp, cos_sin, hidden_states, self.norm_eps, self.fused_ops)


class HierarchicalReasoningModel_ACTV1ReasoningModule(ReasoningModule):
    """One level (H or L): a stack of blocks applied to `hidden_states + input_injection`."""


class HierarchicalReasoningModel_ACTV1_Inner(RecursiveInner):
    """HRM's recursion between the shared input/output layers (models/act.py): a high level H and a low level L."""

    carry_cls = HierarchicalReasoningModel_ACTV1InnerCarry

    def __init__(self, config: HierarchicalReasoningModel_ACTV1Config) -> None:
        super().__init__(config, puzzle_emb_len=-(config.puzzle_emb_ndim // -config.hidden_size))  # ceil division

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
