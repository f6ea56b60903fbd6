"""The token-MLP kernel (models/token_mix.py) against a float64 reference and the PyTorch path of models/layers.py.

Runs on CUDA when present, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before Python
starts; tiny tiles, so every case has channel and inner-width tails); otherwise the kernel tests skip. The dispatch
tests (which calls take the kernel) run everywhere.
"""

import pytest
import torch
import torch.nn.functional as F

import models.layers as layers
from models.layers import PostNormBlock, SwiGLU, rms_norm
from models.triton_common import HAS_TRITON
from tests.helpers import INTERPRET, KERNEL
from tests.helpers import KERNEL_DEVICE as DEVICE
from tests.helpers import KERNEL_DTYPES as DTYPES

EPS = 1e-5
# The kernel rounds where the PyTorch path does (projections, silu, product, down projection, residual sum), so
# against the float64 sub-layer its error must stay within the PyTorch path's own error times 1.5 plus a floor of
# a few units of that dtype's rounding, and under a hard cap.
FLOOR = {torch.bfloat16: 4e-3, torch.float16: 5e-4, torch.float32: 1e-6}
CAP = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}

# (batch, positions L, channels D, expansion); the inner width m is SwiGLU's (a multiple of 256)
CASES = [
    (2, 9, 24, 4.0),  # channel tail of the interpreter's 16-wide tile; L padded to 16
    (1, 17, 40, 4.0),  # L just past a power of two
    (2, 97, 32, 4.0),  # TRM's Sudoku mlp_t: 81 cells + 16 puzzle rows, m = 512
    (1, 128, 16, 1.0),  # the most positions the kernel takes
]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _inputs(batch, positions, width, expansion, dtype, seed):
    torch.manual_seed(seed)
    mlp = SwiGLU(hidden_size=positions, expansion=expansion)  # the token SwiGLU: width L
    x = torch.randn(batch, positions, width, generator=torch.Generator().manual_seed(seed + 100)).to(dtype)
    return x.to(DEVICE), mlp.gate_up_proj.weight.to(DEVICE), mlp.down_proj.weight.to(DEVICE)


def _float64_mix(x, w_gate_up, w_down):
    """rms_norm(x + SwiGLU over positions, over positions) in float64 on the upcast inputs."""
    x, w_gate_up, w_down = x.double(), w_gate_up.double(), w_down.double()
    gate, up = torch.matmul(w_gate_up, x).chunk(2, dim=1)  # [B, m, D] each
    summed = x + torch.matmul(w_down, F.silu(gate) * up)
    return summed * torch.rsqrt(summed.square().mean(dim=1, keepdim=True) + EPS)


def _pytorch_mix(x, w_gate_up, w_down):
    """models/layers.py's TRM-layout path in the input dtype (weights cast as CastedLinear casts them)."""
    h = x.transpose(1, 2)  # [B, D, L]
    if h.device.type == "cpu" and h.dtype != torch.float32:  # CPU 16-bit matmuls: fp32 compute, round per op
        gate, up = F.linear(h.float(), w_gate_up.to(h.dtype).float()).to(h.dtype).chunk(2, dim=-1)
        act = (F.silu(gate.float()).to(h.dtype) * up).to(h.dtype)
        mixed = F.linear(act.float(), w_down.to(h.dtype).float()).to(h.dtype)
    else:
        gate, up = F.linear(h, w_gate_up.to(h.dtype)).chunk(2, dim=-1)
        mixed = F.linear(F.silu(gate) * up, w_down.to(h.dtype))
    return rms_norm(h + mixed, EPS).transpose(1, 2)


@KERNEL
@pytest.mark.parametrize("transposed", [False, True], ids=["channels_as_columns", "channels_as_rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_l{}_d{}_e{}".format(*c))
def test_matches_float64_and_the_pytorch_path(case, dtype, transposed):
    """Both kernels (the default one, and the transposed one of HRM_KERNELS=all) compute the sub-layer."""
    from models.token_mix import token_mix

    batch, positions, width, expansion = case
    for seed in (0, 1):  # fresh inputs: the kernel must compute the same function on any input
        x, w_gate_up, w_down = _inputs(batch, positions, width, expansion, dtype, seed)
        with torch.no_grad():
            out = token_mix(x, w_gate_up, w_down, EPS, transposed)
            pytorch = _pytorch_mix(x, w_gate_up, w_down)
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.isfinite(out).all(), "non-finite or unwritten output"
        exact = _float64_mix(x, w_gate_up, w_down)
        rel = _rel(out, exact)
        pytorch_rel = _rel(pytorch, exact)
        assert rel <= min(CAP[dtype], 1.5 * pytorch_rel + FLOOR[dtype]), (
            f"seed {seed}: error vs float64 {rel:.2e}, the PyTorch path's {pytorch_rel:.2e}"
        )


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_benchmark_log_names_the_autotuners_choice(monkeypatch):
    """bench_fused_ops.py ends its log with the config each autotuned kernel chose at each tuning key, so a session's
    timings can be tied to tiles. (On the CPU nothing is tuned, so a choice is put in the transposed kernel's cache.)"""
    import importlib.util

    import models.token_mix as tm
    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("bench_fused_ops", REPO / "benchmarks" / "bench_fused_ops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    kernel = tm._token_mix_transposed_kernel
    monkeypatch.setattr(kernel, "cache", {(128, 512, 512): kernel.configs[-1]})
    lines = [line for line in bench.autotuned_choices() if "_token_mix_transposed_kernel" in line]
    assert lines == [f"autotuned models.token_mix._token_mix_transposed_kernel (128, 512, 512): {kernel.configs[-1]}"]


@KERNEL
def test_opaque_and_traced_ops_run_the_same_kernel(monkeypatch):
    """`HRM_TOKEN_MIX_OP` only changes how torch.compile sees the kernel: the traced triton_op (the default) and the
    opaque custom op give the same bits, called directly and from a function torch.compile traced whole."""
    import models.token_mix as tm

    x, w_gate_up, w_down = _inputs(2, 9, 24, 4.0, DTYPES[0], 5)
    outs = {}
    with torch.no_grad():
        for op in ("triton_op", "custom_op"):
            monkeypatch.setattr(tm, "OP", op)
            outs[op] = tm.token_mix(x, w_gate_up, w_down, EPS)
        assert torch.equal(outs["custom_op"], outs["triton_op"])
        compiled = torch.compile(lambda h: tm.token_mix(h, w_gate_up, w_down, EPS), fullgraph=True)
        assert torch.equal(compiled(x), outs["custom_op"])  # OP is custom_op here


@KERNEL
def test_strided_input_and_bad_shapes():
    """A non-contiguous x (a slice of a wider buffer) gives the same result; weights that do not fit the positions,
    too many positions and a wrong rank are refused with the numbers."""
    from models.token_mix import token_mix

    dtype = DTYPES[0]
    x, w_gate_up, w_down = _inputs(2, 9, 24, 4.0, dtype, 3)
    wide = torch.cat([x, x[..., :8]], dim=-1)[..., :24]  # row stride 32
    with torch.no_grad():
        assert torch.equal(token_mix(wide, w_gate_up, w_down, EPS), token_mix(x, w_gate_up, w_down, EPS))
        with pytest.raises(ValueError, match=r"do not fit 8 positions \(expected \[2m, 8\] and \[8, m\]\)"):
            token_mix(x[:, :8], w_gate_up, w_down, EPS)
        with pytest.raises(ValueError, match="129 positions > 128"):
            token_mix(torch.zeros(1, 129, 16, dtype=dtype, device=DEVICE), w_gate_up, w_down, EPS)
        with pytest.raises(ValueError, match=r"expected x \[batch, positions, width\], got shape \(9, 24\)"):
            token_mix(x[0], w_gate_up, w_down, EPS)


def test_block_dispatches_no_grad_calls(monkeypatch):
    """PostNormBlock routes the token-MLP sub-layer to the kernel exactly when token_mix_supported says so, passing
    the block's fp32 weights and eps, and feeds the kernel's output to the channel MLP."""
    calls = []

    def fake_kernel(x, w_gate_up, w_down, eps):
        calls.append((tuple(x.shape), tuple(w_gate_up.shape), tuple(w_down.shape), eps))
        return torch.ones_like(x)

    monkeypatch.setattr(layers, "token_mix", fake_kernel)
    monkeypatch.setattr(layers, "token_mix_supported", lambda x: not torch.is_grad_enabled())
    block = PostNormBlock(hidden_size=16, num_heads=2, expansion=4.0, norm_eps=EPS, token_mix_width=9)
    x = torch.randn(2, 9, 16)
    with_grad = block(cos_sin=None, hidden_states=x)
    assert not calls and with_grad.requires_grad
    with torch.no_grad():
        routed = block(cos_sin=None, hidden_states=x)
    assert calls == [((2, 9, 16), (512, 9), (9, 256), EPS)]  # m = 256 for L = 9
    ones = torch.ones_like(x)
    assert torch.equal(routed, rms_norm(ones + block.mlp(ones), EPS))


def test_padded_positions_path_matches_trm_op_sequence():
    """The GPU calls' experimental padded token MLP (positions zero-padded to a multiple of 8) computes TRM's
    sub-layer: in float32 on the CPU its output and every gradient (input, both weights) match the unpadded op
    sequence to rounding, and the padded weight columns receive no gradient at all."""
    torch.manual_seed(0)
    block = PostNormBlock(hidden_size=16, num_heads=2, expansion=4.0, norm_eps=EPS, token_mix_width=97)
    x = torch.randn(3, 97, 16)
    results = []
    for padded in (False, True):
        xi = x.clone().requires_grad_()
        out = block._mix_positions_transposed(xi, padded=padded)
        grads = torch.autograd.grad(
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [xi, *block.mlp_t.parameters()]
        )
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_b.shape == out_a.shape and _rel(out_b, out_a) < 1e-5
    for a, b in zip(grads_a, grads_b):
        assert b.shape == a.shape and _rel(b, a) < 1e-5
    mixed = block.mlp_t.forward_padded(F.pad(x.transpose(1, 2), (0, 7)), 97)  # 97 -> 104
    assert mixed.shape == (3, 16, 104) and torch.equal(mixed[..., 97:], torch.zeros_like(mixed[..., 97:]))


def test_padded_positions_only_for_gpu_calls_with_gradient(monkeypatch):
    """The padded path is for CUDA calls with gradient at unaligned L, when switched on; never on the CPU, whose
    calls keep TRM's op sequence bit for bit."""
    monkeypatch.setattr(layers, "_TOKEN_MIX_PADDED", True)
    cpu = torch.zeros(2, 97, 16)
    assert not layers._token_mix_padded(cpu)
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        assert layers._token_mix_padded(gpu) and not layers._token_mix_padded(gpu[:, :96])
        with torch.no_grad():
            assert not layers._token_mix_padded(gpu)
        monkeypatch.setattr(layers, "_TOKEN_MIX_PADDED", False)
        assert not layers._token_mix_padded(gpu)


def test_supported_only_where_the_kernel_applies(monkeypatch):
    from models import token_mix as tm

    x = torch.zeros(2, 97, 32, dtype=torch.bfloat16, device=DEVICE)
    monkeypatch.setattr(tm, "ENABLED", True)
    if not HAS_TRITON:
        with torch.no_grad():
            assert not tm.token_mix_supported(x)
        return
    on_device = DEVICE.type == "cuda" or INTERPRET
    with torch.no_grad():
        assert tm.token_mix_supported(x) == on_device
        assert not tm.token_mix_supported(x.float())  # fp32 activations
        assert not tm.token_mix_supported(x[0])  # not [B, L, D]
        assert not tm.token_mix_supported(torch.zeros(1, 129, 32, dtype=torch.bfloat16, device=DEVICE))
        monkeypatch.setattr(tm, "ENABLED", False)  # HRM_KERNELS=portable
        assert not tm.token_mix_supported(x)
    monkeypatch.setattr(tm, "ENABLED", True)
    assert not tm.token_mix_supported(x)  # grad mode on


@pytest.mark.parametrize("positions, padded", [(1, 16), (9, 16), (16, 16), (17, 32), (97, 128), (128, 128)])
def test_padded_positions(positions, padded):
    from models.token_mix import padded_positions

    assert padded_positions(positions) == padded


def test_kernels_compile_for_hopper_without_a_gpu():
    """benchmarks/kernel_resources.py compiles both token-mix kernels for sm_90 on this machine (Triton's own LLVM and
    ptxas, no GPU): every config builds, its loads are software-pipelined, and in the transposed kernel the down
    projection reads the SwiGLU output from registers, the point of that kernel."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for the GPU, not interpret
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "kernel_resources.py"),
        "--kernels",
        "token_mix,token_mix_transposed",
    ]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {"token_mix", "token_mix_transposed"} and len(rows) >= 10
    for row in rows:
        assert 0 < row["regs"] <= 255 and 0 < row["shared_bytes"] <= 232448, row  # Hopper: 227 KiB a block
        assert row["async_copies"] > 0, f"loads not pipelined: {row}"
        # the default kernel's h goes through shared memory; the transposed one's down projection takes it in registers
        assert row["register_operand_dots"] == (1 if row["kernel"] == "token_mix_transposed" else 0), row
    # each chunk's dots are waited for before its SwiGLU, so only a second program on the SM can overlap them: the
    # autotuner must have configs of the default (transposed) kernel that leave room for one
    assert max(r["programs_per_sm"] for r in rows if r["kernel"] == "token_mix_transposed") >= 2
