"""Attention for short sequences (S <= 128) in one Triton kernel: RoPE on load, softmax, output in o_proj's layout.

Why: at the Sudoku shapes (82 positions for HRM, 97 for TRM; 8 heads of 64) a no-grad attention call is a
RoPE kernel plus a copy into the attention library's layout, then a flash-attention kernel whose 128-192
query tiles mostly hold padding, then a copy back. Here one program takes one (batch row, head) and a
block of its queries, reads q, k and v straight out of the fused QKV projection's output `[B, S, (H+2K)·D]`,
rotates q and k in fp32 and rounds them to the activation dtype exactly where `apply_rotary_pos_emb` does,
holds the whole `[BLOCK_M, S]` score tile on chip (every key fits one tile, so there is no online-softmax
rescaling), and writes `[B, S, H·D]`, the input layout of `o_proj`.

Numerics: scores accumulate in fp32 from the rounded q and k; softmax in fp32 (base-2 exponent with the
1/√D scale folded in, as flash attention does); the unnormalised probabilities are rounded to the
activation dtype for the P·V product (as flash attention does), which accumulates in fp32 and is divided by
the row sum before the one rounding of the output. Against float64 attention on the same (upcast) inputs
the error is that of bf16 operands.

Status: experimental, used only with `HRM_KERNELS=all`. On an H200 (2026-12-02) it took 0.226 ms per call at
HRM's Sudoku shape against 0.175 ms for Inductor's RoPE + layout kernel and cuDNN's attention (about 1.1 TB/s of
its 4.3 TB/s), and the HRM Sudoku step was slower with it (benchmarks/RESULTS.md, speed log).

Scope: the forward only, for calls without autograd (every evaluation call, and the no-grad block calls of a
train step); non-causal; head_dim 32, 64 or 128 (Triton's dot needs at least 16 along each half); 16-bit activations on CUDA (fp32 too
under the Triton interpreter, for tests). `short_attention_supported` says whether a call qualifies; the
decision depends on shapes, dtype, device and grad mode only, so torch.compile guards on it without a graph
break. The kernel is a `torch.library.triton_op`, traced by torch.compile like Inductor's own kernels.
"""

import math

import torch

from models.triton_common import HAS_TRITON, kernel_flags, kernel_on, no_grad_kernel_call

ENABLED = kernel_on("short_attention")  # experimental: only with HRM_KERNELS=all

MAX_SEQ_LEN = 128

if HAS_TRITON:
    import triton
    import triton.language as tl

    from models.triton_common import autotune_configs, dot, round_to

    @triton.jit
    def _rope_halves(
        x1, x2, cos_ptr, sin_ptr, rows, mask, stride_cs, offs_h, HALF: tl.constexpr, INTERPRET: tl.constexpr
    ):
        """q·cos + rotate_half(q)·sin on the two halves of the head dimension, in fp32, rounded to x's dtype."""
        table = rows[:, None] * stride_cs + offs_h[None, :]
        cos1 = tl.load(cos_ptr + table, mask=mask, other=0.0)
        cos2 = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0)
        sin1 = tl.load(sin_ptr + table, mask=mask, other=0.0)
        sin2 = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        out_ty = x1.dtype
        y1 = round_to(a * cos1 - b * sin1, out_ty, INTERPRET).to(out_ty)  # rotate_half puts -x2 first
        y2 = round_to(b * cos2 + a * sin2, out_ty, INTERPRET).to(out_ty)
        return y1, y2

    _CONFIGS = [
        ({"BLOCK_M": 64}, 4, 1),
        ({"BLOCK_M": 64}, 8, 1),
        ({"BLOCK_M": 128}, 4, 1),
        ({"BLOCK_M": 128}, 8, 1),
    ]

    @triton.autotune(configs=autotune_configs(_CONFIGS, {"BLOCK_M": 16}), key=["S", "BLOCK_N", "HALF", "H"])
    @triton.jit
    def _short_attention_kernel(
        qkv_ptr, cos_ptr, sin_ptr, out_ptr,
        S, stride_qkv_b, stride_qkv_s, stride_out_b, stride_out_s, stride_cs, qk_scale_log2,
        H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, APPLY_ROPE: tl.constexpr,
        FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        D: tl.constexpr = 2 * HALF
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        kv = h // (H // KV)  # grouped heads share a key/value head
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, HALF)
        offs_d = tl.arange(0, D)
        mask_m = (offs_m < S)[:, None]
        mask_n = (offs_n < S)[:, None]

        base = qkv_ptr + b.to(tl.int64) * stride_qkv_b
        q_ptrs = base + offs_m[:, None] * stride_qkv_s + h * D + offs_h[None, :]  # [BM, HALF]
        k_ptrs = base + offs_n[:, None] * stride_qkv_s + (H + kv) * D + offs_h[None, :]  # [BN, HALF]
        v_ptrs = base + offs_n[:, None] * stride_qkv_s + (H + KV + kv) * D + offs_d[None, :]  # [BN, D]
        q1 = tl.load(q_ptrs, mask=mask_m, other=0.0)
        q2 = tl.load(q_ptrs + HALF, mask=mask_m, other=0.0)
        k1 = tl.load(k_ptrs, mask=mask_n, other=0.0)
        k2 = tl.load(k_ptrs + HALF, mask=mask_n, other=0.0)
        v = tl.load(v_ptrs, mask=mask_n, other=0.0)
        if APPLY_ROPE:
            q1, q2 = _rope_halves(q1, q2, cos_ptr, sin_ptr, offs_m, mask_m, stride_cs, offs_h, HALF, INTERPRET)
            k1, k2 = _rope_halves(k1, k2, cos_ptr, sin_ptr, offs_n, mask_n, stride_cs, offs_h, HALF, INTERPRET)

        # Scores [BM, BN] over the two halves of the head dimension; padded keys get -inf.
        scores = dot(q1, tl.trans(k1), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_DOT)
        scores = dot(q2, tl.trans(k2), scores, FP32_DOT)
        scores = tl.where((offs_n < S)[None, :], scores, float("-inf"))
        row_max = tl.max(scores, axis=1)
        p = tl.exp2((scores - row_max[:, None]) * qk_scale_log2)
        row_sum = tl.sum(p, axis=1)
        p16 = round_to(p, v.dtype, INTERPRET).to(v.dtype)
        acc = dot(p16, v, tl.zeros((BLOCK_M, D), dtype=tl.float32), FP32_DOT)
        out_ty = out_ptr.dtype.element_ty
        out = round_to(acc / row_sum[:, None], out_ty, INTERPRET).to(out_ty)
        out_ptrs = out_ptr + b.to(tl.int64) * stride_out_b + offs_m[:, None] * stride_out_s + h * D + offs_d[None, :]
        tl.store(out_ptrs, out, mask=mask_m)

    @torch.library.triton_op("hrm::short_attention", mutates_args=())
    def _short_attention_op(
        qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int, apply_rope: bool
    ) -> torch.Tensor:
        batch, seq_len, width = qkv.shape
        head_dim = width // (num_heads + 2 * num_kv_heads)
        out = torch.empty((batch, seq_len, num_heads * head_dim), device=qkv.device, dtype=qkv.dtype)
        grid = lambda meta: (batch * num_heads, triton.cdiv(seq_len, meta["BLOCK_M"]))
        torch.library.wrap_triton(_short_attention_kernel)[grid](
            qkv, cos, sin, out,
            seq_len, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), cos.stride(0),
            math.log2(math.e) / math.sqrt(head_dim),
            H=num_heads, KV=num_kv_heads, HALF=head_dim // 2, BLOCK_N=max(16, triton.next_power_of_2(seq_len)),
            APPLY_ROPE=apply_rope, **kernel_flags(qkv.dtype),
        )  # fmt: skip
        return out


def short_attention_supported(qkv: torch.Tensor, head_dim: int, causal: bool) -> bool:
    """Whether `short_attention` can run this call: Triton, CUDA (or the interpreter), 16-bit, no autograd,
    S <= MAX_SEQ_LEN, non-causal, head_dim 32, 64 or 128, and the experimental kernels switched on
    (`HRM_KERNELS=all`). Shapes, dtype, device and grad mode only: compile-friendly."""
    return (
        ENABLED
        and no_grad_kernel_call(qkv)
        and not causal
        and qkv.shape[1] <= MAX_SEQ_LEN
        and head_dim in (32, 64, 128)
    )


def short_attention(
    qkv: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Bidirectional attention of the fused projection `qkv` [B, S, (H+2K)·D] (queries, then keys, then values,
    each head-major), with RoPE tables `cos_sin` ([>= S, D] fp32) applied to q and k, or none; returns
    [B, S, H·D]. Same result as models/layers.py's RoPE + `attention` + reshape, within bf16 rounding."""
    if not HAS_TRITON:
        raise RuntimeError("models.short_attention: Triton is not installed; use models.layers.attention")
    batch, seq_len, width = qkv.shape
    if width != (num_heads + 2 * num_kv_heads) * head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"short_attention: qkv width {width} does not match {num_heads} query and {num_kv_heads} key/value "
            f"heads of {head_dim}"
        )
    if head_dim not in (32, 64, 128):
        raise ValueError(f"short_attention: head_dim {head_dim} not supported (32, 64 or 128)")
    if seq_len > MAX_SEQ_LEN:
        raise ValueError(f"short_attention: sequence length {seq_len} > {MAX_SEQ_LEN}")
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    if cos_sin is None:
        cos = sin = qkv.new_zeros((1, 1), dtype=torch.float32)  # not read
    else:
        cos, sin = (t.to(torch.float32).contiguous() for t in cos_sin)
    return torch.ops.hrm.short_attention(qkv, cos, sin, num_heads, num_kv_heads, cos_sin is not None)
