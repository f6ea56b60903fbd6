"""TRM, the Tiny Recursive Model (Jolicoeur-Martineau 2025, "Less is More: Recursive Reasoning with Tiny
Networks"), with HRM's Adaptive Computation Time wrapper.

Design choices (TRM's):
- One small network `L_level` (a stack of `L_layers` post-norm blocks) does all the reasoning; there is
  no H level. It keeps two states: the answer y (`z_H`) and a latent z (`z_L`). One cycle is `L_cycles`
  latent updates `z_L = L(z_L, z_H + x)` (x: the scaled input embedding) followed by one answer update
  `z_H = L(z_H, z_L)` with the same network; the answer update sees no input, so the network tells the
  two updates apart by what it is given.
- Per ACT step, `H_cycles - 1` full cycles run without gradient, then one full cycle with gradient: the
  gradient flows back through all `L_cycles + 1` updates of the last cycle (HRM differentiates only
  its last L and H update). Both states are detached before they are carried to the next ACT step.
- Block: HRM's post-norm attention block (`models.layers.PostNormBlock`, with its fused no-grad
  channel SwiGLU, `fused_ops`), or with `mlp_t` an MLP-Mixer-like block whose attention is replaced by a
  SwiGLU over the token axis (L = seq_len + puzzle_emb_len positions; the same class, see its file for
  the layouts and GPU kernels).
- Puzzle prefix: `puzzle_emb_len` rows (default 16; 0 means HRM's ceil(puzzle_emb_ndim / hidden_size)):
  the puzzle embedding is zero-padded to `puzzle_emb_len * hidden_size` and viewed as that many rows.
  The logits drop the prefix; Q (halt, continue) is read from the answer state's first row, in fp32.
- Positions: `rope`, `learned` (scaled by 1/√2 with the embedding, as HRM), or anything else (TRM's
  README uses `none`, e.g. for `mlp_t`): no position encoding.
- Halting: a row halts at `halt_max_steps`; in training (`halt_max_steps > 1`) also when q_halt > 0
  (`no_ACT_continue`, TRM's default: Q-halt alone, trained to predict "the answer is right") or, without
  it, when q_halt > q_continue with HRM's bootstrapped continue target from a second inner pass. HRM's
  exploration rule draws from the global torch RNG in the same order. Evaluation runs `halt_max_steps`.
- Initialisation, construction order, names and state-dict keys are TRM's, so one torch seed gives
  TRM's initial weights and TRM checkpoints load; `H_layers` is accepted and ignored.
- No host synchronisation in the forward (halting is tensor ops; `initial_carry` builds on the batch's
  device), so the step compiles into one graph.

Where this differs from TRM's repository (commit e7b6871), each on input where TRM's code crashes:
- `no_ACT_continue=False`: TRM unpacks the second inner pass's 3 return values into 5; here that pass
  gives HRM's target `sigmoid(q_halt' if last step else max(q_halt', q_continue'))`.
- `softmax_cross_entropy`: TRM's loss head passes `valid_mask`, which its softmax loss does not take;
  both losses of models/losses.py take it.
- `puzzle_emb_ndim=0` with `puzzle_emb_len > 0`: TRM builds a state with the prefix rows but an input
  without them; here the prefix is all zeros (an embedding of width 0 padded to the prefix).
- Unknown config keys are an error naming the key (TRM ignores them); `causal`, which the launcher
  passes to every model, is accepted when False.
"""

from dataclasses import dataclass

import torch
from pydantic import field_validator, model_validator

from models.act import ACTModel, RecursiveInner, RecursiveModelConfig
from models.layers import PostNormBlock, ReasoningModule


@dataclass
class TinyRecursiveReasoningModel_ACTV1InnerCarry:
    z_H: torch.Tensor  # the answer state y
    z_L: torch.Tensor  # the latent state z


@dataclass
class TinyRecursiveReasoningModel_ACTV1Carry:
    inner_carry: TinyRecursiveReasoningModel_ACTV1InnerCarry
    steps: torch.Tensor
    halted: torch.Tensor
    current_data: dict[str, torch.Tensor]


class TinyRecursiveReasoningModel_ACTV1Config(RecursiveModelConfig):
    # The shared keys (models/act.py) and TRM's own; misspelled keys fail loudly, the launcher's own keys
    # (`causal`, ...) pass (models/common.py). `H_layers`: TRM's configs carry it (trm.yaml: 0); there is no H
    # level, so it is not used. `pos_encodings`: rope, learned, or anything else for none. `fused_ops`: beyond
    # TRM (models/act.py); the CPU path stays TRM's op sequence.

    mlp_t: bool = False  # token-mixing SwiGLU instead of attention
    puzzle_emb_len: int = 16  # rows of the puzzle prefix; 0: ceil(puzzle_emb_ndim / hidden_size)
    no_ACT_continue: bool = True  # halt on q_halt > 0 alone; no continue target, no second inner pass

    @field_validator("H_layers", "puzzle_emb_ndim", "puzzle_emb_len")
    @classmethod
    def _check_non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check_shapes(self):
        uses_heads = not self.mlp_t or self.pos_encodings == "rope"  # attention, or RoPE tables of head size
        if uses_heads and self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.pos_encodings == "rope" and (self.hidden_size // self.num_heads) % 2 != 0:
            raise ValueError(f"hidden_size/num_heads = {self.hidden_size // self.num_heads} must be even for rope")
        if self.puzzle_emb_ndim > self.puzzle_prefix_len * self.hidden_size:
            raise ValueError(
                f"puzzle_emb_ndim ({self.puzzle_emb_ndim}) does not fit in puzzle_emb_len ({self.puzzle_emb_len}) "
                f"rows of hidden_size ({self.hidden_size})"
            )
        return self

    @property
    def puzzle_prefix_len(self) -> int:
        """`puzzle_emb_len` rows, or with 0 HRM's ceil(puzzle_emb_ndim / hidden_size)."""
        return self.puzzle_emb_len if self.puzzle_emb_len > 0 else super().puzzle_prefix_len


class TinyRecursiveReasoningModel_ACTV1Block(PostNormBlock):
    """Post-norm block (models/layers.py): token mixing (attention, or with `mlp_t` a SwiGLU over positions),
    then a channel SwiGLU."""

    def __init__(self, config: TinyRecursiveReasoningModel_ACTV1Config) -> None:
        super().__init__(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            expansion=config.expansion,
            norm_eps=config.rms_norm_eps,
            fused_ops=config.fused_ops,
            token_mix_width=config.seq_len + config.puzzle_prefix_len if config.mlp_t else None,
        )


class TinyRecursiveReasoningModel_ACTV1ReasoningModule(ReasoningModule):
    """TRM's one network: a stack of blocks applied to `hidden_states + input_injection`."""


class TinyRecursiveReasoningModel_ACTV1_Inner(RecursiveInner):
    """TRM's recursion between the shared input/output layers (models/act.py): one network updates z, then y."""

    carry_cls = TinyRecursiveReasoningModel_ACTV1InnerCarry

    def build_levels(self) -> None:
        self.L_level = TinyRecursiveReasoningModel_ACTV1ReasoningModule(
            layers=[TinyRecursiveReasoningModel_ACTV1Block(self.config) for _ in range(self.config.L_layers)]
        )

    def _cycle(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, seq_info: dict):
        """One recursion cycle: `L_cycles` latent updates from (answer + input), then one answer update."""
        for _L_step in range(self.config.L_cycles):
            z_L = self.L_level(z_L, z_H + x, **seq_info)
        z_H = self.L_level(z_H, z_L, **seq_info)
        return z_H, z_L

    def forward(
        self, carry: TinyRecursiveReasoningModel_ACTV1InnerCarry, batch: dict[str, torch.Tensor]
    ) -> tuple[TinyRecursiveReasoningModel_ACTV1InnerCarry, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        seq_info = dict(cos_sin=self.rotary_emb() if hasattr(self, "rotary_emb") else None)

        input_embeddings = self._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])

        # H_cycles - 1 cycles improve the states without gradient; the last one is differentiated in full.
        z_H, z_L = carry.z_H, carry.z_L
        with torch.no_grad():
            for _H_step in range(self.config.H_cycles - 1):
                z_H, z_L = self._cycle(z_H, z_L, input_embeddings, seq_info)
        z_H, z_L = self._cycle(z_H, z_L, input_embeddings, seq_info)

        return self.outputs(z_H, z_L)


class TinyRecursiveReasoningModel_ACTV1(ACTModel):
    """ACT wrapper (models/act.py): keeps the carry of every batch row, decides halting, and refills halted rows."""

    config_cls = TinyRecursiveReasoningModel_ACTV1Config
    inner_cls = TinyRecursiveReasoningModel_ACTV1_Inner
    carry_cls = TinyRecursiveReasoningModel_ACTV1Carry

    def halt_signal(self, q_halt_logits: torch.Tensor, q_continue_logits: torch.Tensor) -> torch.Tensor:
        if self.config.no_ACT_continue:
            return q_halt_logits > 0  # sigmoid(q_halt) > 1/2: "the answer is right"
        return super().halt_signal(q_halt_logits, q_continue_logits)

    @property
    def bootstraps_continue(self) -> bool:
        return not self.config.no_ACT_continue  # TRM's default trains q_halt alone: no second inner pass
