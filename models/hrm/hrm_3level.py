"""Three-level hierarchical reasoning model: Planner -> Decomposer -> Executor (seed 000), in PyTorch.

One forward pass runs three transformer stacks over the same positions, each at its own "scale":
the planner builds a compressed plan, the decomposer reads the plan and marks task boundaries, the
executor reads both and applies routed action heads; a gated integration mixes the three level
outputs and a shared head predicts tokens. It is a single-step model (no ACT): the loss head's
carry is trivial and every sequence halts after one call.

Design choices (and where they depart from the seed's sketch, and why):
- Embedding. Token table stored in float8 e4m3 with one fp32 scale per row (absmax / 448, so small
  init values keep their 3 mantissa bits instead of falling into e4m3's subnormals), looked up and
  dequantised into the forward dtype. Storage falls back to bfloat16 where a float8 cast + gather
  round trip fails on the device. Float8 cannot hold gradients, so training keeps an fp32 master
  parameter `embedding_weight`: every forward re-quantises the master into the float8 table
  (one pass over V x d, the same traffic as the output head) and the lookup is straight-through,
  i.e. its value is the dequantised float8 row and its gradient goes to the master row unchanged.
  Re-quantising each call means the table can never be stale after an optimizer step or a
  checkpoint load; `generate()` freezes it once for its many small calls.
- Positions. The seed adds a "rotary" table to the activations, which is not how RoPE works; here
  each level applies RoPE to its own queries and keys, with base `rope_theta * scale` for scales
  1.0 / 0.1 / 0.01 (planner / decomposer / executor: lower bases rotate faster, i.e. finer
  positional resolution lower in the hierarchy). The seed's learned level embeddings `[3, d]`
  (std 0.02, unused in the seed) are added to each level's input stream to tell the levels apart.
- Attention. Non-causal by default (puzzles); `causal=True` makes every level, cross-attention,
  the boundary detector and the action router causal, so the model can be used as a language model.
  The planner's sparse pattern is one softmax over the union of a local window
  (|i - j| <= window_size) and `num_global_tokens` global positions (the first ones, so a puzzle
  embedding prefix is global): every query sees the global keys and global queries see every key
  (Longformer style). The seed instead blends two separately normalised softmaxes 0.7/0.3; one
  softmax lets each query learn its own mix and runs as one masked SDPA call. Decomposer and
  executor self-attention and all cross-attention are dense. Cross-attention applies the querying
  level's RoPE to both sides, since context and queries share the same positions.
- Blocks are pre-norm (`x + f(rms_norm(x))`, weightless RMSNorm as in HRM), unlike HRM's post-norm,
  following the seed. The seed's decomposer layers take the plan, so each decomposer block has
  self-attention, cross-attention to the plan and an MLP; the decomposer also keeps the seed's
  module-level plan cross-attention before its blocks. The executor cross-attends to plan and
  decomposition with half the heads each (same head size), averaged as in the seed.
- Boundary-aware transform: `h * (1 + b)` with `b` the detector's probability. The seed applies a
  second sigmoid to an already-sigmoided value; one sigmoid keeps the full (0, 1) range.
- Action heads are fused into one `[3d, d]` projection; the router is a softmax over a linear map of
  the mean executor state (a running prefix mean in causal mode, so it never sees the future).
- Integration takes each level's output (plan, decomposition, execution) rather than the seed's
  last layer states, so the action heads and the boundary transform lie on the path to the logits
  and are trained by the main loss, not only by auxiliary losses.
- Auxiliary losses (see `HierarchicalLossHead`) are deep supervision: each level's output read out
  through the shared, normalised output head, so each level is pushed to carry answer information
  at its own scale.
- Not in the seed: a `q_head` confidence probe (HRM's q_halt: "is the whole answer right?") on the
  detached mean integrated state, so evaluation outputs `q_halt_logits` (ARC scoring ranks tied
  votes by it) without changing the trunk's hierarchical objective.
"""

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from models.common import ModelConfig, build_model_config, puzzle_prefix_len, trunc_normal_init_
from models.layers import CastedLinear, RotaryEmbedding, SwiGLU, apply_rotary_pos_emb, attention, rms_norm
from models.losses import HALTED_SEQUENCE_METRICS, IGNORE_LABEL_ID, LOSS_FUNCTIONS, halted_sequence_metrics
from models.sparse_embedding import CastedSparseEmbedding

FLOAT8_E4M3_MAX = 448.0
LEVELS = ("planner", "decomposer", "executor")


class HierarchicalReasoningModel_3LevelConfig(ModelConfig):
    batch_size: int
    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int = 1
    puzzle_emb_ndim: int = 0

    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    planner_layers: int = 4
    decomposer_layers: int = 2
    executor_layers: int = 2

    window_size: int = 32
    num_global_tokens: int = 8
    rope_theta: float = 10000.0
    rope_level_scales: tuple[float, float, float] = (1.0, 0.1, 0.01)
    level_embed_init_std: float = 0.02
    token_storage_dtype: Literal["float8_e4m3fn", "bfloat16", "float32"] = "float8_e4m3fn"

    planner_lr_scale: float = 1.0
    decomposer_lr_scale: float = 1.5
    executor_lr_scale: float = 2.0

    causal: bool = False
    rms_norm_eps: float = 1e-5
    forward_dtype: str = "bfloat16"

    @model_validator(mode="after")
    def _check(self):
        for name in ("batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "hidden_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("puzzle_emb_ndim", "planner_layers", "decomposer_layers", "executor_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.window_size < 0 or self.num_global_tokens < 0:
            raise ValueError(
                f"window_size/num_global_tokens: must be >= 0, got {self.window_size}/{self.num_global_tokens}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % 2 or (self.hidden_size // self.num_heads) % 2:
            # The executor splits the heads between two cross-attentions; RoPE rotates pairs of channels.
            raise ValueError(
                f"num_heads ({self.num_heads}) and head size ({self.hidden_size // self.num_heads}) must be even"
            )
        return self


@dataclass
class HierarchicalReasoningModel_3LevelCarry:
    """Single-step model: a carry only to keep the ACT calling protocol (every row halts after one call)."""

    steps: torch.Tensor  # [B] int32
    halted: torch.Tensor  # [B] bool


@dataclass
class HierarchicalReasoningModel_3LevelCache:
    """Incremental-decoding state: keys/values per attention module plus the two per-position recurrences."""

    length: int = 0  # positions already processed, puzzle prefix included
    kv: dict = field(default_factory=dict)  # attention module -> (k, v), each [B, T, H, D]
    boundary_prev: Optional[torch.Tensor] = None  # [B, d] last normalised decomposer state
    router_sum: Optional[torch.Tensor] = None  # [B, d] fp32 running sum of normalised executor states


def float8_supported(device: torch.device) -> bool:
    """Whether a float8 e4m3 cast, row gather and cast back work on `device` (probed at model construction)."""
    try:
        x = torch.tensor([[0.5, -1.75], [3.0, 0.25]], device=device)
        y = x.to(torch.float8_e4m3fn)[torch.tensor([1, 0], device=device)].to(torch.bfloat16)
        return torch.equal(y.float().cpu(), torch.tensor([[3.0, 0.25], [0.5, -1.75]]))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def sparse_attention_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, *, window_size: Optional[int], num_global: int, causal: bool
) -> torch.Tensor:
    """Boolean [Q, K] mask over absolute positions, True = may attend. `window_size=None` means dense."""
    q = q_positions[:, None]
    k = k_positions[None, :]
    allowed = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q_positions.device)
    if window_size is not None:
        allowed = ((q - k).abs() <= window_size) | (k < num_global) | (q < num_global)
    if causal:
        allowed = allowed & (k <= q)
    return allowed


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens until their mass reaches `top_p`, renormalise."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # the top token always has mass_before 0
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
    filtered = torch.where(keep, probs, 0)
    return filtered / filtered.sum(-1, keepdim=True)


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """[B, V] logits -> [B] tokens; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class HierarchicalReasoningModel_3LevelTokenEmbedding(nn.Module):
    """fp32 master table, float8 (or bf16) lookup copy with per-row scales, straight-through gradient."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float, storage_dtype: torch.dtype, cast_to):
        super().__init__()
        self.cast_to = cast_to
        self.storage_dtype = storage_dtype
        self.embedding_weight = nn.Parameter(
            trunc_normal_init_(torch.empty((num_embeddings, embedding_dim)), std=init_std)
        )
        self.table = nn.Buffer(torch.zeros(num_embeddings, embedding_dim, dtype=storage_dtype), persistent=False)
        self.row_scale = nn.Buffer(torch.ones(num_embeddings, 1), persistent=False)
        self.frozen = False

    @torch.no_grad()
    def refresh(self) -> None:
        """Quantise the master into the storage table."""
        w = self.embedding_weight.detach().float()
        if self.storage_dtype == torch.float8_e4m3fn:
            scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FLOAT8_E4M3_MAX  # [V, 1]
        else:
            scale = torch.ones_like(w[:, :1])
        self.table.copy_((w / scale).to(self.storage_dtype))
        self.row_scale.copy_(scale)

    def dequantised(self) -> torch.Tensor:
        """The table as the lookup sees it, fp32 [V, d]."""
        return self.table.float() * self.row_scale

    @contextmanager
    def frozen_table(self):
        """Quantise once and reuse the table for every call inside (for many small inference calls)."""
        self.refresh()
        self.frozen = True
        try:
            yield
        finally:
            self.frozen = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            self.refresh()
        stored = self.table[input_ids].float() * self.row_scale[input_ids]  # [B, S, d]
        master = F.embedding(input_ids, self.embedding_weight)  # [B, S, d], carries the gradient
        return (master + (stored - master).detach()).to(self.cast_to)


class HierarchicalReasoningModel_3LevelEmbedding(nn.Module):
    """Token table, one RoPE table per level (bases scaled 1 / 0.1 / 0.01) and learned level embeddings."""

    def __init__(self, config: HierarchicalReasoningModel_3LevelConfig, num_positions: int, storage_dtype):
        super().__init__()
        d = config.hidden_size
        head_dim = d // config.num_heads
        self.embed_scale = math.sqrt(d)
        self.embed_tokens = HierarchicalReasoningModel_3LevelTokenEmbedding(
            config.vocab_size, d, init_std=1.0 / self.embed_scale, storage_dtype=storage_dtype,
            cast_to=getattr(torch, config.forward_dtype),
        )  # fmt: skip
        self.rotary = nn.ModuleList(
            RotaryEmbedding(head_dim, num_positions, base=config.rope_theta * scale)
            for scale in config.rope_level_scales
        )
        self.level_embed = nn.Parameter(trunc_normal_init_(torch.empty(3, d), std=config.level_embed_init_std))


class HierarchicalReasoningModel_3LevelAttention(nn.Module):
    """Multi-head self- or cross-attention with RoPE, an optional boolean mask and an optional KV cache."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, cross: bool):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.cross = cross
        width = num_heads * head_dim
        if cross:
            self.q_proj = CastedLinear(hidden_size, width, bias=False)
            self.kv_proj = CastedLinear(hidden_size, 2 * width, bias=False)
        else:
            self.qkv_proj = CastedLinear(hidden_size, 3 * width, bias=False)
        self.o_proj = CastedLinear(width, hidden_size, bias=False)

    def forward(self, hidden_states, cos_sin, mask, causal: bool, context=None, cache=None) -> torch.Tensor:
        """`mask` [Q, K] bool or None (then dense, causal if `causal`); `context` only for cross-attention."""
        B, S, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        if self.cross:
            query = self.q_proj(hidden_states).view(B, S, H, D)  # [B, S, H, D]
            key, value = self.kv_proj(context).view(B, S, 2 * H, D).split(H, dim=2)  # [B, S, H, D] each
        else:
            query, key, value = self.qkv_proj(hidden_states).view(B, S, 3 * H, D).split(H, dim=2)
        query, key = apply_rotary_pos_emb(query, key, *cos_sin)
        if cache is not None:
            if self in cache.kv:
                past_key, past_value = cache.kv[self]
                key = torch.cat((past_key, key), dim=1)  # [B, T, H, D]
                value = torch.cat((past_value, value), dim=1)
            cache.kv[self] = (key, value)
        if mask is None:
            out = attention(query, key, value, causal=causal)
        else:
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
            ).transpose(1, 2)  # [B, S, H, D]
        return self.o_proj(out.reshape(B, S, H * D))  # [B, S, H*D] -> [B, S, d]


@dataclass
class _AttnArgs:
    """What one attention call needs besides its inputs: RoPE slice, mask, causality, cache."""

    cos_sin: tuple
    mask: Optional[torch.Tensor]
    causal: bool
    cache: Optional[HierarchicalReasoningModel_3LevelCache]


class HierarchicalReasoningModel_3LevelBlock(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to a higher level, SwiGLU."""

    def __init__(self, config: HierarchicalReasoningModel_3LevelConfig, cross: bool):
        super().__init__()
        self.eps = config.rms_norm_eps
        head_dim = config.hidden_size // config.num_heads
        self.self_attn = HierarchicalReasoningModel_3LevelAttention(
            config.hidden_size, head_dim, config.num_heads, False
        )
        self.cross_attn = (
            HierarchicalReasoningModel_3LevelAttention(config.hidden_size, head_dim, config.num_heads, True)
            if cross
            else None
        )
        self.mlp = SwiGLU(config.hidden_size, config.expansion)

    def forward(self, x, self_args: _AttnArgs, cross_args: Optional[_AttnArgs] = None, context=None):
        a = self_args
        x = x + self.self_attn(rms_norm(x, self.eps), a.cos_sin, a.mask, a.causal, cache=a.cache)
        if self.cross_attn is not None:
            c = cross_args
            x = x + self.cross_attn(rms_norm(x, self.eps), c.cos_sin, c.mask, c.causal, context=context, cache=c.cache)
        return x + self.mlp(rms_norm(x, self.eps))


class HierarchicalReasoningModel_3LevelPlanner(nn.Module):
    """Blocks with window + global sparse attention, then a d -> d/2 -> d compress/expand of the plan."""

    def __init__(self, config: HierarchicalReasoningModel_3LevelConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        d = config.hidden_size
        self.layers = nn.ModuleList(
            HierarchicalReasoningModel_3LevelBlock(config, cross=False) for _ in range(config.planner_layers)
        )
        self.plan_compressor = CastedLinear(d, d // 2, bias=True)
        self.plan_expander = CastedLinear(d // 2, d, bias=True)

    def forward(self, x, sparse_args: _AttnArgs) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, sparse_args)
        return self.plan_expander(F.gelu(self.plan_compressor(rms_norm(x, self.eps))))


class TaskBoundaryDetector(nn.Module):
    """Boundary probability per position from a state and its difference to the previous position."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.boundary_in = CastedLinear(2 * hidden_size, hidden_size, bias=True)
        self.boundary_out = CastedLinear(hidden_size, 1, bias=True)
        self.threshold = nn.Parameter(torch.tensor(0.5))

    def forward(self, h: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
        """h [B, T, d]; prev [B, d] is the state just before h[:, 0] (zeros at the sequence start)."""
        if prev is None:
            prev = torch.zeros_like(h[:, 0])
        shifted = torch.cat((prev.unsqueeze(1), h[:, :-1]), dim=1)  # [B, T, d]
        logits = self.boundary_out(F.relu(self.boundary_in(torch.cat((h, h - shifted), dim=-1)))).squeeze(-1)
        return torch.sigmoid(logits.float() - self.threshold)  # [B, T] fp32


class HierarchicalReasoningModel_3LevelDecomposer(nn.Module):
    """Cross-attention to the plan, blocks that read the plan, boundary detection and boundary-aware scaling."""

    def __init__(self, config: HierarchicalReasoningModel_3LevelConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        head_dim = config.hidden_size // config.num_heads
        self.plan_attention = HierarchicalReasoningModel_3LevelAttention(
            config.hidden_size, head_dim, config.num_heads, True
        )
        self.layers = nn.ModuleList(
            HierarchicalReasoningModel_3LevelBlock(config, cross=True) for _ in range(config.decomposer_layers)
        )
        self.boundary_detector = TaskBoundaryDetector(config.hidden_size)

    def forward(self, x, plan, dense_args: _AttnArgs):
        a = dense_args
        x = x + self.plan_attention(rms_norm(x, self.eps), a.cos_sin, a.mask, a.causal, context=plan, cache=a.cache)
        for layer in self.layers:
            x = layer(x, dense_args, dense_args, context=plan)
        h = rms_norm(x, self.eps)
        prev = None if a.cache is None else a.cache.boundary_prev
        boundaries = self.boundary_detector(h, prev)
        if a.cache is not None:
            a.cache.boundary_prev = h[:, -1]
        return h * (1 + boundaries.unsqueeze(-1)).to(h.dtype), boundaries


class HierarchicalReasoningModel_3LevelExecutor(nn.Module):
    """Half-head cross-attention to plan and decomposition, blocks, then routed action heads."""

    def __init__(self, config: HierarchicalReasoningModel_3LevelConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.causal = config.causal
        d = config.hidden_size
        head_dim = d // config.num_heads
        half = config.num_heads // 2
        self.plan_attention = HierarchicalReasoningModel_3LevelAttention(d, head_dim, half, True)
        self.decomp_attention = HierarchicalReasoningModel_3LevelAttention(d, head_dim, half, True)
        self.layers = nn.ModuleList(
            HierarchicalReasoningModel_3LevelBlock(config, cross=False) for _ in range(config.executor_layers)
        )
        # Three action heads ("generation", "reasoning", "retrieval" in the seed) fused into one matmul.
        self.action_heads = CastedLinear(d, 3 * d, bias=False)
        self.action_router = CastedLinear(d, 3, bias=True)

    def forward(self, x, plan, decomposition, dense_args: _AttnArgs):
        a = dense_args
        xn = rms_norm(x, self.eps)
        plan_info = self.plan_attention(xn, a.cos_sin, a.mask, a.causal, context=plan, cache=a.cache)
        decomp_info = self.decomp_attention(xn, a.cos_sin, a.mask, a.causal, context=decomposition, cache=a.cache)
        x = x + 0.5 * (plan_info + decomp_info)
        for layer in self.layers:
            x = layer(x, dense_args)
        h = rms_norm(x, self.eps)

        # Router input: mean state over the sequence, or over the prefix so far when causal.
        if self.causal:
            past_sum = 0 if a.cache is None or a.cache.router_sum is None else a.cache.router_sum.unsqueeze(1)
            start = 0 if a.cache is None else a.cache.length
            prefix_sum = h.float().cumsum(1) + past_sum  # [B, T, d]
            counts = torch.arange(start + 1, start + h.shape[1] + 1, device=h.device, dtype=torch.float32)
            summary = prefix_sum / counts[:, None]
            if a.cache is not None:
                a.cache.router_sum = prefix_sum[:, -1]
        else:
            summary = h.float().mean(1, keepdim=True)  # [B, 1, d]
        router = torch.softmax(self.action_router(summary.to(h.dtype)).float(), dim=-1).to(h.dtype)  # [B, T|1, 3]
        heads = self.action_heads(h).unflatten(-1, (3, h.shape[-1]))  # [B, T, 3, d]
        return (router.unsqueeze(-1) * heads).sum(2)


class CrossLevelIntegration(nn.Module):
    """Pairwise level mixing plus sigmoid gates over all three levels, then RMSNorm."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        d = hidden_size
        self.plan_to_decomp = CastedLinear(2 * d, d, bias=False)
        self.decomp_to_exec = CastedLinear(2 * d, d, bias=False)
        self.exec_to_plan = CastedLinear(2 * d, d, bias=False)
        self.gates = CastedLinear(3 * d, 3 * d, bias=True)  # plan, decomposition, execution gates fused

    def forward(self, plan, decomp, execution):
        plan_decomp = self.plan_to_decomp(torch.cat((plan, decomp), dim=-1))
        decomp_exec = self.decomp_to_exec(torch.cat((decomp, execution), dim=-1))
        exec_plan = self.exec_to_plan(torch.cat((execution, plan), dim=-1))
        gate_plan, gate_decomp, gate_exec = torch.sigmoid(
            self.gates(torch.cat((plan, decomp, execution), dim=-1))
        ).chunk(3, -1)
        integrated = (
            gate_plan * (plan + exec_plan)
            + gate_decomp * (decomp + plan_decomp)
            + gate_exec * (execution + decomp_exec)
        )
        return rms_norm(integrated, self.eps)


class HierarchicalReasoningModel_3Level(nn.Module):
    """The model the loss head wraps: `initial_carry(batch)`, `forward(carry, batch)`, `generate(...)`."""

    def __init__(self, config_dict: dict):
        super().__init__()
        self.config = config = build_model_config(
            HierarchicalReasoningModel_3LevelConfig, config_dict, "HierarchicalReasoningModel_3Level"
        )
        self.forward_dtype = getattr(torch, config.forward_dtype)
        d = config.hidden_size

        self.puzzle_emb_len = puzzle_prefix_len(config.puzzle_emb_ndim, d)
        self.num_positions = config.seq_len + self.puzzle_emb_len
        storage = getattr(torch, config.token_storage_dtype)
        if storage == torch.float8_e4m3fn and not float8_supported(torch.empty(0).device):
            storage = torch.bfloat16

        self.embedding = HierarchicalReasoningModel_3LevelEmbedding(config, self.num_positions, storage)
        if config.puzzle_emb_ndim > 0:
            # Zero init as in HRM; its buffers are trained by the launcher's sign-SGD, not by Adam.
            self.puzzle_emb = CastedSparseEmbedding(
                config.num_puzzle_identifiers, config.puzzle_emb_ndim, batch_size=config.batch_size,
                init_std=0, cast_to=self.forward_dtype,
            )  # fmt: skip
        self.planner = HierarchicalReasoningModel_3LevelPlanner(config)
        self.decomposer = HierarchicalReasoningModel_3LevelDecomposer(config)
        self.executor = HierarchicalReasoningModel_3LevelExecutor(config)
        self.integration = CrossLevelIntegration(d, config.rms_norm_eps)
        self.lm_head = CastedLinear(d, config.vocab_size, bias=False)
        # Confidence probe "is the whole answer right?" (HRM's q_halt), read from a detached mean state:
        # ARC scoring breaks vote ties with it; detaching keeps the trunk's objective purely hierarchical.
        self.q_head = CastedLinear(d, 1, bias=True)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5)

        positions = torch.arange(self.num_positions)
        self.planner_mask = nn.Buffer(
            sparse_attention_mask(
                positions, positions, window_size=config.window_size, num_global=config.num_global_tokens,
                causal=config.causal,
            ),
            persistent=False,
        )  # fmt: skip
        self.dense_mask = nn.Buffer(
            sparse_attention_mask(positions, positions, window_size=None, num_global=0, causal=config.causal),
            persistent=False,
        )

    # --- training / evaluation protocol -------------------------------------------------------------
    def initial_carry(self, batch: dict) -> HierarchicalReasoningModel_3LevelCarry:
        batch_size = batch["inputs"].shape[0]
        device = batch["inputs"].device
        return HierarchicalReasoningModel_3LevelCarry(
            steps=torch.zeros(batch_size, dtype=torch.int32, device=device),
            halted=torch.ones(batch_size, dtype=torch.bool, device=device),
        )

    def forward(self, carry: HierarchicalReasoningModel_3LevelCarry, batch: dict):
        levels = self._forward_levels(batch["inputs"], batch.get("puzzle_identifiers"))
        P = self.puzzle_emb_len
        outputs = {
            "logits": self.lm_head(levels["integrated"])[:, P:],
            "q_halt_logits": self.q_head(levels["integrated"].detach().mean(1)).squeeze(-1).float(),  # [B]
        }
        outputs.update({k: levels[k][:, P:] for k in ("plan", "decomposition", "execution", "boundaries")})
        new_carry = HierarchicalReasoningModel_3LevelCarry(
            steps=torch.ones_like(carry.steps), halted=torch.ones_like(carry.halted)
        )
        return new_carry, outputs

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared output head applied to a (normalised) level output: the auxiliary losses' logits."""
        return self.lm_head(rms_norm(hidden, self.config.rms_norm_eps))

    def optimizer_param_groups(self) -> list[dict]:
        """Per-level learning-rate scales; embedding, integration and output head share scale 1."""
        c = self.config
        groups = [
            {"params": list(self.planner.parameters()), "lr_scale": c.planner_lr_scale},
            {"params": list(self.decomposer.parameters()), "lr_scale": c.decomposer_lr_scale},
            {"params": list(self.executor.parameters()), "lr_scale": c.executor_lr_scale},
        ]
        in_levels = {id(p) for g in groups for p in g["params"]}
        groups.append({"params": [p for p in self.parameters() if id(p) not in in_levels], "lr_scale": 1.0})
        return groups

    # --- core ---------------------------------------------------------------------------------------
    def _input_embeddings(self, inputs, puzzle_identifiers, with_prefix: bool) -> torch.Tensor:
        emb = self.embedding.embed_tokens(inputs.to(torch.int32))  # [B, S, d]
        if self.puzzle_emb_len > 0 and with_prefix:
            if puzzle_identifiers is None:
                raise ValueError("batch: 'puzzle_identifiers' is required when puzzle_emb_ndim > 0")
            puzzle = self.puzzle_emb(puzzle_identifiers)  # [B, ndim]
            pad = self.puzzle_emb_len * self.config.hidden_size - puzzle.shape[-1]
            puzzle = F.pad(puzzle, (0, pad)).view(-1, self.puzzle_emb_len, self.config.hidden_size)  # [B, P, d]
            emb = torch.cat((puzzle, emb), dim=1)  # [B, P + S, d]
        return self.embedding.embed_scale * emb

    def _forward_levels(
        self, inputs, puzzle_identifiers, cache: Optional[HierarchicalReasoningModel_3LevelCache] = None
    ):
        """All three levels over the new positions (all positions without a cache); keys include the prefix."""
        start = 0 if cache is None else cache.length
        x = self._input_embeddings(inputs, puzzle_identifiers, with_prefix=start == 0)
        end = start + x.shape[1]
        if end > self.num_positions:
            raise ValueError(
                f"sequence length {end} exceeds the model's {self.num_positions} positions (seq_len + prefix)"
            )

        def args(level: int, sparse: bool) -> _AttnArgs:
            cos, sin = self.embedding.rotary[level]()
            if cache is None and not sparse:
                mask = None  # dense full-sequence attention: let the kernel handle causality
            else:
                mask = (self.planner_mask if sparse else self.dense_mask)[start:end, :end]
            return _AttnArgs((cos[start:end], sin[start:end]), mask, self.config.causal, cache)

        level_embed = self.embedding.level_embed.to(x.dtype)
        plan = self.planner(x + level_embed[0], args(0, sparse=True))
        decomposition, boundaries = self.decomposer(x + level_embed[1], plan, args(1, sparse=False))
        execution = self.executor(x + level_embed[2], plan, decomposition, args(2, sparse=False))
        integrated = self.integration(plan, decomposition, execution)
        if cache is not None:
            cache.length = end
        return {
            "integrated": integrated,
            "plan": plan,
            "decomposition": decomposition,
            "execution": execution,
            "boundaries": boundaries,
        }

    # --- language-model use -------------------------------------------------------------------------
    def next_token_logits(self, inputs, puzzle_identifiers=None, cache=None) -> torch.Tensor:
        """Logits [B, V] at the last position of `inputs` (the new tokens when a cache is given)."""
        return self.lm_head(self._forward_levels(inputs, puzzle_identifiers, cache)["integrated"][:, -1])

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
        puzzle_identifiers: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Autoregressive sampling (causal models only); returns [B, S + max_new_tokens] token ids."""
        if not self.config.causal:
            raise ValueError("generate(): the model was built with causal=False; build it with causal=True")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate(): need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        needed = self.puzzle_emb_len + input_ids.shape[1] + max_new_tokens - 1  # the last token is never fed
        if needed > self.num_positions:
            raise ValueError(
                f"generate(): prompt {input_ids.shape[1]} + {max_new_tokens} new tokens exceeds the model's "
                f"{self.num_positions} positions (seq_len + puzzle prefix)"
            )
        if self.puzzle_emb_len > 0 and puzzle_identifiers is None:
            puzzle_identifiers = torch.zeros(input_ids.shape[0], dtype=torch.int32, device=input_ids.device)

        was_training = self.training
        self.eval()
        tokens = input_ids
        try:
            with self.embedding.embed_tokens.frozen_table():
                cache = HierarchicalReasoningModel_3LevelCache() if use_cache else None
                new = tokens
                for _ in range(max_new_tokens):
                    logits = self.next_token_logits(new if use_cache else tokens, puzzle_identifiers, cache)
                    next_token = sample_next_token(logits, temperature, top_p, generator)  # [B]
                    tokens = torch.cat((tokens, next_token[:, None].to(tokens.dtype)), dim=1)
                    new = tokens[:, -1:]
        finally:
            self.train(was_training)
        return tokens


class HierarchicalLossHead(nn.Module):
    """Hierarchical objective: main cross-entropy plus deep-supervision losses of the three levels.

    total = lm_w * lm_loss + plan_w * plan_loss + decomp_w * decomp_loss + exec_w * exec_loss,
    weights 1.0 / 0.3 / 0.2 / 0.1 as in the seed. Each auxiliary loss is the same token loss as the
    main one, applied to `model.readout(level output)` (shared output head after RMSNorm). The seed
    names "plan consistency", "decomposition" and "execution" losses without defining them; deep
    supervision is the definition that needs no extra labels and gives every level a direct,
    short gradient path. The weights fall from planner to executor because the executor output is
    already one gated mix away from the logits, while the planner is furthest from the main loss.
    Every loss is summed over the batch of per-sequence means, as in `ACTLossHead`.

    Besides, `q_halt_loss` (BCE of `q_halt_logits` against "the whole sequence is right", weight
    `q_halt_loss_weight`) trains the model's confidence probe; its input is detached, so it changes
    no trunk gradient. It yields `q_halt_accuracy` and the confidence ARC scoring ranks ties by.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_type: str = "stablemax_cross_entropy",
        lm_loss_weight: float = 1.0,
        plan_loss_weight: float = 0.3,
        decomp_loss_weight: float = 0.2,
        exec_loss_weight: float = 0.1,
        q_halt_loss_weight: float = 0.5,
    ):
        super().__init__()
        if loss_type not in LOSS_FUNCTIONS:
            raise ValueError(f"loss_type: unknown {loss_type!r}; expected one of {', '.join(LOSS_FUNCTIONS)}")
        self.model = model
        self.loss_fn = LOSS_FUNCTIONS[loss_type]
        self.weights = {
            "lm_loss": lm_loss_weight,
            "plan_loss": plan_loss_weight,
            "decomp_loss": decomp_loss_weight,
            "exec_loss": exec_loss_weight,
            "q_halt_loss": q_halt_loss_weight,
        }

    def initial_carry(self, *args, **kwargs):
        return self.model.initial_carry(*args, **kwargs)

    def metric_names(self, training: bool | None = None) -> tuple[str, ...]:
        """The keys of the metrics `forward` returns, the same in training and eval mode (models/losses.py)."""
        return HALTED_SEQUENCE_METRICS + tuple(self.weights)

    def forward(self, return_keys: Sequence[str], **model_kwargs):
        new_carry, outputs = self.model(**model_kwargs)
        labels = model_kwargs["batch"]["labels"]

        metrics, loss_divisor, seq_is_correct = halted_sequence_metrics(labels, outputs, new_carry)

        def token_loss(logits):
            return (self.loss_fn(logits, labels, ignore_index=IGNORE_LABEL_ID) / loss_divisor).sum()

        losses = {
            "lm_loss": token_loss(outputs["logits"]),
            "plan_loss": token_loss(self.model.readout(outputs["plan"])),
            "decomp_loss": token_loss(self.model.readout(outputs["decomposition"])),
            "exec_loss": token_loss(self.model.readout(outputs["execution"])),
            "q_halt_loss": F.binary_cross_entropy_with_logits(
                outputs["q_halt_logits"], seq_is_correct.to(outputs["q_halt_logits"].dtype), reduction="sum"
            ),
        }
        metrics.update({k: v.detach() for k, v in losses.items()})
        loss = sum(self.weights[k] * v for k, v in losses.items())
        detached_outputs = {k: outputs[k].detach() for k in return_keys if k in outputs}
        return new_carry, loss, metrics, detached_outputs, new_carry.halted.all()
