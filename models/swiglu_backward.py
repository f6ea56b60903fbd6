"""The SwiGLU activation's backward in one Triton kernel, for the calls with gradient.

Why: in a train step the calls with gradient (the last cycle of HRM's and TRM's recursion) run the SwiGLU
activation h = silu(gate) * up on the gate/up projection's output [T, 2m], and its backward turns dh [T, m] into
d(gate/up) [T, 2m]. torch.compile's kernel for that backward writes the two halves as one concatenation, each
output element loading its own inputs, so gate and dh are read twice; on an H200 it moved about half the bytes
per second the GPU can (TRM's mlp_t recipe: 0.94 ms per call for the token MLP, 0.54 ms for the channel MLP;
the plain traffic takes about 0.5 and 0.3 ms). Here one program takes a [BLOCK_R, BLOCK_C] tile of the m
columns: it reads gate, up and dh once and writes both halves of the gradient, so 3 reads and 2 writes of
T·m elements in all.

Numerics: the roundings of eager autograd in the activation dtype: silu(gate) rounded (the product saved it),
d_silu = dh·up and d_up = dh·silu(gate) rounded, then silu's backward d_gate = d_silu·σ(g)·(1 + g·(1 − σ(g)))
in fp32, rounded once. What differs is fp32 last-ulp detail of exp.

The forward is unchanged: `swiglu(gate_up)` is a torch.autograd.Function whose forward is the PyTorch
composition (torch.compile fuses it as before) and whose backward is the kernel, an opaque custom op
(`torch.library.custom_op` with a shape-only fake: a standalone pointwise kernel has nothing for Inductor to fuse
into, and the op then traces the same way on a GPU and under the interpreter). It saves only gate/up, as
autograd already did.

Status: a default kernel where it applies (`swiglu_backward_supported`: Triton, CUDA or the interpreter, 16-bit,
autograd on); `HRM_KERNELS=portable` or `HRM_KERNELS_OFF=swiglu_backward` switch it off.
"""

import torch
import torch.nn.functional as F

from models.triton_common import HAS_TRITON, INTERPRET, kernel_call, kernel_on

ENABLED = kernel_on("swiglu_backward")

if HAS_TRITON:
    import triton
    import triton.language as tl

    from models.triton_common import autotune_configs, round_to

    _CONFIGS = [
        ({"BLOCK_R": 8, "BLOCK_C": 256}, 4, 1),
        ({"BLOCK_R": 16, "BLOCK_C": 256}, 8, 1),
        ({"BLOCK_R": 8, "BLOCK_C": 512}, 8, 1),
        ({"BLOCK_R": 32, "BLOCK_C": 128}, 8, 1),
    ]

    @triton.autotune(configs=autotune_configs(_CONFIGS, {"BLOCK_R": 4, "BLOCK_C": 16}), key=["M"])
    @triton.jit
    def _swiglu_backward_kernel(
        gu_ptr, dh_ptr, dgu_ptr, R, M, stride_gu, stride_dh, stride_dgu,
        INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < R)[:, None] & (cols < M)[None, :]
        gate_ptrs = gu_ptr + rows[:, None] * stride_gu + cols[None, :]
        gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_ptrs + M, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out_ty = dgu_ptr.dtype.element_ty
        sig = tl.sigmoid(gate)
        act = round_to(gate * sig, out_ty, INTERPRET)  # silu(gate) as the forward stored it
        d_act = round_to(dh * up, out_ty, INTERPRET)
        d_up = dh * act
        d_gate = d_act * sig * (1.0 + gate * (1.0 - sig))
        out_ptrs = dgu_ptr + rows[:, None] * stride_dgu + cols[None, :]
        tl.store(out_ptrs, round_to(d_gate, out_ty, INTERPRET).to(out_ty), mask=mask)
        tl.store(out_ptrs + M, round_to(d_up, out_ty, INTERPRET).to(out_ty), mask=mask)

    @torch.library.custom_op("hrm::swiglu_backward", mutates_args=())
    def _swiglu_backward_op(gate_up: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape
        inner = width // 2
        grad = torch.empty_like(gate_up)
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(inner, meta["BLOCK_C"]))
        with torch.device(gate_up.device):
            _swiglu_backward_kernel[grid](
                gate_up, grad_h, grad, rows, inner, gate_up.stride(0), grad_h.stride(0), grad.stride(0),
                INTERPRET=INTERPRET,
            )  # fmt: skip
        return grad

    @_swiglu_backward_op.register_fake
    def _(gate_up: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(gate_up)


def swiglu_backward(gate_up: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
    """The gradient of h = silu(gate) * up (gate, up = gate_up.chunk(2, -1)) with respect to gate_up, given dh:
    gate_up [..., 2m], grad_h [..., m], both 16-bit (or fp32 under the interpreter); returns [..., 2m]."""
    if not HAS_TRITON:
        raise RuntimeError("models.swiglu_backward: Triton is not installed; use autograd's PyTorch backward")
    width = gate_up.shape[-1]
    if width % 2 or tuple(grad_h.shape) != (*gate_up.shape[:-1], width // 2):
        raise ValueError(
            f"swiglu_backward: gate_up {tuple(gate_up.shape)} and grad_h {tuple(grad_h.shape)} do not fit "
            "(expected [..., 2m] and [..., m])"
        )
    if grad_h.dtype != gate_up.dtype:
        raise ValueError(f"swiglu_backward: grad_h is {grad_h.dtype}, gate_up {gate_up.dtype}")
    rows = gate_up.reshape(-1, width).contiguous()
    grad = torch.ops.hrm.swiglu_backward(rows, grad_h.reshape(-1, width // 2).contiguous())
    return grad.view(gate_up.shape)


class _SwiGLU(torch.autograd.Function):
    """h = silu(gate) * up in PyTorch ops; the backward in the kernel."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(gate_up, grad_h)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up = gate_up.chunk(2, -1), with the kernel's backward. Same forward as the
    PyTorch composition, bit for bit."""
    return _SwiGLU.apply(gate_up)


def swiglu_backward_supported(gate_up: torch.Tensor) -> bool:
    """Whether `swiglu` should run this call: the kernel switched on, Triton, CUDA (or the interpreter), 16-bit,
    autograd on and gate_up needing a gradient (no-grad calls have no backward to speed up). Dtype, device and
    grad mode only: torch.compile guards on it without a graph break."""
    return ENABLED and kernel_call(gate_up) and torch.is_grad_enabled() and gate_up.requires_grad
