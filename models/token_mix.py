"""TRM's token-MLP sub-layer (`mlp_t`) in one Triton kernel: gate/up, SwiGLU, down, residual, RMSNorm over positions.

Why: with `mlp_t` a block mixes the L positions of each channel with a SwiGLU of width L (L = 81 cells + 16
puzzle rows = 97 for TRM's Sudoku recipe; inner width m = 512), then adds the residual and normalises over the
positions. As separate ops that is two GEMMs whose contraction is the short position axis, plus a
[B, 2m, D] intermediate (805 MB at TRM's Sudoku shape) written and read between them. Here one program takes one
batch row and a tile of BLOCK_D channels: it loads x[b, :, cols] once as an [L_PAD, BLOCK_D] tile (rows past L
are zero), walks the inner width in BLOCK_M chunks (gate and up tiles from the same x tile, SwiGLU in registers,
accumulated into the [L_PAD, BLOCK_D] down-projection tile), and finishes with the residual and the RMSNorm over
the L rows, which the tile holds whole. Only x is read and only the output is written.

Numerics: the roundings of models/layers.py's eager path in the activation dtype: the projections rounded as
F.linear returns them, silu and the product rounded, the down projection rounded, the residual sum rounded,
then the RMSNorm in fp32 rounded once. What differs is the matmul accumulation order and last-ulp fp32
details of exp and rsqrt.

Weights: the wrapper casts the fp32 parameters to the activation dtype and zero-pads the position axis to
L_PAD (a multiple of 16, so every dot is at least 16 deep and the rows are aligned); torch.compile sees a plain
cast and pad it fuses into one small kernel.

Status: the second kernel below is the default (`HRM_KERNELS=auto`). On an H200 at TRM's Sudoku shape the first
takes 0.76 ms against 0.92 ms for torch.compile's version of the sub-layer, the second 0.61 ms; with the second,
TRM's mlp_t recipe trains 1.27x and evaluates 1.54x as fast as TRM's own code, against 1.21x and 1.36x with the
first (benchmarks/RESULTS.md, speed log, 2026-12-04). `HRM_KERNELS_OFF=token_mix_transposed` goes back to the first,
`HRM_KERNELS=portable` switches both off.

A second kernel computes the same sub-layer with channels as the tile rows (kernel name `token_mix_transposed`):
gate^T = x^T·W_g^T is a [BLOCK_D, BLOCK_M] tile, so the SwiGLU output is the left operand of the down projection,
which Hopper's tensor cores take from registers, where the first kernel's h is the right operand and goes through
shared memory in every inner-width chunk. The gate and up rows are interleaved by the wrapper (row 2i gate i,
2i + 1 up i), so one dot of twice the width gives both and each pair lands in neighbouring accumulator columns of one
thread, split apart in registers: two tensor-core waits a chunk instead of three. This is the shape of a flash-attention forward loop (x^T in the role of the queries, weight
chunks in that of keys and values), which Triton compiles well; the result is transposed back once per program
for the residual and the norm. Compiled for sm_90 (benchmarks/kernel_resources.py) its loads are pipelined, no
config but the largest spills, and the down projection's left operand is a register tensor.

Scope: the forward only, for calls without autograd (every evaluation call, the no-grad cycles of a train
step); L <= MAX_POSITIONS; 16-bit activations on CUDA (fp32 too under the Triton interpreter, for tests).
`token_mix_supported` says whether a call qualifies; it depends on shapes, dtype, device and grad mode only,
so torch.compile guards on it without a graph break. The kernel is a `torch.library.triton_op`, traced by
torch.compile like Inductor's own kernels, and also an opaque `torch.library.custom_op` (`HRM_TOKEN_MIX_OP`) to time
against it: inside the 2026-12-04 trm_mlp step it took 0.677 ms a call against 0.607 alone.
"""

import contextlib
import os

import torch
import torch.nn.functional as F

from models.triton_common import HAS_TRITON, kernel_flags, kernel_on, no_grad_kernel_call, parse_op

MAX_POSITIONS = 128
ENABLED = kernel_on("token_mix")  # off with HRM_KERNELS=portable or HRM_KERNELS_OFF=token_mix
TRANSPOSED = kernel_on("token_mix_transposed")  # default; HRM_KERNELS_OFF=token_mix_transposed: the first kernel
# How torch.compile sees the kernel: traced (`triton_op`, the default, as measured) or opaque (`custom_op`), for
# timing one against the other (`HRM_TOKEN_MIX_OP`; models/triton_common.py, `parse_op`).
OP_DEFAULT = "triton_op"
OP = parse_op(os.environ.get("HRM_TOKEN_MIX_OP", ""), "HRM_TOKEN_MIX_OP", default=OP_DEFAULT)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from models.triton_common import autotune_configs, dot, round_to

    _CONFIGS = [
        ({"BLOCK_D": 64, "BLOCK_M": 64}, 4, 2),
        ({"BLOCK_D": 64, "BLOCK_M": 64}, 8, 2),
        ({"BLOCK_D": 128, "BLOCK_M": 64}, 8, 2),
        ({"BLOCK_D": 128, "BLOCK_M": 32}, 8, 3),
        ({"BLOCK_D": 64, "BLOCK_M": 32}, 4, 3),
    ]

    @triton.autotune(configs=autotune_configs(_CONFIGS, {"BLOCK_D": 16, "BLOCK_M": 16}), key=["L_PAD", "D", "M"])
    @triton.jit
    def _token_mix_kernel(
        x_ptr, wgu_ptr, wd_ptr, out_ptr,
        L, D, M, stride_xb, stride_xl, stride_ob, stride_ol, eps,
        L_PAD: tl.constexpr, FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1).to(tl.int64)
        offs_l = tl.arange(0, L_PAD)
        offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_m = tl.arange(0, BLOCK_M)
        mask = (offs_l < L)[:, None] & (offs_d < D)[None, :]
        x = tl.load(x_ptr + b * stride_xb + offs_l[:, None] * stride_xl + offs_d[None, :], mask=mask, other=0.0)
        out_ty = out_ptr.dtype.element_ty

        acc = tl.zeros((L_PAD, BLOCK_D), dtype=tl.float32)  # the down projection's [L_PAD, BLOCK_D] tile
        for start in range(0, M, BLOCK_M):
            rows = start + offs_m  # inner-width rows of this chunk
            in_width = rows < M
            w_gate = tl.load(wgu_ptr + rows[:, None] * L_PAD + offs_l[None, :], mask=in_width[:, None], other=0.0)
            w_up = tl.load(wgu_ptr + (M + rows)[:, None] * L_PAD + offs_l[None, :], mask=in_width[:, None], other=0.0)
            gate = dot(w_gate, x, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), FP32_DOT)
            up = dot(w_up, x, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), FP32_DOT)
            # Same roundings as F.linear -> chunk -> F.silu(gate) * up in the activation dtype.
            gate = round_to(gate, out_ty, INTERPRET)
            up = round_to(up, out_ty, INTERPRET)
            act = round_to(gate * tl.sigmoid(gate), out_ty, INTERPRET)
            h = round_to(act * up, out_ty, INTERPRET).to(x.dtype)  # exact: already representable
            w_down = tl.load(wd_ptr + offs_l[:, None] * M + rows[None, :], mask=in_width[None, :], other=0.0)
            acc = dot(w_down, h, acc, FP32_DOT)

        # Residual, then RMSNorm over the L positions (rows past L are zero and left out of the mean).
        mixed = round_to(acc, out_ty, INTERPRET)
        summed = round_to(x.to(tl.float32) + mixed, out_ty, INTERPRET)
        summed = tl.where(mask, summed, 0.0)
        variance = tl.sum(summed * summed, axis=0) / L
        y = summed * tl.rsqrt(variance + eps)[None, :]
        out_ptrs = out_ptr + b * stride_ob + offs_l[:, None] * stride_ol + offs_d[None, :]
        tl.store(out_ptrs, y.to(out_ty), mask=mask)

    # The transposed kernel's tiles: acc [BLOCK_D, L_PAD] fp32 and the gate/up tiles [BLOCK_D, BLOCK_M]; 128 channel
    # rows are two warpgroups' 64-row halves at 8 warps. Each chunk's dots are waited for before its SwiGLU (Triton 3.6 on
    # sm_90 keeps only an accumulating dot in flight across the loop), so within a program the tensor cores idle
    # while the CUDA cores compute the SwiGLU; the last three configs are small enough (168-255 registers, 65-115 KB
    # of shared memory, compiled for sm_90) for two or three programs an SM, whose dots and SwiGLUs can interleave,
    # at the price of reading the weights twice as often as the 128-channel tiles.
    _TRANSPOSED_CONFIGS = [
        ({"BLOCK_D": 128, "BLOCK_M": 64}, 8, 2),
        ({"BLOCK_D": 128, "BLOCK_M": 64}, 8, 3),
        ({"BLOCK_D": 128, "BLOCK_M": 32}, 8, 3),
        ({"BLOCK_D": 64, "BLOCK_M": 64}, 4, 3),
        ({"BLOCK_D": 64, "BLOCK_M": 128}, 4, 2),
        ({"BLOCK_D": 128, "BLOCK_M": 128}, 8, 2),
        ({"BLOCK_D": 64, "BLOCK_M": 32}, 4, 2),
        ({"BLOCK_D": 64, "BLOCK_M": 32}, 4, 3),
        ({"BLOCK_D": 64, "BLOCK_M": 64}, 4, 2),
    ]

    @triton.autotune(
        configs=autotune_configs(_TRANSPOSED_CONFIGS, {"BLOCK_D": 16, "BLOCK_M": 16}), key=["L_PAD", "D", "M"]
    )
    @triton.jit
    def _token_mix_transposed_kernel(
        x_ptr, wgu_ptr, wd_ptr, out_ptr,
        L, D, M, stride_xb, stride_xl, stride_ob, stride_ol, eps,
        L_PAD: tl.constexpr, FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        # The same sub-layer with channels as the tile rows: gate^T = x^T W_g^T is [BLOCK_D, BLOCK_M], so the SwiGLU
        # output h^T is the left operand of the down projection (acc^T += h^T W_d^T), which the tensor cores read
        # from registers; the first kernel's h is the right operand, which goes through shared memory each chunk.
        b = tl.program_id(1).to(tl.int64)
        offs_l = tl.arange(0, L_PAD)
        offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_m = tl.arange(0, BLOCK_M)
        offs_2m = tl.arange(0, 2 * BLOCK_M)
        mask = (offs_l < L)[:, None] & (offs_d < D)[None, :]
        x = tl.load(x_ptr + b * stride_xb + offs_l[:, None] * stride_xl + offs_d[None, :], mask=mask, other=0.0)
        xt = tl.trans(x)  # [BLOCK_D, L_PAD]
        out_ty = out_ptr.dtype.element_ty

        acc = tl.zeros((BLOCK_D, L_PAD), dtype=tl.float32)  # the down projection's tile, transposed
        for start in range(0, M, BLOCK_M):
            rows = start + offs_m  # inner-width rows of this chunk
            in_width = rows < M
            # Gate and up rows come interleaved (row 2i gate i, 2i + 1 up i): one dot gives both, and the pairs are
            # neighbouring accumulator columns, which the split below takes apart within each thread's registers.
            pairs = 2 * start + offs_2m
            w_pairs = tl.load(
                wgu_ptr + pairs[:, None] * L_PAD + offs_l[None, :], mask=(pairs < 2 * M)[:, None], other=0.0
            )
            both = dot(xt, tl.trans(w_pairs), tl.zeros((BLOCK_D, 2 * BLOCK_M), dtype=tl.float32), FP32_DOT)
            gate, up = tl.split(tl.reshape(both, (BLOCK_D, BLOCK_M, 2)))
            # Same roundings as F.linear -> chunk -> F.silu(gate) * up in the activation dtype.
            gate = round_to(gate, out_ty, INTERPRET)
            up = round_to(up, out_ty, INTERPRET)
            act = round_to(gate * tl.sigmoid(gate), out_ty, INTERPRET)
            h = round_to(act * up, out_ty, INTERPRET).to(x.dtype)  # [BLOCK_D, BLOCK_M], exact: representable
            w_down = tl.load(wd_ptr + offs_l[:, None] * M + rows[None, :], mask=in_width[None, :], other=0.0)
            acc = dot(h, tl.trans(w_down), acc, FP32_DOT)

        # Back to [L_PAD, BLOCK_D] once, then the first kernel's residual and RMSNorm over the L positions.
        mixed = round_to(tl.trans(acc), out_ty, INTERPRET)
        summed = round_to(x.to(tl.float32) + mixed, out_ty, INTERPRET)
        summed = tl.where(mask, summed, 0.0)
        variance = tl.sum(summed * summed, axis=0) / L
        y = summed * tl.rsqrt(variance + eps)[None, :]
        out_ptrs = out_ptr + b * stride_ob + offs_l[:, None] * stride_ol + offs_d[None, :]
        tl.store(out_ptrs, y.to(out_ty), mask=mask)

    def _launch(launcher, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float, transposed: bool):
        """The kernel's launch, shared by both ops: `launcher` is `torch.library.wrap_triton` (traced by
        torch.compile) or the identity (a plain launch inside an op torch.compile does not look into)."""
        batch, positions, width = x.shape
        inner = w_down.shape[1]
        padded = w_gate_up.shape[1]
        out = torch.empty_like(x)
        grid = lambda meta: (triton.cdiv(width, meta["BLOCK_D"]), batch)
        kernel = _token_mix_transposed_kernel if transposed else _token_mix_kernel
        launcher(kernel)[grid](
            x, w_gate_up, w_down, out,
            positions, width, inner, x.stride(0), x.stride(1), out.stride(0), out.stride(1), eps,
            L_PAD=padded, **kernel_flags(x.dtype),
        )  # fmt: skip
        return out

    @torch.library.triton_op("hrm::token_mix", mutates_args=())
    def _token_mix_op(
        x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float, transposed: bool
    ) -> torch.Tensor:
        return _launch(torch.library.wrap_triton, x, w_gate_up, w_down, eps, transposed)

    @torch.library.custom_op("hrm::token_mix_opaque", mutates_args=())
    def _token_mix_opaque_op(
        x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float, transposed: bool
    ) -> torch.Tensor:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            return _launch(lambda kernel: kernel, x, w_gate_up, w_down, eps, transposed)

    @_token_mix_opaque_op.register_fake
    def _(x, w_gate_up, w_down, eps, transposed):
        return torch.empty_like(x)


def padded_positions(positions: int) -> int:
    """The kernel's tile height for L positions: the next power of two, at least 16 (Triton's dot minimum)."""
    return max(16, 1 << (positions - 1).bit_length())


def token_mix_supported(x: torch.Tensor) -> bool:
    """Whether `token_mix` can run this call: Triton, CUDA (or the interpreter), 16-bit, no autograd, x [B, L, D]
    with L <= MAX_POSITIONS, and the kernel not switched off (`HRM_KERNELS=portable`, `HRM_KERNELS_OFF=token_mix`).
    Shapes, dtype, device and grad mode only: compile-friendly."""
    return ENABLED and no_grad_kernel_call(x) and x.dim() == 3 and x.shape[1] <= MAX_POSITIONS


def token_mix(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    eps: float,
    transposed: bool | None = None,
    op: str | None = None,
) -> torch.Tensor:
    """rms_norm(x + SwiGLU_L(x over positions), over positions) for x [B, L, D], with the token SwiGLU's weights
    w_gate_up [2m, L] (gate rows, then up rows) and w_down [L, m]; returns [B, L, D] in x's dtype. Same result as
    models/layers.py's `PostNormBlock._mix_positions`, within the activation dtype's rounding. `transposed`: run
    the kernel with channels as tile rows (default `TRANSPOSED`: yes, unless HRM_KERNELS_OFF names it); `op`: how
    torch.compile sees it, "triton_op" or "custom_op" (default `OP`, from HRM_TOKEN_MIX_OP)."""
    if not HAS_TRITON:
        raise RuntimeError("models.token_mix: Triton is not installed; use models.layers.PostNormBlock's path")
    if x.dim() != 3:
        raise ValueError(f"token_mix: expected x [batch, positions, width], got shape {tuple(x.shape)}")
    positions = x.shape[1]
    inner = w_down.shape[1]
    if positions > MAX_POSITIONS:
        raise ValueError(f"token_mix: {positions} positions > {MAX_POSITIONS}")
    if tuple(w_gate_up.shape) != (2 * inner, positions) or w_down.shape[0] != positions:
        raise ValueError(
            f"token_mix: weights {tuple(w_gate_up.shape)} and {tuple(w_down.shape)} do not fit {positions} positions "
            f"(expected [2m, {positions}] and [{positions}, m])"
        )
    pad = padded_positions(positions) - positions
    transposed = TRANSPOSED if transposed is None else transposed
    w_gate_up = w_gate_up.to(x.dtype)
    if transposed:  # rows interleaved: 2i the gate row i, 2i + 1 the up row i
        w_gate_up = w_gate_up.view(2, inner, positions).transpose(0, 1).reshape(2 * inner, positions)
    w_gate_up = F.pad(w_gate_up, (0, pad)).contiguous()  # [2m, L_PAD], padded columns zero
    w_down = F.pad(w_down.to(x.dtype), (0, 0, 0, pad)).contiguous()  # [L_PAD, m], padded rows zero
    x = x if x.stride(-1) == 1 else x.contiguous()
    opaque = (OP if op is None else op) == "custom_op"
    kernel_op = torch.ops.hrm.token_mix_opaque if opaque else torch.ops.hrm.token_mix
    return kernel_op(x, w_gate_up, w_down, float(eps), bool(transposed))
