"""Triton kernels that fuse the HRM block's elementwise work into matmul epilogues (no-grad forward only).

Why: 40 of the 48 block applications of a train step (and every one in evaluation) run without
gradients, and there the memory-bound kernels between the matmuls (SwiGLU gating, residual add +
RMSNorm, RoPE) cost about as much as the matmuls themselves. Each op here computes a matmul with
fp32 accumulators and finishes the elementwise work in registers before the only store:

- `fused_gate_up_swiglu(x, w_gate_up)`: h = silu(x @ Wg^T) * (x @ Wu^T); a program holds the gate
  tile and the up tile of the same output columns as two accumulators, and [T, 2m] never exists.
- `fused_linear_residual_rmsnorm(a, w, residual, eps)`: y = rms_norm(residual + a @ W^T); a program
  owns whole rows (BLOCK_N covers the output width), so the norm's row reduction stays on chip.
- `fused_qkv_rope(x, w_qkv, cos, sin, num_heads, head_dim)`: the fused QKV projection with RoPE on
  queries and keys; a program's columns are "half-columns" c (head c // (D/2), offset j = c % (D/2)),
  each feeding two accumulators, for output columns head·D + j and head·D + D/2 + j, which are exactly
  the pair that rotate-half mixes, so the rotation happens in registers.

Numerics follow the unfused PyTorch path of models/layers.py rounding for rounding where it is
cheap: the matmul result is rounded to the activation dtype first (as F.linear returns it), every
elementwise op that PyTorch runs in the activation dtype is rounded back to it (silu, the product,
the residual sum), and the RMSNorm and RoPE arithmetic runs in fp32 as in `rms_norm` and
`apply_rotary_pos_emb`. What differs is the matmul accumulation order (vs cuBLAS) and last-ulp fp32
details of exp/rsqrt/FMA, so a few 16-bit outputs land one rounding step away.

Weights: the callers pass the fp32 parameters; the Python wrappers cast them to the activation dtype
(`w.to(x.dtype)`, a no-op when already cast) outside the custom op, so torch.compile sees a plain
cast it can hoist or fuse. Activations must be bf16 or fp16 on CUDA; fp32 is accepted (exact "ieee"
dot) for testing, notably under the Triton interpreter (TRITON_INTERPRET=1), which runs the same
kernels with numpy on CPU tensors (models/triton_common.py works around two interpreter defects).

Each kernel is a PyTorch custom op (`torch.library.triton_op`, namespace `hrm::`) launched through
`torch.library.wrap_triton`, so torch.compile traces it without a graph break. Tiles are autotuned
over a few Hopper-friendly configs keyed on the shape; the interpreter uses one small config so the
tests exercise row/column/K tails and multi-step K loops.

On Hopper (sm_90) and later, `fused_gate_up_swiglu` runs a second kernel for the same math: persistent
(one program per SM looping over output tiles) with TMA tensor-descriptor loads and stores. With only
K = 512 (8 k-steps) per tile, the per-tile pipeline fill and epilogue of the one-tile-per-program kernel
dominate; the persistent TMA kernel measured 0.384 ms against 0.489 ms for cuBLAS + Inductor's SwiGLU
kernel and 0.49 ms for the first kernel (H100, 62,976 tokens, benchmarks/RESULTS.md). It is a plain
`torch.library.custom_op` (opaque to Inductor), because in-kernel TMA descriptors need Triton's global
scratch allocator at launch time. The QKV-RoPE and residual-RMSNorm kernels measured slower than
Inductor's own fusion next to cuBLAS, and persistent TMA versions of them (an experiment script, in git
history: `git show b067f7f:benchmarks/exp_tma_gemm.py`) did not help a whole train step (QKV-RoPE: 0.229
vs 0.286 ms alone, no change per step) or were slower (residual-RMSNorm: 0.27 vs 0.20 ms), so
the fused block (`models.layers.PostNormBlock`'s `forward_fused`) uses only the SwiGLU kernel. The persistent TMA
SwiGLU kernel is a default kernel on Hopper and later (`HRM_KERNELS_OFF=gate_up_swiglu` switches it off): on an
H200 it took 0.40 ms against 0.46 ms for cuBLAS + Inductor at the HRM Sudoku shape (benchmarks/RESULTS.md, speed
log, 2026-12-03).
The first kernels stay here, tested and benchmarked (benchmarks/bench_fused_ops.py).

Triton is an optional accelerator (probed in models/triton_common.py): without it this module still
imports, `FUSED_OPS_AVAILABLE` is False and the model keeps its unfused path (`fused_block_supported(x)`
says which path to take). `models.layers.PostNormBlock`, the block of HRM and TRM, takes the fused path by
default where `TMA_KERNELS_AVAILABLE` holds, elsewhere when asked to (`fused_ops`), and only when
`fused_block_supported` allows it; this module builds on no model code.
"""

import torch

from models import cutlass_ops
from models.triton_common import HAS_TRITON, INTERPRET, SUPPORTED_DTYPES, kernel_flags, local_gpu

if HAS_TRITON:
    import triton
    import triton.language as tl

    from models.triton_common import autotune_configs, dot, round_to

FUSED_OPS_AVAILABLE = HAS_TRITON and torch.cuda.is_available()


def fused_block_supported(x: torch.Tensor) -> bool:
    """True when the fused no-grad kernels can run the block on `x`: Triton + CUDA, 16-bit, no autograd.

    Grad mode must be off (not merely `x.requires_grad` False): the weights require grad, and these
    ops have no backward. `torch.no_grad()` and `torch.inference_mode()` both qualify. The decision
    depends on device, dtype and grad mode only, so torch.compile guards on it without a graph break.
    """
    return FUSED_OPS_AVAILABLE and x.is_cuda and x.dtype in SUPPORTED_DTYPES and not torch.is_grad_enabled()


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES + (torch.float32,):
        raise ValueError(f"{name}: dtype {t.dtype} not supported (expected bfloat16, float16 or float32)")


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("models.fused_ops: Triton is not installed; use the unfused PyTorch path")


def _as_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """Flatten [..., d] to a row-major [T, d] matrix with unit stride along d."""
    if t.dim() < 2:
        raise ValueError(f"{name}: expected at least 2 dims [..., features], got shape {tuple(t.shape)}")
    return t.reshape(-1, t.shape[-1]).contiguous()  # [T, d]


if HAS_TRITON:

    @triton.jit
    def _matmul_tile(
        a_ptr, stride_a, w_ptr, stride_w, rows_a, rows_w, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
    ):  # fmt: skip
        """acc[i, j] = sum_k A[rows_a[i], k] · W[rows_w[j], k] in fp32 (rows must be in bounds)."""
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows_a.to(tl.int64)[:, None] * stride_a + offs_k[None, :]  # [BM, BK]
        w_ptrs = w_ptr + rows_w.to(tl.int64)[None, :] * stride_w + offs_k[:, None]  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            mask_k = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
            acc = dot(a, w, acc, FP32_DOT)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        return acc

    @triton.jit
    def _dual_matmul_tile(
        a_ptr, stride_a, w_ptr, stride_w, rows_a, rows_w1, rows_w2, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
    ):  # fmt: skip
        """Two accumulators sharing each A tile: A·W[rows_w1]^T and A·W[rows_w2]^T, fp32."""
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows_a.to(tl.int64)[:, None] * stride_a + offs_k[None, :]  # [BM, BK]
        w1_ptrs = w_ptr + rows_w1.to(tl.int64)[None, :] * stride_w + offs_k[:, None]  # [BK, BN]
        w2_ptrs = w_ptr + rows_w2.to(tl.int64)[None, :] * stride_w + offs_k[:, None]  # [BK, BN]
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            mask_k = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
            w1 = tl.load(w1_ptrs, mask=mask_k[:, None], other=0.0)
            w2 = tl.load(w2_ptrs, mask=mask_k[:, None], other=0.0)
            acc1 = dot(a, w1, acc1, FP32_DOT)
            acc2 = dot(a, w2, acc2, FP32_DOT)
            a_ptrs += BLOCK_K
            w1_ptrs += BLOCK_K
            w2_ptrs += BLOCK_K
        return acc1, acc2

    # Two [BM, BN] fp32 accumulators. Smem per stage is (BM + 2·BN)·BK·2 bytes (48 KiB at 128/128/64), so
    # 3-4 stages fit Hopper's 227 KiB. Offline sm_90a builds (ptxas -v): 128x128 with 8 warps uses 255
    # registers without spills for SwiGLU; RoPE's fp32 cos/sin tiles spill there (~0.9 KB, epilogue
    # only) but not at 64x128 or 128x64, so the autotuner chooses among both kinds.
    _GATE_UP_CONFIGS = [
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 4),
        ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 4),
        ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 8, 4),
    ]
    _QKV_CONFIGS = [
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 4),
        ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 8, 4),
    ]

    @triton.autotune(
        configs=autotune_configs(_GATE_UP_CONFIGS, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}), key=["T", "N", "K"]
    )
    @triton.jit
    def _gate_up_swiglu_kernel(
        x_ptr, w_ptr, h_ptr, T, N, K, stride_x, stride_w, stride_h,
        FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Column blocks vary fastest: consecutive programs share one x row block (read from HBM once,
        # then from L2) while the whole weight, 2m·d·2 bytes, stays L2-resident.
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        # Tail rows/columns load a valid (wrapped) row instead of masking, keeping the K loop mask-free
        # in M and N; their results are dropped by the store mask.
        gate, up = _dual_matmul_tile(
            x_ptr, stride_x, w_ptr, stride_w, offs_m % T, offs_n % N, offs_n % N + N, K,
            BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT,
        )  # fmt: skip
        out_ty = h_ptr.dtype.element_ty
        # Same roundings as F.linear -> chunk -> F.silu(gate) * up in the activation dtype.
        gate = round_to(gate, out_ty, INTERPRET)
        up = round_to(up, out_ty, INTERPRET)
        act = round_to(gate * tl.sigmoid(gate), out_ty, INTERPRET)
        h = round_to(act * up, out_ty, INTERPRET).to(out_ty)  # exact: already representable
        mask = (offs_m < T)[:, None] & (offs_n < N)[None, :]
        tl.store(h_ptr + offs_m.to(tl.int64)[:, None] * stride_h + offs_n[None, :], h, mask=mask)

    @torch.library.triton_op("hrm::gate_up_swiglu", mutates_args=())
    def _gate_up_swiglu_op(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
        T, K = x.shape
        N = w_gate_up.shape[0] // 2
        h = torch.empty((T, N), device=x.device, dtype=x.dtype)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        torch.library.wrap_triton(_gate_up_swiglu_kernel)[grid](
            x, w_gate_up, h, T, N, K, x.stride(0), w_gate_up.stride(0), h.stride(0),
            **kernel_flags(x.dtype),
        )  # fmt: skip
        return h

    # Persistent TMA variant (Hopper+). Measured on an H100 at T = 62,976, N = 1536, K = 512: 128x128x64
    # dual tiles, 8 warps, 3 stages, no loop flattening 0.384 ms; flattening the tile and k loops 0.41 ms;
    # 64-wide tiles or 4 warps 0.6-1.5 ms. The autotuner picks among the best few per shape.
    _GATE_UP_TMA_CONFIGS = [
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 4),
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 16}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, 8, 2),
    ]

    @triton.autotune(
        configs=[triton.Config(meta, num_warps=w, num_stages=st) for meta, w, st in _GATE_UP_TMA_CONFIGS],
        key=["T", "N", "K"],
    )
    @triton.jit
    def _gate_up_swiglu_tma_kernel(
        x_ptr, w_ptr, h_ptr, T, N, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        # TMA boxes: out-of-range rows and columns load as zeros and are not stored.
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[2 * N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[T, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
        num_m = tl.cdiv(T, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
            # Grouped order: GROUP_M row blocks sweep every column block together, so their x rows
            # stay in L2 (the 3 MiB weight always does).
            group = GROUP_M * num_n
            first_m = (tile // group) * GROUP_M
            size_m = tl.minimum(num_m - first_m, GROUP_M)
            om = (first_m + (tile % group) % size_m) * BLOCK_M
            on = ((tile % group) // size_m) * BLOCK_N
            gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                a = x_desc.load([om, k * BLOCK_K])
                # The gate rows of these output columns and, N rows further, their up rows.
                gate = tl.dot(a, w_desc.load([on, k * BLOCK_K]).T, gate)
                up = tl.dot(a, w_desc.load([N + on, k * BLOCK_K]).T, up)
            out_ty = h_ptr.dtype.element_ty
            # Same roundings as the first kernel (F.linear, then silu and the product in out_ty).
            gate = gate.to(out_ty).to(tl.float32)
            up = up.to(out_ty).to(tl.float32)
            act = (gate * tl.sigmoid(gate)).to(out_ty).to(tl.float32)
            h_desc.store([om, on], (act * up).to(out_ty))

    # One [BM, BLOCK_N = full row] accumulator: at d = 512, BM = 64 with 8 warps (two warpgroups splitting
    # the row) builds to 199-234 registers without spills; BM = 128 cannot fit, BM = 32 loses wgmma.
    # Smem per stage is (BM + BLOCK_N)·BK·2 bytes (37 KiB at BK 32, 74 KiB at BK 64).
    _NORM_CONFIGS = [
        ({"BLOCK_M": 64, "BLOCK_K": 32}, 8, 4),
        ({"BLOCK_M": 64, "BLOCK_K": 32}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_K": 64}, 8, 2),
    ]

    @triton.autotune(configs=autotune_configs(_NORM_CONFIGS, {"BLOCK_M": 16, "BLOCK_K": 32}), key=["T", "N", "K"])
    @triton.jit
    def _linear_residual_rmsnorm_kernel(
        a_ptr, w_ptr, r_ptr, y_ptr, T, N, K, stride_a, stride_w, stride_r, stride_y, eps,
        FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)  # the whole output row (BLOCK_N = next power of two >= N)
        acc = _matmul_tile(
            a_ptr, stride_a, w_ptr, stride_w, offs_m % T, offs_n % N, K, BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT
        )
        out_ty = y_ptr.dtype.element_ty
        mask_n = offs_n < N
        mask = (offs_m < T)[:, None] & mask_n[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        residual = tl.load(r_ptr + rows * stride_r + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        # residual + F.linear(...) in the activation dtype, then rms_norm's fp32 arithmetic.
        s = round_to(residual + round_to(acc, out_ty, INTERPRET), out_ty, INTERPRET)
        s = tl.where(mask_n[None, :], s, 0.0)
        variance = tl.sum(s * s, axis=1) / N
        y = s * tl.rsqrt(variance + eps)[:, None]
        y = round_to(y, out_ty, INTERPRET).to(out_ty)  # exact: already representable
        tl.store(y_ptr + rows * stride_y + offs_n[None, :], y, mask=mask)

    @torch.library.triton_op("hrm::linear_residual_rmsnorm", mutates_args=())
    def _linear_residual_rmsnorm_op(
        a: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, eps: float
    ) -> torch.Tensor:
        T, K = a.shape
        N = w.shape[0]
        y = torch.empty((T, N), device=a.device, dtype=a.dtype)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]),)
        torch.library.wrap_triton(_linear_residual_rmsnorm_kernel)[grid](
            a, w, residual, y, T, N, K, a.stride(0), w.stride(0), residual.stride(0), y.stride(0), eps,
            **kernel_flags(a.dtype), BLOCK_N=triton.next_power_of_2(N),
        )  # fmt: skip
        return y

    @triton.autotune(
        configs=autotune_configs(_QKV_CONFIGS, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}), key=["T", "NC", "K"]
    )
    @triton.jit
    def _qkv_rope_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, NC, K, S, ROPE_NC,
        stride_x, stride_w, stride_cos, stride_sin, stride_out,
        HALF_D: tl.constexpr, APPLY_ROPE: tl.constexpr, FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Program columns are half-columns c in [0, NC = heads·D/2): head c // (D/2), offset j = c % (D/2).
        pid = tl.program_id(0)
        num_n = tl.cdiv(NC, BLOCK_N)
        offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        # First-half column of each half-column's head (its partner is col1 + D/2). Written with constexpr
        # div/mod only, so Triton sees runs of D/2 contiguous columns and vectorises the table loads and
        # the stores; the weight rows wrap the tail instead (any valid row; those results are dropped).
        j = offs_c % HALF_D
        col1 = (offs_c // HALF_D) * (2 * HALF_D) + j
        col1_w = col1 % (2 * NC)
        acc1, acc2 = _dual_matmul_tile(
            x_ptr, stride_x, w_ptr, stride_w, offs_m % T, col1_w, col1_w + HALF_D, K,
            BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT,
        )  # fmt: skip
        out_ty = out_ptr.dtype.element_ty
        mask_m = offs_m < T
        mask = mask_m[:, None] & (offs_c < NC)[None, :]
        x1 = round_to(acc1, out_ty, INTERPRET)  # the qkv projection as F.linear returns it, held in fp32
        x2 = round_to(acc2, out_ty, INTERPRET)
        if APPLY_ROPE:
            # Queries and keys (half-columns < ROPE_NC) rotate; values pass through. Rows are tokens of
            # [B, S] flattened, so the position is the row index mod S.
            rope = mask_m[:, None] & (offs_c < ROPE_NC)[None, :]
            pos = (offs_m % S).to(tl.int64)[:, None]
            cos1 = tl.load(cos_ptr + pos * stride_cos + j[None, :], mask=rope, other=1.0)
            sin1 = tl.load(sin_ptr + pos * stride_sin + j[None, :], mask=rope, other=0.0)
            cos2 = tl.load(cos_ptr + pos * stride_cos + (j + HALF_D)[None, :], mask=rope, other=1.0)
            sin2 = tl.load(sin_ptr + pos * stride_sin + (j + HALF_D)[None, :], mask=rope, other=0.0)
            # x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), in fp32.
            r1 = round_to(x1 * cos1 - x2 * sin1, out_ty, INTERPRET)
            r2 = round_to(x2 * cos2 + x1 * sin2, out_ty, INTERPRET)
            x1 = tl.where(rope, r1, x1)
            x2 = tl.where(rope, r2, x2)
        out_rows = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out
        # Values are already representable in out_ty, so these casts are exact.
        tl.store(out_rows + col1[None, :], x1.to(out_ty), mask=mask)
        tl.store(out_rows + (col1 + HALF_D)[None, :], x2.to(out_ty), mask=mask)

    @torch.library.triton_op("hrm::qkv_rope", mutates_args=())
    def _qkv_rope_op(
        x: torch.Tensor,
        w_qkv: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        seq_len: int,
        num_rope_heads: int,
        head_dim: int,
    ) -> torch.Tensor:
        T, K = x.shape
        width = w_qkv.shape[0]
        out = torch.empty((T, width), device=x.device, dtype=x.dtype)
        apply_rope = cos is not None
        # Without RoPE the table pointers are never read; pass x so the kernel gets valid pointers.
        cos_t = cos if cos is not None else x
        sin_t = sin if sin is not None else x
        half_d = head_dim // 2
        NC = width // 2
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(NC, meta["BLOCK_N"]),)
        torch.library.wrap_triton(_qkv_rope_kernel)[grid](
            x, w_qkv, cos_t, sin_t, out, T, NC, K, seq_len, num_rope_heads * half_d,
            x.stride(0), w_qkv.stride(0), cos_t.stride(0), sin_t.stride(0), out.stride(0),
            HALF_D=half_d, APPLY_ROPE=apply_rope, **kernel_flags(x.dtype),
        )  # fmt: skip
        return out


def _hopper_tma_supported() -> bool:
    if not FUSED_OPS_AVAILABLE or INTERPRET or not hasattr(tl, "make_tensor_descriptor"):
        return False
    # Hopper and datacenter Blackwell: the tiles need ~150 KiB of shared memory per program.
    return torch.cuda.get_device_capability(local_gpu())[0] in (9, 10)


TMA_KERNELS_AVAILABLE = _hopper_tma_supported()

if TMA_KERNELS_AVAILABLE:

    def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        """Global memory Triton asks for at launch, for the tensor descriptors a kernel builds."""
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(_tma_scratch)
    _NUM_SMS = torch.cuda.get_device_properties(local_gpu()).multi_processor_count

    @torch.library.custom_op("hrm::gate_up_swiglu_tma", mutates_args=())
    def _gate_up_swiglu_tma_op(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
        # TMA needs 16-byte aligned bases (row strides are, for d % 8 == 0): a view at an odd offset is copied.
        x, w_gate_up = (t if t.data_ptr() % 16 == 0 else t.clone() for t in (x, w_gate_up))
        T, K = x.shape
        N = w_gate_up.shape[0] // 2
        h = torch.empty((T, N), device=x.device, dtype=x.dtype)
        grid = lambda meta: (min(_NUM_SMS, triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
        with torch.cuda.device(x.device):
            _gate_up_swiglu_tma_kernel[grid](x, w_gate_up, h, T, N, K)
        return h

    @_gate_up_swiglu_tma_op.register_fake
    def _(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], w_gate_up.shape[0] // 2))


def fused_gate_up_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """silu(x @ Wg^T) * (x @ Wu^T) for x [..., d], w_gate_up [2m, d] (gate rows first); returns [..., m].

    `w_gate_up` may be the fp32 parameter: it is cast to x's dtype here. On Hopper the persistent TMA
    kernel runs (16-bit inputs, d and m multiples of 8), elsewhere the first kernel; the experimental CUTLASS
    kernel (models/cutlass_ops.py) instead where a launcher's start has built it.
    """
    _require_triton()
    _check_dtype("fused_gate_up_swiglu: x", x)
    if w_gate_up.dim() != 2 or w_gate_up.shape[1] != x.shape[-1] or w_gate_up.shape[0] % 2 != 0:
        raise ValueError(
            f"fused_gate_up_swiglu: w_gate_up shape {tuple(w_gate_up.shape)} does not match [2m, d] "
            f"for x of shape {tuple(x.shape)}"
        )
    rows = _as_rows("fused_gate_up_swiglu: x", x)
    if cutlass_ops.ready() and cutlass_ops.supported(rows, w_gate_up):  # HRM_KERNELS=all, built at start
        h = cutlass_ops.gate_up_swiglu_cutlass(rows, w_gate_up)
        return h.view(*x.shape[:-1], h.shape[-1])
    weight = w_gate_up.to(x.dtype).contiguous()
    use_tma = (
        TMA_KERNELS_AVAILABLE
        and rows.is_cuda
        and rows.dtype in SUPPORTED_DTYPES
        and rows.shape[1] % 8 == 0  # 16-byte row strides for TMA (contiguous 16-bit rows)
        and (weight.shape[0] // 2) % 8 == 0
    )
    h = torch.ops.hrm.gate_up_swiglu_tma(rows, weight) if use_tma else torch.ops.hrm.gate_up_swiglu(rows, weight)
    return h.view(*x.shape[:-1], h.shape[-1])  # [..., m]


def fused_linear_residual_rmsnorm(a: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(residual + a @ W^T, eps) for a [..., k], w [n, k], residual [..., n]; returns [..., n].

    `w` may be the fp32 parameter: it is cast to a's dtype here. One program holds whole output rows,
    so n is bounded by registers (n = 512 in HRM; tested for powers of two 32 .. 512).
    """
    _require_triton()
    _check_dtype("fused_linear_residual_rmsnorm: a", a)
    if w.dim() != 2 or w.shape[1] != a.shape[-1]:
        raise ValueError(
            f"fused_linear_residual_rmsnorm: w shape {tuple(w.shape)} does not match [n, k] for a of shape "
            f"{tuple(a.shape)}"
        )
    if residual.shape != a.shape[:-1] + (w.shape[0],) or residual.dtype != a.dtype:
        raise ValueError(
            f"fused_linear_residual_rmsnorm: residual {tuple(residual.shape)} {residual.dtype} must be "
            f"{tuple(a.shape[:-1] + (w.shape[0],))} {a.dtype}"
        )
    y = torch.ops.hrm.linear_residual_rmsnorm(
        _as_rows("fused_linear_residual_rmsnorm: a", a),
        w.to(a.dtype).contiguous(),
        _as_rows("fused_linear_residual_rmsnorm: residual", residual),
        float(eps),
    )
    return y.view(residual.shape)


def fused_qkv_rope(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
    num_key_value_heads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QKV projection with RoPE on queries and keys; x [B, S, d], w_qkv [(H + 2K)·D, d], cos/sin [S, D] fp32.

    Returns (q, k, v) of layout [B, S, heads, D] (FlashAttention's layout). They are strided views
    into one [B, S, H + 2K, D] buffer, exactly like the slices of `qkv.view(...)` in
    `models.layers.Attention` (unit stride along D, so FlashAttention and SDPA's `.transpose(1, 2)`
    take them without a copy). cos = sin = None skips RoPE (learned position encodings).
    `w_qkv` may be the fp32 parameter: it is cast to x's dtype here.
    """
    _require_triton()
    _check_dtype("fused_qkv_rope: x", x)
    kv_heads = num_heads if num_key_value_heads is None else num_key_value_heads
    if x.dim() != 3:
        raise ValueError(f"fused_qkv_rope: x must be [B, S, d], got shape {tuple(x.shape)}")
    batch_size, seq_len, hidden = x.shape
    total_heads = num_heads + 2 * kv_heads
    if head_dim % 2 != 0:
        raise ValueError(f"fused_qkv_rope: head_dim must be even for rotate-half RoPE, got {head_dim}")
    if w_qkv.dim() != 2 or tuple(w_qkv.shape) != (total_heads * head_dim, hidden):
        raise ValueError(
            f"fused_qkv_rope: w_qkv shape {tuple(w_qkv.shape)}, expected {(total_heads * head_dim, hidden)} "
            f"for {num_heads} query heads, {kv_heads} kv heads, head_dim {head_dim}, hidden {hidden}"
        )
    if (cos is None) != (sin is None):
        raise ValueError("fused_qkv_rope: pass both cos and sin, or neither")
    if cos is not None:
        for name, table in (("cos", cos), ("sin", sin)):
            if tuple(table.shape) != (seq_len, head_dim) or table.dtype != torch.float32:
                raise ValueError(
                    f"fused_qkv_rope: {name} table {tuple(table.shape)} {table.dtype}, expected "
                    f"{(seq_len, head_dim)} torch.float32"
                )
        cos, sin = cos.contiguous(), sin.contiguous()
    qkv = torch.ops.hrm.qkv_rope(
        _as_rows("fused_qkv_rope: x", x),
        w_qkv.to(x.dtype).contiguous(),
        cos,
        sin,
        seq_len,
        num_heads + kv_heads,
        head_dim,
    )
    qkv = qkv.view(batch_size, seq_len, total_heads, head_dim)  # [B, S, H+2K, D]
    return qkv[:, :, :num_heads], qkv[:, :, num_heads : num_heads + kv_heads], qkv[:, :, num_heads + kv_heads :]
