"""Building blocks of the HRM transformer: casted linear/embedding, RoPE, attention, SwiGLU, RMSNorm.

Design choices:
- Parameters live in float32; every layer casts its weights to the activation dtype at call time
  ("casted" layers), so the forward dtype (bfloat16 by default) is a property of the inputs, not of
  the module, and the optimizer always updates fp32 master weights.
- Attention is bidirectional by default (HRM reasons over a whole grid). The kernel is chosen once at
  import: FlashAttention 3, then FlashAttention 2, then PyTorch SDPA, exposed as `ATTENTION_BACKEND`
  and overridable with the environment variable `HRM_ATTENTION_BACKEND=fa3|fa2|sdpa`. FlashAttention only
  handles fp16/bf16 CUDA tensors, so other inputs (CPU, float32) go through SDPA whatever the backend;
  that choice depends on dtype and device only, never on tensor values, so it is compile-friendly.
- Tensors inside attention are `[batch, seq, heads, head_dim]` (FlashAttention's layout); SDPA wants
  `[batch, heads, seq, head_dim]`, so that path transposes. With `HRM_KERNELS=all`, no-grad calls on short
  sequences (S <= 128, the Sudoku shapes) on a GPU with Triton take one experimental kernel instead
  (models/short_attention.py: RoPE on load, output in o_proj's layout; measured slower inside a compiled step).
- RMSNorm has no learnable weight (as in the reference model).
- `PostNormBlock` is the one block of HRM and TRM (`x = rms_norm(x + mix(x)); x = rms_norm(x + mlp(x))`),
  each model's block class a subclass that maps its config onto it. Token mixing is attention, or (TRM's
  `mlp_t`) a SwiGLU over the positions: the state is transposed to [B, D, L] (L = seq_len + prefix rows), the
  SwiGLU of width L, the residual and the RMSNorm all act in that layout, so that norm runs over positions.
  On a GPU the no-grad calls run the same sub-layer in the [B, L, D] layout (the weights multiply from the
  left: no transposes, aligned matmul rows); calls with gradient, the CPU, and `HRM_KERNELS=portable` run
  TRM's transposed op sequence bit for bit. Where Triton is installed and L <= 128, those no-grad calls take one
  Triton kernel for the whole sub-layer instead (models/token_mix.py, measured faster). The GPU calls with gradient
  pad the positions to a multiple of 8 with zeros, so their matmuls get aligned rows (`SwiGLU.forward_padded`;
  1.2 ms of TRM's 114 ms mlp_t train step on an H200; `HRM_KERNELS_OFF=token_mix_padded` leaves it out).
- The channel SwiGLU: no-grad calls on Hopper and later GPUs take the gate/up matmul with the gating in its
  epilogue (models/fused_ops.py, measured faster; with `fused_ops` on any GPU Triton runs on); calls with
  gradient keep the PyTorch forward and take a one-kernel backward of the gating (models/swiglu_backward.py).
- `ReasoningModule` (input injection, then a stack of blocks) is shared by HRM's two levels and TRM's
  single network.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from models.common import trunc_normal_init_
from models.fused_ops import TMA_KERNELS_AVAILABLE, fused_block_supported, fused_gate_up_swiglu
from models.short_attention import short_attention, short_attention_supported
from models.swiglu_backward import swiglu, swiglu_backward_supported
from models.token_mix import token_mix, token_mix_supported
from models.triton_common import kernel_on

_BACKEND_CHOICES = ("fa3", "fa2", "sdpa")


def _select_attention_backend():
    """Return (name, flash_attn_func or None). Probed once; the env override forces one backend."""
    forced = os.environ.get("HRM_ATTENTION_BACKEND", "").strip().lower()
    if forced and forced not in _BACKEND_CHOICES:
        raise ValueError(f"HRM_ATTENTION_BACKEND={forced!r}: expected one of {', '.join(_BACKEND_CHOICES)}")
    if forced in ("", "fa3"):
        try:
            from flash_attn_interface import flash_attn_func

            return "fa3", flash_attn_func
        except ImportError as e:
            if forced:
                raise ImportError(f"HRM_ATTENTION_BACKEND=fa3 but flash_attn_interface is not importable: {e}") from e
    if forced in ("", "fa2"):
        try:
            from flash_attn import flash_attn_func

            return "fa2", flash_attn_func
        except ImportError as e:
            if forced:
                raise ImportError(f"HRM_ATTENTION_BACKEND=fa2 but flash_attn is not importable: {e}") from e
    return "sdpa", None


ATTENTION_BACKEND, _flash_attn_func = _select_attention_backend()


def _find_multiple(a: int, b: int) -> int:
    """Smallest multiple of b that is >= a."""
    return -(a // -b) * b


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q, k of layout [B, S, H, D] with cos/sin tables [S, D]; rotation in the tables' fp32."""
    orig_dtype = q.dtype
    q = q.to(cos.dtype)
    k = k.to(cos.dtype)
    cos = cos.unsqueeze(-2)  # [S, 1, D], broadcast over heads
    sin = sin.unsqueeze(-2)
    q_embed = q * cos + rotate_half(q) * sin
    k_embed = k * cos + rotate_half(k) * sin
    return q_embed.to(orig_dtype), k_embed.to(orig_dtype)


def rms_norm(hidden_states: torch.Tensor, variance_epsilon: float, dim: int = -1) -> torch.Tensor:
    """Weightless RMSNorm over `dim` (the features, by default) computed in fp32 and cast back to the input dtype."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.square().mean(dim, keepdim=True)
    return (hidden_states * torch.rsqrt(variance + variance_epsilon)).to(input_dtype)


class CastedLinear(nn.Module):
    """Linear layer with fp32 truncated-LeCun-normal weights cast to the input dtype at call time."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_init_(torch.empty((out_features, in_features)), std=in_features**-0.5))
        self.bias = nn.Parameter(torch.zeros((out_features,))) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(input.dtype) if self.bias is not None else None
        return F.linear(input, self.weight.to(input.dtype), bias=bias)


class CastedEmbedding(nn.Module):
    """Embedding table in fp32 (parameter `embedding_weight`), looked up in `cast_to`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float, cast_to: torch.dtype):
        super().__init__()
        self.cast_to = cast_to
        self.embedding_weight = nn.Parameter(
            trunc_normal_init_(torch.empty((num_embeddings, embedding_dim)), std=init_std)
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.embedding_weight.to(self.cast_to))


class RotaryEmbedding(nn.Module):
    """Precomputed fp32 cos/sin tables [max_position_embeddings, dim] (non-persistent buffers)."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float, device=None):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        positions = torch.arange(max_position_embeddings, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)  # [S, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, dim], matches rotate_half's split
        self.cos_cached = nn.Buffer(emb.cos(), persistent=False)
        self.sin_cached = nn.Buffer(emb.sin(), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_cached, self.sin_cached


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention (scale 1/√head_dim) on [B, S, H, D] tensors; returns [B, S, H, D]."""
    if _flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        out = _flash_attn_func(query, key, value, causal=causal)
        # Some FlashAttention releases return (out, softmax_lse).
        return out[0] if isinstance(out, tuple) else out
    # enable_gqa (torch >= 2.5) only when key/value heads are shared; HRM itself uses num_kv_heads == num_heads.
    gqa = {"enable_gqa": True} if query.shape[2] != key.shape[2] else {}
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),  # [B, H, S, D]
        key.transpose(1, 2),
        value.transpose(1, 2),
        is_causal=causal,
        **gqa,
    )
    return out.transpose(1, 2)  # [B, S, H, D]


class Attention(nn.Module):
    """Multi-head attention with one fused QKV projection (no biases) and optional RoPE."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_key_value_heads: int, causal: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.output_size = head_dim * num_heads
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.causal = causal
        self.qkv_proj = CastedLinear(hidden_size, (num_heads + 2 * num_key_value_heads) * head_dim, bias=False)
        self.o_proj = CastedLinear(self.output_size, hidden_size, bias=False)

    def forward(self, cos_sin, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)
        if short_attention_supported(qkv, self.head_dim, self.causal):  # no-grad short sequences: one kernel
            heads = self.num_heads, self.num_key_value_heads, self.head_dim
            return self.o_proj(short_attention(qkv, cos_sin, *heads))  # [B, S, H*D] in, [B, S, hidden] out
        qkv = qkv.view(
            batch_size, seq_len, self.num_heads + 2 * self.num_key_value_heads, self.head_dim
        )  # [B, S, H+2K, D]
        query = qkv[:, :, : self.num_heads]
        key = qkv[:, :, self.num_heads : self.num_heads + self.num_key_value_heads]
        value = qkv[:, :, self.num_heads + self.num_key_value_heads :]
        if cos_sin is not None:
            cos, sin = cos_sin
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
        attn_output = attention(query, key, value, causal=self.causal)
        attn_output = attn_output.reshape(batch_size, seq_len, self.output_size)  # [B, S, H*D]
        return self.o_proj(attn_output)


def _gated(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the gate/up projection's output [..., 2m] (gate half first)."""
    if swiglu_backward_supported(gate_up):  # calls with gradient on a GPU: the same forward, a one-kernel backward
        return swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """Gated MLP; inner width 2/3·expansion·hidden rounded up to a multiple of 256."""

    def __init__(self, hidden_size: int, expansion: float):
        super().__init__()
        inter = _find_multiple(round(expansion * hidden_size * 2 / 3), 256)
        self.gate_up_proj = CastedLinear(hidden_size, inter * 2, bias=False)
        self.down_proj = CastedLinear(inter, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_gated(self.gate_up_proj(x)))

    def forward_padded(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """`self(x[..., :width])` zero-padded back to x's width, for x [..., W] whose features past `width` are zero.

        Both weights are zero-padded along the SwiGLU's width (the gate/up weight's columns, the down weight's
        rows), so every matmul has a padded, 16-byte aligned contraction or output row where `width` (e.g. TRM's
        97 positions) would leave cuBLAS only its unaligned kernels. The padded products are exact zeros; what can
        differ from `forward` is the matmuls' accumulation order."""
        pad = x.shape[-1] - width
        gate_up = F.linear(x, F.pad(self.gate_up_proj.weight.to(x.dtype), (0, pad)))  # [..., 2m]
        return F.linear(_gated(gate_up), F.pad(self.down_proj.weight.to(x.dtype), (0, 0, 0, pad)))  # [..., W]

    def forward_over_dim1(self, x: torch.Tensor) -> torch.Tensor:
        """`self(x.transpose(1, 2)).transpose(1, 2)` for x [B, L, D] (L = the SwiGLU's width), without transposes.

        The weights multiply from the left, one batched matmul per projection, so no [B, D, L] copy is made
        and the rows the matmuls read are D wide. The gate/up weight [2m, L] is read through a view whose row
        stride is padded to a multiple of 8 elements, since an L like 97 would leave its rows 16-byte misaligned.
        """
        width = x.shape[1]
        weight = self.gate_up_proj.weight.to(x.dtype)
        weight = F.pad(weight, (0, -width % 8))[:, :width]  # [2m, L], row stride a multiple of 8
        gate, up = torch.matmul(weight, x).chunk(2, dim=1)  # [B, m, D] each
        return torch.matmul(self.down_proj.weight.to(x.dtype), F.silu(gate) * up)  # [L, m] @ [B, m, D]


_TOKEN_MIX_LAYOUT = kernel_on("token_mix_layout")
_TOKEN_MIX_PADDED = kernel_on("token_mix_padded")
# The gate/up matmul with the SwiGLU in its epilogue (models/fused_ops.py) runs by default where it was measured
# faster than cuBLAS plus torch.compile's SwiGLU kernel: its persistent TMA version, on Hopper and later.
_FUSED_SWIGLU_BY_DEFAULT = kernel_on("gate_up_swiglu") and TMA_KERNELS_AVAILABLE


def _token_mix_in_place(hidden_states: torch.Tensor) -> bool:
    """Whether the token-MLP sub-layer runs in the [B, L, D] layout: for no-grad calls on a GPU that the one-kernel
    path (models/token_mix.py) does not take (no Triton, L > 128), unless `HRM_KERNELS=portable`. Measured on an
    H200 (TRM's Sudoku recipe): 1.12x faster evaluation with it, but train steps 4% slower when the calls with
    gradient took it too (its weight gradient is reduced from a per-row [B, 2m, L] buffer), so those keep TRM's
    layout. Off with `HRM_KERNELS_OFF=token_mix_layout`. Grad mode only: compile-friendly."""
    return hidden_states.is_cuda and _TOKEN_MIX_LAYOUT and not torch.is_grad_enabled()


def _token_mix_padded(hidden_states: torch.Tensor) -> bool:
    """Whether a token-MLP call with gradient on a GPU runs TRM's layout with the positions zero-padded to a multiple
    of 8 (`SwiGLU.forward_padded`): a default (name `token_mix_padded`), for L like TRM's 97 that leave the [B·D, L]
    rows unaligned, which gives cuBLAS only its unaligned kernels. The CPU and the no-grad calls never take it.
    Compile-friendly."""
    return hidden_states.is_cuda and _TOKEN_MIX_PADDED and torch.is_grad_enabled() and hidden_states.shape[1] % 8 != 0


class PostNormBlock(nn.Module):
    """Post-norm block: token mixing, then a channel SwiGLU, each as `x = rms_norm(x + f(x))`.

    Token mixing is bidirectional self-attention (`self_attn`, heads of hidden_size / num_heads), or with
    `token_mix_width` = L a SwiGLU over the L positions (`mlp_t`, TRM's MLP variant). No-grad calls on a GPU run
    the channel SwiGLU's gate/up matmul with the SwiGLU fused in (models/fused_ops.py) on Hopper and later by
    default (`HRM_KERNELS_OFF=gate_up_swiglu` switches it off), and wherever Triton runs with `fused_ops`.
    The mixer is created before the MLP, as in the references, so one seed gives their weights.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        expansion: float,
        norm_eps: float,
        fused_ops: bool = False,
        token_mix_width: int | None = None,
    ) -> None:
        super().__init__()
        self.token_mix_width = token_mix_width
        if token_mix_width is None:
            self.self_attn = Attention(
                hidden_size=hidden_size,
                head_dim=hidden_size // num_heads,
                num_heads=num_heads,
                num_key_value_heads=num_heads,
                causal=False,
            )
        else:
            self.mlp_t = SwiGLU(hidden_size=token_mix_width, expansion=expansion)
        self.mlp = SwiGLU(hidden_size=hidden_size, expansion=expansion)
        self.norm_eps = norm_eps
        self.fused_ops = fused_ops

    def forward(self, cos_sin, hidden_states: torch.Tensor) -> torch.Tensor:
        # No-grad passes on the GPU (40 of the 48 block calls of an HRM train step, all of evaluation) may fuse
        # the SwiGLU gating into its projection's matmul.
        if (self.fused_ops or _FUSED_SWIGLU_BY_DEFAULT) and fused_block_supported(hidden_states):
            return self.forward_fused(cos_sin, hidden_states)
        hidden_states = self._mix(cos_sin, hidden_states)
        return rms_norm(hidden_states + self.mlp(hidden_states), self.norm_eps)

    def forward_fused(self, cos_sin, hidden_states: torch.Tensor) -> torch.Tensor:
        """The block with the channel SwiGLU's gate/up matmul and gating in one kernel, for no-grad calls only
        (`forward` takes it when `fused_block_supported` allows). The token mixing and the down projection's
        residual + RMSNorm run as in `forward`, where torch.compile's kernels next to cuBLAS match or beat the
        fused ones (models/fused_ops.py)."""
        hidden_states = self._mix(cos_sin, hidden_states)
        h = fused_gate_up_swiglu(hidden_states, self.mlp.gate_up_proj.weight)
        return rms_norm(hidden_states + self.mlp.down_proj(h), self.norm_eps)

    def _mix(self, cos_sin, hidden_states: torch.Tensor) -> torch.Tensor:
        """The token-mixing sub-layer with its residual and RMSNorm: attention, or the token MLP."""
        if self.token_mix_width is not None:
            return self._mix_positions(hidden_states)
        attn_out = self.self_attn(cos_sin=cos_sin, hidden_states=hidden_states)
        return rms_norm(hidden_states + attn_out, self.norm_eps)

    def _mix_positions(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The token-MLP sub-layer with its residual and its RMSNorm over the L positions of each channel."""
        if token_mix_supported(hidden_states):  # no-grad GPU calls, L <= 128: the whole sub-layer in one kernel
            weights = self.mlp_t.gate_up_proj.weight, self.mlp_t.down_proj.weight
            return token_mix(hidden_states, *weights, self.norm_eps)
        if _token_mix_in_place(hidden_states):
            # The same sub-layer in the [B, L, D] layout (no transposes; see SwiGLU.forward_over_dim1).
            mixed = self.mlp_t.forward_over_dim1(hidden_states)
            return rms_norm(hidden_states + mixed, self.norm_eps, dim=1)  # over the L positions
        return self._mix_positions_transposed(hidden_states, padded=_token_mix_padded(hidden_states))

    def _mix_positions_transposed(self, hidden_states: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """TRM's own op sequence, bit for bit; with `padded` the token SwiGLU runs on positions zero-padded to a
        multiple of 8 (`SwiGLU.forward_padded`), its output sliced back before the residual."""
        hidden_states = hidden_states.transpose(1, 2)  # [B, D, L]: mix positions, one row per channel
        if padded:
            width = hidden_states.shape[-1]
            mixed = self.mlp_t.forward_padded(F.pad(hidden_states, (0, -width % 8)), width)[..., :width]
        else:
            mixed = self.mlp_t(hidden_states)
        hidden_states = rms_norm(hidden_states + mixed, self.norm_eps)
        return hidden_states.transpose(1, 2)  # [B, L, D]


class ReasoningModule(nn.Module):
    """A stack of blocks applied to `hidden_states + input_injection` (HRM's H/L levels, TRM's one network).

    Each block is called as `block(hidden_states=..., **kwargs)`; the model files subclass this under
    their reference class names.
    """

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor, input_injection: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + input_injection
        for layer in self.layers:
            hidden_states = layer(hidden_states=hidden_states, **kwargs)
        return hidden_states
