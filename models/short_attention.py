"""Attention for short sequences (S <= 128) in one Triton kernel: RoPE on load, softmax, output in o_proj's layout.

Why: at the Sudoku shapes (82 positions for HRM, 97 for TRM; 8 heads of 64) a no-grad attention call is a
RoPE kernel plus a copy into the attention library's layout, then a flash-attention kernel whose 128-192
query tiles mostly hold padding, then a copy back. Here a work item is one (batch row, head) and a block of
its queries: q, k and v are read straight out of the fused QKV projection's output `[B, S, (H+2K)·D]`, q and k
rotated in fp32 and rounded to the activation dtype exactly where `apply_rotary_pos_emb` does, the whole
`[BLOCK_M, S]` score tile held on chip (every key fits one tile, so there is no online-softmax rescaling), and the
output written as `[B, S, H·D]`, the input layout of `o_proj`.

The launch is persistent: a fixed number of programs (`Tiles.programs_per_sm` per SM) loop over the work items,
and with `Tiles.prefetch` each program issues the loads of its next item before computing the current one. The
first version (one program per item, autotuned) moved about 1.1 TB/s of the H200's 4.8, read as load latency
left exposed; on the H200 the persistent kernel's best launch took 0.28 ms at HRM's shape without the prefetch and
0.20 with it (128:8:4:1; persistence alone gained nothing). The launch choices are plain arguments (no autotuner), so the kernel runs with
the same tiles inside a compiled step as in a micro-benchmark; `HRM_SHORT_ATTENTION_TILES` sets them for a run.

Numerics: scores accumulate in fp32 from the rounded q and k; softmax in fp32 (base-2 exponent with the
1/√D scale folded in, as flash attention does); the unnormalised probabilities are rounded to the
activation dtype for the P·V product (as flash attention does), which accumulates in fp32 and is divided by
the row sum before the one rounding of the output. Against float64 attention on the same (upcast) inputs
the error is that of bf16 operands.

Status: experimental, used only with `HRM_KERNELS=all`. On an H200 (2026-12-02) the first version took 0.226 ms
per call at HRM's Sudoku shape against 0.175 ms for Inductor's RoPE + layout kernel and cuDNN's attention, and the
HRM Sudoku step was slower with it (benchmarks/RESULTS.md, speed log). The persistent version (2026-12-04): 0.202 ms
alone with its fastest launch (128:8:4:1; the default 64:4:2:1 0.212) against 0.176 for the compiled composition,
but about 0.57 ms a call inside the compiled HRM Sudoku step (profiled), which made that step 86 ms against 74.5;
`bench_fused_ops.py` times the kernel alone under torch.compile, as either op (`short_attention_compiled`,
`short_attention_compiled_traced`), and its layer eager (`attention_layer_eager`) to find out where those 0.37 ms
go. Those 0.57 ms were taken with the traced `triton_op`; the kernels whose time inside a step matched their time
alone (the persistent gate/up kernel, the SwiGLU backward) are opaque custom ops, so the opaque op is this
kernel's default since. Also found then: over a 16-step evaluation with random
weights (tests/test_gpu.py, `all`) its answers agreed with the fp32 ones 8-9 points less often than the portable
path's at a late ACT step, while its error stayed within the test's budget.

Scope: the forward only, for calls without autograd (every evaluation call, and the no-grad block calls of a
train step); non-causal; head_dim 32, 64 or 128 (Triton's dot needs at least 16 along each half); 16-bit
activations on CUDA (fp32 too under the Triton interpreter, for tests). `short_attention_supported` says whether a
call qualifies; the decision depends on shapes, dtype, device and grad mode only, so torch.compile guards on it
without a graph break. The kernel is registered twice: as an opaque `torch.library.custom_op` (the default) and as a
`torch.library.triton_op` that torch.compile traces like Inductor's own kernels (`HRM_SHORT_ATTENTION_OP`).
"""

import contextlib
import dataclasses
import math
import os

import torch

from models.triton_common import (
    HAS_TRITON,
    INTERPRET,
    kernel_flags,
    kernel_on,
    local_gpu,
    no_grad_kernel_call,
    parse_op,
)

ENABLED = kernel_on("short_attention")  # experimental: only with HRM_KERNELS=all

MAX_SEQ_LEN = 128

if HAS_TRITON:
    import triton
    import triton.language as tl

    from models.triton_common import dot, round_to

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

    @triton.jit
    def _item_coords(item, H: tl.constexpr, KV: tl.constexpr, NUM_M, BLOCK_M: tl.constexpr):
        """Work item -> (batch row, query head, key/value head, first query). Query blocks vary fastest, then
        heads: programs running side by side read neighbouring bytes of the same token rows."""
        block = item % NUM_M
        head = (item // NUM_M) % H
        row = item // (NUM_M * H)
        return row, head, head // (H // KV), block * BLOCK_M

    @triton.jit
    def _load_item(
        qkv_ptr, item, total, S, stride_b, stride_s, NUM_M,
        H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One item's q halves [BM, HALF], k halves [BN, HALF] and v [BN, D], straight from the projection (rows past
        the sequence, and every row of an item past the last one, read as zeros)."""
        D: tl.constexpr = 2 * HALF
        row, head, kv, first = _item_coords(item, H, KV, NUM_M, BLOCK_M)
        live = item < total
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, HALF)
        mask_m = ((offs_m < S) & live)[:, None]
        mask_n = ((offs_n < S) & live)[:, None]
        base = qkv_ptr + row.to(tl.int64) * stride_b
        q_ptrs = base + offs_m[:, None] * stride_s + head * D + offs_h[None, :]  # [BM, HALF]
        k_ptrs = base + offs_n[:, None] * stride_s + (H + kv) * D + offs_h[None, :]  # [BN, HALF]
        v_ptrs = base + offs_n[:, None] * stride_s + (H + KV + kv) * D + tl.arange(0, D)[None, :]  # [BN, D]
        q1 = tl.load(q_ptrs, mask=mask_m, other=0.0)
        q2 = tl.load(q_ptrs + HALF, mask=mask_m, other=0.0)
        k1 = tl.load(k_ptrs, mask=mask_n, other=0.0)
        k2 = tl.load(k_ptrs + HALF, mask=mask_n, other=0.0)
        v = tl.load(v_ptrs, mask=mask_n, other=0.0)
        return q1, q2, k1, k2, v

    @triton.jit
    def _short_attention_kernel(
        qkv_ptr, cos_ptr, sin_ptr, out_ptr,
        S, stride_qkv_b, stride_qkv_s, stride_out_b, stride_out_s, stride_cs, qk_scale_log2, total, NUM_M,
        H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        APPLY_ROPE: tl.constexpr, PREFETCH: tl.constexpr, FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        # Persistent: a fixed number of programs, each looping over work items (batch row, head, query block). With
        # PREFETCH, the loads of a program's next item are issued before the current one is computed, so their
        # latency hides behind the softmax and the two products instead of leaving the SM waiting.
        D: tl.constexpr = 2 * HALF
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        offs_h = tl.arange(0, HALF)
        offs_n = tl.arange(0, BLOCK_N)
        if PREFETCH:
            n_q1, n_q2, n_k1, n_k2, n_v = _load_item(
                qkv_ptr, pid, total, S, stride_qkv_b, stride_qkv_s, NUM_M, H, KV, HALF, BLOCK_M, BLOCK_N
            )
        for item in tl.range(pid, total, step):
            if PREFETCH:
                q1, q2, k1, k2, v = n_q1, n_q2, n_k1, n_k2, n_v
                n_q1, n_q2, n_k1, n_k2, n_v = _load_item(
                    qkv_ptr, item + step, total, S, stride_qkv_b, stride_qkv_s, NUM_M, H, KV, HALF, BLOCK_M, BLOCK_N
                )
            else:
                q1, q2, k1, k2, v = _load_item(
                    qkv_ptr, item, total, S, stride_qkv_b, stride_qkv_s, NUM_M, H, KV, HALF, BLOCK_M, BLOCK_N
                )
            row, head, kv, first = _item_coords(item, H, KV, NUM_M, BLOCK_M)
            offs_m = first + tl.arange(0, BLOCK_M)
            mask_m = (offs_m < S)[:, None]
            if APPLY_ROPE:
                mask_n = (offs_n < S)[:, None]
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
            out_rows = out_ptr + row.to(tl.int64) * stride_out_b + offs_m[:, None] * stride_out_s
            tl.store(out_rows + head * D + tl.arange(0, D)[None, :], out, mask=mask_m)

    def _launch(
        launcher, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
        apply_rope: bool, block_m: int, num_warps: int, programs: int, prefetch: bool,
    ) -> torch.Tensor:  # fmt: skip
        """The kernel's launch, shared by both ops: `launcher` is `torch.library.wrap_triton` (traced by
        torch.compile) or the identity (a plain launch inside an op torch.compile does not look into)."""
        batch, seq_len, width = qkv.shape
        head_dim = width // (num_heads + 2 * num_kv_heads)
        out = torch.empty((batch, seq_len, num_heads * head_dim), device=qkv.device, dtype=qkv.dtype)
        num_m = triton.cdiv(seq_len, block_m)
        total = batch * num_heads * num_m
        launcher(_short_attention_kernel)[(max(1, min(total, programs)),)](
            qkv, cos, sin, out,
            seq_len, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), cos.stride(0),
            math.log2(math.e) / math.sqrt(head_dim), total, num_m,
            H=num_heads, KV=num_kv_heads, HALF=head_dim // 2, BLOCK_M=block_m, BLOCK_N=key_block(seq_len),
            APPLY_ROPE=apply_rope, PREFETCH=prefetch, **kernel_flags(qkv.dtype), num_warps=num_warps, num_stages=1,
        )  # fmt: skip
        return out

    @torch.library.triton_op("hrm::short_attention", mutates_args=())
    def _short_attention_op(
        qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
        apply_rope: bool, block_m: int, num_warps: int, programs: int, prefetch: bool,
    ) -> torch.Tensor:  # fmt: skip
        args = num_heads, num_kv_heads, apply_rope, block_m, num_warps, programs, prefetch
        return _launch(torch.library.wrap_triton, qkv, cos, sin, *args)

    @torch.library.custom_op("hrm::short_attention_opaque", mutates_args=())
    def _short_attention_opaque_op(
        qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
        apply_rope: bool, block_m: int, num_warps: int, programs: int, prefetch: bool,
    ) -> torch.Tensor:  # fmt: skip
        args = num_heads, num_kv_heads, apply_rope, block_m, num_warps, programs, prefetch
        with torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext():
            return _launch(lambda kernel: kernel, qkv, cos, sin, *args)

    @_short_attention_opaque_op.register_fake
    def _(qkv, cos, sin, num_heads, num_kv_heads, apply_rope, block_m, num_warps, programs, prefetch):
        head_dim = qkv.shape[2] // (num_heads + 2 * num_kv_heads)
        return qkv.new_empty((qkv.shape[0], qkv.shape[1], num_heads * head_dim))


def key_block(seq_len: int) -> int:
    """The key tile: every key of the sequence in one power-of-two tile of at least 16 (Triton's dot minimum)."""
    return max(16, 1 << (seq_len - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the kernel is launched: `block_m` query rows per work item (a power of two, at least 16), `num_warps`,
    `programs_per_sm` persistent programs per SM, and whether each program `prefetch`es its next item."""

    block_m: int = 64
    num_warps: int = 4
    programs_per_sm: int = 2
    prefetch: bool = True

    def spec(self) -> str:
        """These tiles as `HRM_SHORT_ATTENTION_TILES` takes them (`parse_tiles`' inverse), e.g. `64:4:2:1`."""
        return f"{self.block_m}:{self.num_warps}:{self.programs_per_sm}:{int(self.prefetch)}"

    def for_sequence(self, seq_len: int) -> "Tiles":
        """These tiles with the query block no larger than the key tile (a short sequence is one block)."""
        return dataclasses.replace(self, block_m=min(self.block_m, key_block(seq_len)))


def parse_tiles(text: str) -> Tiles:
    """`HRM_SHORT_ATTENTION_TILES=BLOCK_M:WARPS:PROGRAMS_PER_SM:PREFETCH` (e.g. `64:4:2:1`), to time launch choices
    in a whole step without editing code; empty means the defaults. Bad values raise ValueError naming them."""
    if not text.strip():
        return Tiles()
    parts = text.split(":")
    problem = "expected BLOCK_M:WARPS:PROGRAMS_PER_SM:PREFETCH, e.g. 64:4:2:1"
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"HRM_SHORT_ATTENTION_TILES={text!r}: {problem}")
    block_m, warps, per_sm, prefetch = (int(p) for p in parts)
    if block_m not in (16, 32, 64, 128) or warps not in (1, 2, 4, 8, 16) or not 1 <= per_sm <= 64 or prefetch > 1:
        raise ValueError(
            f"HRM_SHORT_ATTENTION_TILES={text!r}: BLOCK_M in 16, 32, 64, 128; WARPS a power of two up to 16; "
            "PROGRAMS_PER_SM 1 to 64; PREFETCH 0 or 1"
        )
    return Tiles(block_m, warps, per_sm, bool(prefetch))


TILES = parse_tiles(os.environ.get("HRM_SHORT_ATTENTION_TILES", ""))


# How torch.compile sees the kernel: `custom_op` (default), an opaque op whose body launches the kernel as a
# micro-benchmark does, or `triton_op`, traced, the kernel compiled and launched by Inductor's own code (where it
# took 0.57 ms a call against 0.20 alone, 2026-12-04).
OP_DEFAULT = "custom_op"
OP = parse_op(os.environ.get("HRM_SHORT_ATTENTION_OP", ""), "HRM_SHORT_ATTENTION_OP", default=OP_DEFAULT)
_NUM_SMS = (
    torch.cuda.get_device_properties(local_gpu()).multi_processor_count
    if HAS_TRITON and torch.cuda.is_available() and not INTERPRET
    else 0
)


def launch_programs(tiles: Tiles) -> int:
    """Persistent programs to launch (capped by the work items at launch): `programs_per_sm` per SM on a GPU, and
    `programs_per_sm` in all under the interpreter (no SMs there), so the tests' programs loop over several items."""
    return (_NUM_SMS or 1) * tiles.programs_per_sm


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
    tiles: Tiles | None = None,
    op: str | None = None,
) -> torch.Tensor:
    """Bidirectional attention of the fused projection `qkv` [B, S, (H+2K)·D] (queries, then keys, then values,
    each head-major), with RoPE tables `cos_sin` ([>= S, D] fp32) applied to q and k, or none; returns
    [B, S, H·D]. Same result as models/layers.py's RoPE + `attention` + reshape, within bf16 rounding.
    `tiles`: the launch choices (default `TILES`: `HRM_SHORT_ATTENTION_TILES` or `Tiles()`); the result does not
    depend on the program count or on prefetching. `op`: how torch.compile sees the kernel, "custom_op" or
    "triton_op" (default `OP`, from HRM_SHORT_ATTENTION_OP); the result does not depend on it either."""
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
    tiles = (TILES if tiles is None else tiles).for_sequence(seq_len)
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    if cos_sin is None:
        cos = sin = qkv.new_zeros((1, 1), dtype=torch.float32)  # not read
    else:
        cos, sin = (t.to(torch.float32).contiguous() for t in cos_sin)
    opaque = (OP if op is None else op) == "custom_op"
    kernel_op = torch.ops.hrm.short_attention_opaque if opaque else torch.ops.hrm.short_attention
    return kernel_op(
        qkv, cos, sin, num_heads, num_kv_heads, cos_sin is not None,
        tiles.block_m, tiles.num_warps, launch_programs(tiles), tiles.prefetch,
    )  # fmt: skip
