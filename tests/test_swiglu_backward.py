"""The SwiGLU activation's backward kernel (models/swiglu_backward.py) against float64 and eager autograd.

Runs on CUDA when present, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before Python
starts; tiny tiles, so every case has row and column tails); otherwise the kernel tests skip. The dispatch tests
(which calls take the kernel) run everywhere.
"""

import pytest
import torch
import torch.nn.functional as F

import models.swiglu_backward as sb
from models.layers import SwiGLU
from models.triton_common import HAS_TRITON
from tests.helpers import INTERPRET, KERNEL
from tests.helpers import KERNEL_DEVICE as DEVICE
from tests.helpers import KERNEL_DTYPES as DTYPES

# (leading dims, inner width m): the interpreter's tile is 4 rows x 16 columns
CASES = [((5,), 24), ((3, 7), 40), ((1,), 16), ((2, 3, 2), 8)]
# Two units of the dtype's rounding, relative: the kernel rounds where eager autograd does (fp32: a few units of
# the chained fp32 arithmetic, whose order differs).
ULP = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9, torch.float32: 1e-5}


def _inputs(lead, inner, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(*lead, 2 * inner, generator=g) * 2).to(dtype).to(DEVICE)
    grad_h = torch.randn(*lead, inner, generator=g).to(dtype).to(DEVICE)
    return gate_up, grad_h


def _eager_grad(gate_up, grad_h):
    """Autograd's gradient of silu(gate) * up in the inputs' dtype (the PyTorch path)."""
    leaf = gate_up.detach().requires_grad_(True)
    gate, up = leaf.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(grad_h)
    return leaf.grad


def _float64_grad(gate_up, grad_h):
    gate, up = gate_up.double().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    dh = grad_h.double()
    return torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * gate * sig], dim=-1)


@KERNEL
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, inner", CASES)
def test_kernel_matches_eager_autograd_and_float64(dtype, lead, inner):
    gate_up, grad_h = _inputs(lead, inner, dtype, seed=inner)
    out = sb.swiglu_backward(gate_up, grad_h)
    assert out.shape == gate_up.shape and out.dtype == dtype
    eager = _eager_grad(gate_up, grad_h)
    exact = _float64_grad(gate_up, grad_h)
    # Same roundings as eager autograd: elementwise within one rounding unit of it (exp's last fp32 bits may
    # move a value across a rounding boundary), and no further from float64 than eager is, plus one unit.
    scale = exact.abs().clamp_min(1e-3)
    assert ((out.double() - eager.double()).abs() / scale).max().item() <= ULP[dtype]
    if dtype != torch.float32:  # and nearly always bit-equal to it
        assert (out != eager).float().mean().item() <= 0.02
    eager_err = ((eager.double() - exact).abs() / scale).max().item()
    kernel_err = ((out.double() - exact).abs() / scale).max().item()
    assert kernel_err <= eager_err + ULP[dtype], f"kernel {kernel_err:.2e} vs eager {eager_err:.2e}"
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


@KERNEL
def test_strided_grad_is_accepted():
    gate_up, grad_h = _inputs((6,), 16, torch.bfloat16, seed=3)
    wide = torch.zeros(6, 32, dtype=torch.bfloat16, device=DEVICE)
    wide[:, ::2] = grad_h  # a non-contiguous dh, as a transposed layout's backward may hand over
    assert torch.equal(sb.swiglu_backward(gate_up, wide[:, ::2]), sb.swiglu_backward(gate_up, grad_h))


@KERNEL
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_function_keeps_the_forward_and_takes_the_kernel_backward(dtype):
    gate_up, grad_h = _inputs((4, 3), 24, dtype, seed=9)
    leaf = gate_up.clone().requires_grad_(True)
    h = sb.swiglu(leaf)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(h.detach(), F.silu(gate) * up)  # the PyTorch composition, bit for bit
    h.backward(grad_h)
    assert torch.equal(leaf.grad, sb.swiglu_backward(gate_up, grad_h))


@KERNEL
def test_swiglu_module_gradients_match_the_pytorch_path(monkeypatch):
    """The module with the kernel backward (as the default runs it on a GPU) against the PyTorch path: same output,
    weight and input gradients within bf16 rounding."""
    torch.manual_seed(0)
    mlp = SwiGLU(hidden_size=32, expansion=4.0).to(DEVICE)  # m = 256
    x = torch.randn(3, 10, 32, device=DEVICE).to(torch.bfloat16)
    results = {}
    for enabled in (False, True):
        monkeypatch.setattr(sb, "ENABLED", enabled)
        mlp.zero_grad()
        leaf = x.clone().requires_grad_(True)
        assert sb.swiglu_backward_supported(mlp.gate_up_proj(leaf)) == enabled
        out = mlp(leaf)
        out.float().square().sum().backward()
        results[enabled] = out.detach(), leaf.grad, mlp.gate_up_proj.weight.grad.clone(), mlp.down_proj.weight.grad
    (out0, dx0, dw0, dd0), (out1, dx1, dw1, dd1) = results[False], results[True]
    assert torch.equal(out0, out1)
    assert torch.equal(dd0, dd1)  # the down projection's gradient needs only h and dy, both unchanged
    for a, b, what in ((dx0, dx1, "input"), (dw0, dw1, "gate/up weight")):
        rel = ((a.double() - b.double()).abs().max() / a.double().abs().max()).item()
        assert rel <= 2e-2, f"{what} gradient: {rel:.2e}"


@KERNEL
def test_compiled_module_traces_the_kernel_backward_without_a_graph_break(monkeypatch):
    """torch.compile (fullgraph, so a graph break fails) traces the autograd.Function and the kernel op in its
    backward; AOT autograd's eager backend runs the traced graphs, so the gradients are the eager kernel path's."""
    monkeypatch.setattr(sb, "ENABLED", True)
    torch.manual_seed(2)
    mlp = SwiGLU(hidden_size=32, expansion=4.0).to(DEVICE)
    x = torch.randn(3, 10, 32, device=DEVICE).to(torch.bfloat16)
    grads = []
    for fn in (torch.compile(mlp, backend="aot_eager", fullgraph=True), mlp):
        mlp.zero_grad()
        leaf = x.clone().requires_grad_(True)
        fn(leaf).float().square().sum().backward()
        grads.append((leaf.grad, mlp.gate_up_proj.weight.grad.clone()))
    assert sb.swiglu_backward_supported(mlp.gate_up_proj(x.requires_grad_(True)))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@KERNEL
def test_bad_shapes_are_named():
    gate_up, grad_h = _inputs((4,), 16, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        sb.swiglu_backward(gate_up, grad_h[:, :8])
    with pytest.raises(ValueError, match="do not fit"):
        sb.swiglu_backward(gate_up[:, :31], grad_h)
    with pytest.raises(ValueError, match="grad_h is torch.float16"):
        sb.swiglu_backward(gate_up, grad_h.half())


def test_supported_only_where_the_kernel_applies(monkeypatch):
    monkeypatch.setattr(sb, "ENABLED", True)
    x = torch.zeros(4, 32, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    on_device = HAS_TRITON and (DEVICE.type == "cuda" or INTERPRET)
    assert sb.swiglu_backward_supported(x * 1) == on_device
    assert not sb.swiglu_backward_supported(x.detach())  # nothing needs a gradient
    assert not sb.swiglu_backward_supported((x * 1).float())  # fp32 activations
    with torch.no_grad():
        assert not sb.swiglu_backward_supported(x)  # grad mode off: no backward to run
    monkeypatch.setattr(sb, "ENABLED", False)  # HRM_KERNELS=portable or HRM_KERNELS_OFF=swiglu_backward
    assert not sb.swiglu_backward_supported(x * 1)


def test_cpu_module_keeps_the_pytorch_path():
    """Without the interpreter the CPU never takes the kernel: the module's gradient is autograd's, bit for bit."""
    if INTERPRET:
        pytest.skip("under the interpreter CPU tensors take the kernel")
    torch.manual_seed(1)
    mlp = SwiGLU(hidden_size=16, expansion=2.0)
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    assert not sb.swiglu_backward_supported(mlp.gate_up_proj(x))
    grad_out = torch.randn(5, 16, dtype=torch.bfloat16)
    (module_grad,) = torch.autograd.grad(mlp(x), x, grad_out)
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    (autograd_grad,) = torch.autograd.grad(mlp.down_proj(F.silu(gate) * up), x, grad_out)
    assert torch.equal(module_grad, autograd_grad)
