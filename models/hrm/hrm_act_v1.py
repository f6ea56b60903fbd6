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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import nn

from models.act import ACTModel
from models.common import ModelConfig, trunc_normal_init_
from models.fused_ops import post_norm_block
from models.layers import Attention, CastedEmbedding, CastedLinear, ReasoningModule, RotaryEmbedding, SwiGLU
from models.sparse_embedding import CastedSparseEmbedding


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

    @field_validator("forward_dtype")
    @classmethod
    def _check_forward_dtype(cls, v: str) -> str:
        if not isinstance(getattr(torch, v, None), torch.dtype):
            raise ValueError(f"{v!r} is not a torch dtype name (e.g. 'bfloat16', 'float32')")
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


class HierarchicalReasoningModel_ACTV1_Inner(nn.Module):
    def __init__(self, config: HierarchicalReasoningModel_ACTV1Config) -> None:
        super().__init__()
        self.config = config
        self.forward_dtype = getattr(torch, config.forward_dtype)

        # Construction order matches the reference, so one seed gives the same initial weights.
        self.embed_scale = math.sqrt(config.hidden_size)
        embed_init_std = 1.0 / self.embed_scale

        self.embed_tokens = CastedEmbedding(
            config.vocab_size, config.hidden_size, init_std=embed_init_std, cast_to=self.forward_dtype
        )
        self.lm_head = CastedLinear(config.hidden_size, config.vocab_size, bias=False)
        self.q_head = CastedLinear(config.hidden_size, 2, bias=True)

        self.puzzle_emb_len = -(config.puzzle_emb_ndim // -config.hidden_size)  # ceil division
        if config.puzzle_emb_ndim > 0:
            # Zero init: a new puzzle starts with no identity signal.
            self.puzzle_emb = CastedSparseEmbedding(
                config.num_puzzle_identifiers,
                config.puzzle_emb_ndim,
                batch_size=config.batch_size,
                init_std=0,
                cast_to=self.forward_dtype,
            )

        total_len = config.seq_len + self.puzzle_emb_len
        if config.pos_encodings == "rope":
            self.rotary_emb = RotaryEmbedding(
                dim=config.hidden_size // config.num_heads, max_position_embeddings=total_len, base=config.rope_theta
            )
        elif config.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(
                total_len, config.hidden_size, init_std=embed_init_std, cast_to=self.forward_dtype
            )
        else:
            raise ValueError(f"pos_encodings: unknown {config.pos_encodings!r}; expected 'rope' or 'learned'")

        self.H_level = HierarchicalReasoningModel_ACTV1ReasoningModule(
            layers=[HierarchicalReasoningModel_ACTV1Block(config) for _ in range(config.H_layers)]
        )
        self.L_level = HierarchicalReasoningModel_ACTV1ReasoningModule(
            layers=[HierarchicalReasoningModel_ACTV1Block(config) for _ in range(config.L_layers)]
        )

        self.H_init = nn.Buffer(
            trunc_normal_init_(torch.empty(config.hidden_size, dtype=self.forward_dtype), std=1), persistent=True
        )
        self.L_init = nn.Buffer(
            trunc_normal_init_(torch.empty(config.hidden_size, dtype=self.forward_dtype), std=1), persistent=True
        )

        # Q head starts at "continue" (halt logit -5), so early training does not halt at once.
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5)

    def _input_embeddings(self, input: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        embedding = self.embed_tokens(input.to(torch.int32))  # [B, S, d]

        if self.config.puzzle_emb_ndim > 0:
            puzzle_embedding = self.puzzle_emb(puzzle_identifiers)  # [B, puzzle_emb_ndim]
            pad_count = self.puzzle_emb_len * self.config.hidden_size - puzzle_embedding.shape[-1]
            if pad_count > 0:
                puzzle_embedding = F.pad(puzzle_embedding, (0, pad_count))
            puzzle_embedding = puzzle_embedding.view(-1, self.puzzle_emb_len, self.config.hidden_size)  # [B, P, d]
            embedding = torch.cat((puzzle_embedding, embedding), dim=-2)  # [B, P + S, d]

        if self.config.pos_encodings == "learned":
            # Scale by 1/√2 to keep the sum of two unit-variance embeddings at unit variance.
            embedding = 0.707106781 * (embedding + self.embed_pos.embedding_weight.to(self.forward_dtype))

        return self.embed_scale * embedding

    def empty_carry(self, batch_size: int, device=None) -> HierarchicalReasoningModel_ACTV1InnerCarry:
        # Uninitialised on purpose: every row is halted at the start and gets reset before use.
        shape = (batch_size, self.config.seq_len + self.puzzle_emb_len, self.config.hidden_size)
        return HierarchicalReasoningModel_ACTV1InnerCarry(
            z_H=torch.empty(shape, dtype=self.forward_dtype, device=device),
            z_L=torch.empty(shape, dtype=self.forward_dtype, device=device),
        )

    def reset_carry(
        self, reset_flag: torch.Tensor, carry: HierarchicalReasoningModel_ACTV1InnerCarry
    ) -> HierarchicalReasoningModel_ACTV1InnerCarry:
        flag = reset_flag.view(-1, 1, 1)  # [B, 1, 1]
        return HierarchicalReasoningModel_ACTV1InnerCarry(
            z_H=torch.where(flag, self.H_init, carry.z_H),
            z_L=torch.where(flag, self.L_init, carry.z_L),
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

        new_carry = HierarchicalReasoningModel_ACTV1InnerCarry(z_H=z_H.detach(), z_L=z_L.detach())
        output = self.lm_head(z_H)[:, self.puzzle_emb_len :]  # [B, S, V], drops the puzzle prefix
        q_logits = self.q_head(z_H[:, 0]).to(torch.float32)  # [B, 2]
        return new_carry, output, (q_logits[..., 0], q_logits[..., 1])


class HierarchicalReasoningModel_ACTV1(ACTModel):
    """ACT wrapper (models/act.py): keeps the carry of every batch row, decides halting, and refills halted rows."""

    config_cls = HierarchicalReasoningModel_ACTV1Config
    inner_cls = HierarchicalReasoningModel_ACTV1_Inner
    carry_cls = HierarchicalReasoningModel_ACTV1Carry
