"""What HRM and TRM share around their recursion: the inner model's input/output layers, and the ACT wrapper.

Design choices:
- `RecursiveInner` holds the inner models' input and output: token embedding (scaled by sqrt(hidden)), the
  sparse puzzle embedding as a prefix of `puzzle_emb_len` rows (zero-padded), RoPE or learned positions (or
  none), the LM head, the Q head (zero weights, bias -5: Q starts at "continue"), and the fixed initial states
  `H_init` / `L_init`. It builds them in the references' order, with the subclass's recurrent modules
  (`build_levels`) in the middle where the references create them, so one seed gives their initial weights.
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
- `RecursiveModelConfig` holds the config keys both models share (pydantic); each model's config subclasses it
  with its own keys and checks. Its `puzzle_prefix_len` is the one place the prefix's row count is computed.
"""

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from models.common import ModelConfig, build_model_config, puzzle_prefix_len, trunc_normal_init_
from models.layers import CastedEmbedding, CastedLinear, RotaryEmbedding
from models.sparse_embedding import CastedSparseEmbedding


class RecursiveModelConfig(ModelConfig):
    """The config keys of HRM's and TRM's ACT models; unknown keys are refused (models/common.py)."""

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
    # Beyond the references: run no-grad block calls' channel SwiGLU through the fused Triton gate/up + SwiGLU
    # kernel of models/fused_ops.py (CUDA, bf16/fp16) on any GPU Triton runs on. Same math, the eager path's bf16
    # roundings. On Hopper and later its persistent TMA version runs whatever this says (models/layers.py,
    # `HRM_KERNELS_OFF=gate_up_swiglu` to switch it off); this key adds the other GPUs. CPU runs never take it.
    fused_ops: bool = False

    @field_validator(
        "batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "H_cycles", "L_cycles", "L_layers",
        "hidden_size", "num_heads", "halt_max_steps",
    )  # fmt: skip
    @classmethod
    def _check_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @property
    def puzzle_prefix_len(self) -> int:
        """Rows of the puzzle-embedding prefix of the state: ceil(puzzle_emb_ndim / hidden_size) (TRM: its override)."""
        return puzzle_prefix_len(self.puzzle_emb_ndim, self.hidden_size)


class RecursiveInner(nn.Module):
    carry_cls: ClassVar[type]  # the inner carry dataclass (z_H, z_L)

    def __init__(self, config: RecursiveModelConfig) -> None:
        super().__init__()
        self.config = config
        self.forward_dtype = getattr(torch, config.forward_dtype)

        self.embed_scale = math.sqrt(config.hidden_size)
        embed_init_std = 1.0 / self.embed_scale

        self.embed_tokens = CastedEmbedding(
            config.vocab_size, config.hidden_size, init_std=embed_init_std, cast_to=self.forward_dtype
        )
        self.lm_head = CastedLinear(config.hidden_size, config.vocab_size, bias=False)
        self.q_head = CastedLinear(config.hidden_size, 2, bias=True)

        self.puzzle_emb_len = config.puzzle_prefix_len
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
        # anything else: no position encoding (TRM's `none`; HRM's config allows only the two above)

        self.build_levels()

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

    def build_levels(self) -> None:
        """Create the recurrent modules (HRM: H_level then L_level; TRM: L_level)."""
        raise NotImplementedError

    def _input_embeddings(self, input: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        embedding = self.embed_tokens(input.to(torch.int32))  # [B, S, d]

        if self.puzzle_emb_len > 0:
            width = self.puzzle_emb_len * self.config.hidden_size
            if self.config.puzzle_emb_ndim > 0:
                puzzle_embedding = self.puzzle_emb(puzzle_identifiers)  # [B, puzzle_emb_ndim]
                pad_count = width - puzzle_embedding.shape[-1]
                if pad_count > 0:
                    puzzle_embedding = F.pad(puzzle_embedding, (0, pad_count))  # [B, P * d]
            else:  # TRM's prefix rows without a puzzle embedding: zeros
                puzzle_embedding = embedding.new_zeros(embedding.shape[0], width)  # [B, P * d]
            puzzle_embedding = puzzle_embedding.view(-1, self.puzzle_emb_len, self.config.hidden_size)  # [B, P, d]
            embedding = torch.cat((puzzle_embedding, embedding), dim=-2)  # [B, P + S, d]

        if self.config.pos_encodings == "learned":
            # Scale by 1/√2 to keep the sum of two unit-variance embeddings at unit variance.
            embedding = 0.707106781 * (embedding + self.embed_pos.embedding_weight.to(self.forward_dtype))

        return self.embed_scale * embedding

    def empty_carry(self, batch_size: int, device=None) -> Any:
        # Uninitialised on purpose: every row is halted at the start and gets reset before use.
        shape = (batch_size, self.config.seq_len + self.puzzle_emb_len, self.config.hidden_size)
        return self.carry_cls(
            z_H=torch.empty(shape, dtype=self.forward_dtype, device=device),
            z_L=torch.empty(shape, dtype=self.forward_dtype, device=device),
        )

    def reset_carry(self, reset_flag: torch.Tensor, carry: Any) -> Any:
        flag = reset_flag.view(-1, 1, 1)  # [B, 1, 1]
        return self.carry_cls(
            z_H=torch.where(flag, self.H_init, carry.z_H),
            z_L=torch.where(flag, self.L_init, carry.z_L),
        )

    def outputs(self, z_H: torch.Tensor, z_L: torch.Tensor):
        """(detached new carry, logits without the puzzle prefix, (q_halt, q_continue) in float32)."""
        new_carry = self.carry_cls(z_H=z_H.detach(), z_L=z_L.detach())
        output = self.lm_head(z_H)[:, self.puzzle_emb_len :]  # [B, S, V], drops the puzzle prefix
        q_logits = self.q_head(z_H[:, 0]).to(torch.float32)  # [B, 2], from the first prefix row
        return new_carry, output, (q_logits[..., 0], q_logits[..., 1])


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

    def makes_continue_target(self, training: bool) -> bool:
        """Whether `forward` in that mode outputs `target_q_continue`: in training, with more than one ACT step,
        when the model bootstraps its continue value (a loss head reports `q_continue_loss` exactly then)."""
        return training and self.config.halt_max_steps > 1 and self.bootstraps_continue

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

                if self.makes_continue_target(self.training):
                    # Q-learning target for "continue": the value of the next step (no bootstrapping
                    # beyond the step limit, where only halting is possible).
                    next_q_halt_logits, next_q_continue_logits = self.inner(new_inner_carry, new_current_data)[-1]
                    outputs["target_q_continue"] = torch.sigmoid(
                        torch.where(
                            is_last_step, next_q_halt_logits, torch.maximum(next_q_halt_logits, next_q_continue_logits)
                        )
                    )

        return self.carry_cls(new_inner_carry, new_steps, halted, new_current_data), outputs
