"""Fused Triton block kernels (models/fused_ops.py) against the unfused PyTorch path of models/layers.py.

Runs on CUDA when present, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set
before Python starts); otherwise the whole module skips. The interpreter runs the same kernels with
numpy and small tiles, so shapes here are tiny but every case has row tails (T not a multiple of
BLOCK_M) and, where noted, K tails. Under the interpreter the 16-bit results are expected to match
the PyTorch reference almost bit for bit (same roundings, fp32 accumulation); on the GPU only the
matmul accumulation order differs from cuBLAS, so most elements still agree exactly.
"""

import pytest
import torch
import torch.nn.functional as F

from models.fused_ops import HAS_TRITON
from models.layers import PostNormBlock, RotaryEmbedding, SwiGLU, apply_rotary_pos_emb, rms_norm
from tests.helpers import INTERPRET, KERNEL, KERNEL_DTYPES, ON_CUDA
from tests.helpers import KERNEL_DEVICE as DEVICE

pytestmark = KERNEL

if HAS_TRITON:
    from models.fused_ops import (
        fused_block_supported,
        fused_gate_up_swiglu,
        fused_linear_residual_rmsnorm,
        fused_qkv_rope,
    )

# The GPU path takes 16-bit activations only (fp32 would run as exact but slow fp32 dots); the
# interpreter also checks fp32, where the only difference from PyTorch is summation order.
DTYPES = KERNEL_DTYPES
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
EPS = 1e-5


def _check_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Max error relative to the reference's largest magnitude, plus mostly-bitwise agreement in 16 bits."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (
        f"{what}: {out.shape} {out.dtype} vs {ref.shape} {ref.dtype}"
    )
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    diff = (out.float() - ref.float()).abs().max().item()
    rel = diff / ref.float().abs().max().item()
    assert rel <= REL_TOL[ref.dtype], f"{what}: max relative error {rel:.2e} > {REL_TOL[ref.dtype]:.0e}"
    if ref.dtype != torch.float32:
        # Same rounding steps as the reference: only rare ties across a rounding boundary may differ.
        equal = (out == ref).float().mean().item()
        assert equal >= 0.9, f"{what}: only {equal:.1%} of elements bitwise equal to the reference"


def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_up_swiglu_matches_swiglu_reference(dtype):
    torch.manual_seed(0)
    mlp = SwiGLU(hidden_size=64, expansion=2.0).to(DEVICE)  # inner width 256
    x = _randn(3, 13, 64, dtype=dtype)  # T = 39: a row tail for every BLOCK_M
    with torch.no_grad():
        gate, up = F.linear(x, mlp.gate_up_proj.weight.to(dtype)).chunk(2, dim=-1)
        ref = F.silu(gate) * up
        out = fused_gate_up_swiglu(x, mlp.gate_up_proj.weight)  # fp32 parameter, cast inside
    _check_close(out, ref, "gate_up_swiglu")


def test_gate_up_swiglu_column_tail_and_2d_input():
    torch.manual_seed(1)
    x = _randn(21, 64, dtype=torch.bfloat16)
    w = _randn(2 * 96, 64, dtype=torch.bfloat16, scale=0.125)  # m = 96: not a multiple of any BLOCK_N
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    _check_close(fused_gate_up_swiglu(x, w), F.silu(gate) * up, "gate_up_swiglu m=96")


@pytest.mark.parametrize("tokens,d,m", [(1000, 512, 1536), (300, 64, 96), (128, 512, 1536)])
def test_persistent_tma_gate_up_kernel_matches_first_kernel_and_reference(tokens, d, m):
    """On Hopper `fused_gate_up_swiglu` takes the persistent TMA kernel: row tails (T % 128), a column
    tail (m = 96 < one tile, where a gate tile reads up rows that must be dropped) and more tiles than SMs."""
    from models.fused_ops import TMA_KERNELS_AVAILABLE

    if not TMA_KERNELS_AVAILABLE:
        pytest.skip("needs a Hopper (sm_90+) GPU and Triton tensor descriptors")
    torch.manual_seed(tokens)
    x = _randn(tokens, d, dtype=torch.bfloat16)
    w = _randn(2 * m, d, dtype=torch.bfloat16, scale=d**-0.5)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    ref = F.silu(gate) * up
    tma = torch.ops.hrm.gate_up_swiglu_tma(x, w)
    first = torch.ops.hrm.gate_up_swiglu(x, w)
    _check_close(tma, ref, f"gate_up_swiglu_tma T={tokens} m={m}")
    _check_close(tma, first, f"gate_up_swiglu_tma vs first kernel T={tokens} m={m}")
    _check_close(fused_gate_up_swiglu(x, w), tma, "dispatch")


@pytest.mark.skipif(not INTERPRET, reason="the interpreter check of the TMA kernel's tiling; CUDA runs the test above")
@pytest.mark.parametrize("tokens, d, m, programs", [(70, 40, 40, 5), (33, 48, 24, 1), (16, 16, 16, 7)])
def test_persistent_tma_gate_up_kernel_tiling_under_the_interpreter(tokens, d, m, programs):
    """The persistent TMA kernel (the Hopper default), run by Triton's interpreter in fp32 with 16-wide tiles: row,
    column and K tails (out-of-box loads read zeros, out-of-box stores are dropped, even where a gate tile past m
    reads up rows), fewer programs than tiles and more, and the grouped tile order all give silu(gate) * up. (The
    interpreter's 16-bit dot is unusable, so the bf16 roundings are checked on a GPU only.)"""
    import triton

    from models.fused_ops import _gate_up_swiglu_tma_kernel

    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, d, generator=gen)
    w = torch.randn(2 * m, d, generator=gen) * d**-0.5
    h = torch.full((tokens, m), float("nan"))
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    _gate_up_swiglu_tma_kernel.fn[(programs,)](x, w, h, tokens, m, d, **tiles)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    _check_close(h, F.silu(gate) * up, f"TMA kernel T={tokens} d={d} m={m} programs={programs}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 64, 128, 256, 512])
def test_linear_residual_rmsnorm_matches_reference(d, dtype):
    torch.manual_seed(d)
    k = 96  # K tail for a 64-wide K step
    a = _randn(2, 19, k, dtype=dtype)
    w = torch.randn(d, k, device=DEVICE) * k**-0.5
    residual = _randn(2, 19, d, dtype=dtype)
    ref = rms_norm(residual + F.linear(a, w.to(dtype)), EPS)
    out = fused_linear_residual_rmsnorm(a, w, residual, EPS)
    _check_close(out, ref, f"linear_residual_rmsnorm d={d}")
    # Independent of the reference: every output row has mean square ~1 after the norm.
    assert torch.allclose(out.float().square().mean(-1), torch.ones(2, 19, device=DEVICE), atol=3e-2)


def test_linear_residual_rmsnorm_non_power_of_two_width():
    torch.manual_seed(2)
    a = _randn(23, 64, dtype=torch.bfloat16)
    w = torch.randn(96, 64, device=DEVICE) / 8  # the row is padded to 128 lanes and masked
    residual = _randn(23, 96, dtype=torch.bfloat16)
    ref = rms_norm(residual + F.linear(a, w.to(torch.bfloat16)), EPS)
    _check_close(fused_linear_residual_rmsnorm(a, w, residual, EPS), ref, "linear_residual_rmsnorm d=96")


def _qkv_reference(x, w, cos, sin, num_heads, kv_heads, head_dim):
    batch_size, seq_len, _ = x.shape
    qkv = F.linear(x, w.to(x.dtype)).view(batch_size, seq_len, num_heads + 2 * kv_heads, head_dim)
    q, k, v = qkv[:, :, :num_heads], qkv[:, :, num_heads : num_heads + kv_heads], qkv[:, :, num_heads + kv_heads :]
    if cos is not None:
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tables", ["rotary", "random"])
def test_qkv_rope_matches_reference(dtype, tables):
    torch.manual_seed(3)
    batch_size, seq_len, num_heads, head_dim = 3, 7, 2, 32
    hidden = num_heads * head_dim
    x = _randn(batch_size, seq_len, hidden, dtype=dtype)
    w = torch.randn(3 * hidden, hidden, device=DEVICE) * hidden**-0.5
    if tables == "rotary":
        cos, sin = RotaryEmbedding(head_dim, seq_len, base=10000.0, device=DEVICE)()
    else:
        # Halves that differ, so the kernel must read both halves of each table like the reference.
        cos, sin = torch.randn(2, seq_len, head_dim, device=DEVICE)
    refs = _qkv_reference(x, w, cos, sin, num_heads, num_heads, head_dim)
    outs = fused_qkv_rope(x, w, cos, sin, num_heads, head_dim)
    for name, out, ref in zip("qkv", outs, refs):
        assert out.shape == (batch_size, seq_len, num_heads, head_dim) and out.stride(-1) == 1
        _check_close(out, ref, f"qkv_rope {name}")


def test_qkv_rope_without_tables_and_with_fewer_kv_heads():
    torch.manual_seed(4)
    batch_size, seq_len, num_heads, kv_heads, head_dim = 2, 9, 4, 2, 16
    x = _randn(batch_size, seq_len, 64, dtype=torch.bfloat16)
    w = torch.randn((num_heads + 2 * kv_heads) * head_dim, 64, device=DEVICE) / 8
    cos, sin = RotaryEmbedding(head_dim, seq_len, base=10000.0, device=DEVICE)()
    for tables in ((cos, sin), (None, None)):
        refs = _qkv_reference(x, w, *tables, num_heads, kv_heads, head_dim)
        outs = fused_qkv_rope(x, w, *tables, num_heads, head_dim, num_key_value_heads=kv_heads)
        for name, out, ref in zip("qkv", outs, refs):
            _check_close(out, ref, f"qkv_rope {name} rope={tables[0] is not None}")


def _reference_block(block: PostNormBlock, cos_sin, x: torch.Tensor) -> torch.Tensor:
    """The post-norm HRM block, composed here from the block's models/layers.py sub-layers."""
    x = rms_norm(x + block.self_attn(cos_sin=cos_sin, hidden_states=x), EPS)
    return rms_norm(x + block.mlp(x), EPS)


def _fused_block(block: PostNormBlock, cos_sin, x: torch.Tensor) -> torch.Tensor:
    return block.forward_fused(cos_sin, x)


def _block_setup(batch_size, seq_len, hidden, num_heads, dtype):
    block = PostNormBlock(hidden, num_heads, expansion=4.0, norm_eps=EPS, fused_ops=True).to(DEVICE)
    cos_sin = RotaryEmbedding(hidden // num_heads, seq_len, base=10000.0, device=DEVICE)()
    x = _randn(batch_size, seq_len, hidden, dtype=dtype)
    return block, cos_sin, x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", [True, False])
def test_fused_block_matches_reference_block(dtype, rope):
    torch.manual_seed(5)
    block, cos_sin, x = _block_setup(2, 11, 64, 2, dtype)
    cos_sin = cos_sin if rope else None  # learned position encodings: the block runs without RoPE
    with torch.no_grad():
        ref = _reference_block(block, cos_sin, x)
        out = _fused_block(block, cos_sin, x)
    # Error compounds through four matmuls and two norms; the tolerance stays at bf16 scale.
    rel = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert rel <= 3 * REL_TOL[dtype], f"block: max relative error {rel:.2e}"


def test_bad_shapes_raise_value_error():
    x = _randn(2, 5, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="w_gate_up"):
        fused_gate_up_swiglu(x, torch.zeros(256, 32, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        fused_linear_residual_rmsnorm(x, torch.zeros(64, 64, device=DEVICE), x[:, :4], EPS)
    with pytest.raises(ValueError, match="w_qkv"):
        fused_qkv_rope(x, torch.zeros(100, 64, device=DEVICE), None, None, 2, 32)
    with pytest.raises(ValueError, match="cos table"):
        fused_qkv_rope(x, torch.zeros(192, 64, device=DEVICE), *torch.zeros(2, 4, 32, device=DEVICE), 2, 32)
    with pytest.raises(ValueError, match="dtype"):
        fused_gate_up_swiglu(x.to(torch.float64), torch.zeros(256, 64, device=DEVICE))


def test_fused_block_supported_dispatch():
    cpu_bf16 = torch.zeros(2, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not fused_block_supported(cpu_bf16)  # CPU never takes the fused path
    if ON_CUDA:
        x = cpu_bf16.cuda()
        with torch.no_grad():
            assert fused_block_supported(x)
            assert not fused_block_supported(x.float())
        with torch.inference_mode():
            assert fused_block_supported(x)
        assert not fused_block_supported(x)  # grad mode on: the ops have no backward


@pytest.mark.skipif(not ON_CUDA or INTERPRET, reason="torch.compile cannot trace Triton kernels under the interpreter")
def test_custom_ops_trace_without_graph_break():
    """fullgraph=True fails on any graph break; aot_eager traces the custom ops without Inductor."""
    torch.manual_seed(6)
    block, cos_sin, x = _block_setup(2, 7, 64, 2, torch.bfloat16)
    with torch.no_grad():
        eager = _fused_block(block, cos_sin, x)
        compiled = torch.compile(_fused_block, fullgraph=True, backend="aot_eager")(block, cos_sin, x)
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(not ON_CUDA or INTERPRET, reason="Inductor compiles the user Triton kernels on CUDA only")
def test_inductor_compiled_block_matches_eager_fused_block():
    torch.manual_seed(7)
    block, cos_sin, x = _block_setup(16, 82, 512, 8, torch.bfloat16)  # the Sudoku block, small batch
    with torch.no_grad():
        ref = _reference_block(block, cos_sin, x)
        eager = _fused_block(block, cos_sin, x)
        compiled = torch.compile(_fused_block, fullgraph=True)(block, cos_sin, x)
        compiled_ref = torch.compile(_reference_block, fullgraph=True)(block, cos_sin, x)
    # Not bit-equal: Inductor compiles the attention half and the norms around the custom op without the
    # eager path's intermediate bf16 roundings. Compiling must move the fused block no further than it
    # moves the reference block (plus one bf16 ulp of the output scale for the luck of the draw).
    drift = (compiled.float() - eager.float()).abs().max().item()
    drift_ref = (compiled_ref.float() - ref.float()).abs().max().item()
    ulp = 2**-8 * ref.float().abs().max().item()
    assert drift <= 2 * drift_ref + ulp, f"compiled vs eager fused block {drift:.3e}; reference block {drift_ref:.3e}"
    rel = (eager.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert rel <= 3e-2, f"Sudoku-shaped block: max relative error {rel:.2e}"
