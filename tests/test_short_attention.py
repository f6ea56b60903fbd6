"""The short-sequence attention kernel (models/short_attention.py) against float64 attention and the portable path.

Runs on CUDA when present, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before Python
starts; tiny tiles, so every case has query-block tails); otherwise the kernel tests skip. The dispatch tests
(which calls take the kernel) run everywhere.
"""

import math

import pytest
import torch

import models.layers as layers
from models.layers import Attention, RotaryEmbedding, apply_rotary_pos_emb, attention
from models.triton_common import HAS_TRITON
from tests.helpers import INTERPRET, KERNEL
from tests.helpers import KERNEL_DEVICE as DEVICE
from tests.helpers import KERNEL_DTYPES as DTYPES

# The kernel rounds where the portable path does (q and k after RoPE, the output; P as flash attention does), so
# against float64 attention on the same upcast projection its error must stay within the portable path's own error
# times 1.5 plus a floor of a few units of that dtype's rounding, and under a hard cap.
FLOOR = {torch.bfloat16: 1e-3, torch.float16: 2e-4, torch.float32: 1e-6}
CAP = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}

# (batch, seq, query heads, key/value heads, head_dim, rope)
CASES = [
    (2, 1, 2, 2, 32, True),
    (2, 17, 2, 1, 32, True),  # grouped key/value heads
    (1, 82, 2, 2, 64, True),  # HRM's Sudoku length, a head of HRM's size
    (2, 33, 4, 2, 32, False),
    (1, 128, 1, 1, 32, True),  # the longest sequence the kernel takes
]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _inputs(batch, seq, heads, kv_heads, head_dim, rope, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    cos_sin = RotaryEmbedding(head_dim, seq, base=10000.0, device=DEVICE)() if rope else None
    return qkv, cos_sin


def _split(qkv, heads, kv_heads, head_dim):
    b, s, _ = qkv.shape
    qkv = qkv.view(b, s, heads + 2 * kv_heads, head_dim)  # [B, S, H+2K, D]
    return qkv[:, :, :heads], qkv[:, :, heads : heads + kv_heads], qkv[:, :, heads + kv_heads :]


def _float64_attention(qkv, cos_sin, heads, kv_heads, head_dim):
    """RoPE and softmax attention in float64 on the upcast projection; [B, S, H*D]."""
    q, k, v = (t.double() for t in _split(qkv.double(), heads, kv_heads, head_dim))
    if cos_sin is not None:
        cos, sin = (t.double()[: qkv.shape[1], None] for t in cos_sin)  # [S, 1, D]
        q = q * cos + layers.rotate_half(q) * sin
        k = k * cos + layers.rotate_half(k) * sin
    group = heads // kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return out.reshape(qkv.shape[0], qkv.shape[1], heads * head_dim)


def _portable_attention(qkv, cos_sin, heads, kv_heads, head_dim):
    """models/layers.py's path in the input dtype: RoPE (fp32, rounded), SDPA, reshape."""
    q, k, v = _split(qkv, heads, kv_heads, head_dim)
    if cos_sin is not None:
        cos, sin = (t[: qkv.shape[1]] for t in cos_sin)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if q.device.type == "cpu" and q.dtype != torch.float32:  # CPU SDPA in 16 bits: compute in fp32, round once
        out = attention(q.float(), k.float(), v.float()).to(q.dtype)
    else:
        out = attention(q, k, v)
    return out.reshape(qkv.shape[0], qkv.shape[1], heads * head_dim)


@KERNEL
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_s{}_h{}_kv{}_d{}_rope{}".format(*c))
def test_matches_float64_and_portable_attention(case, dtype):
    from models.short_attention import short_attention

    batch, seq, heads, kv_heads, head_dim, rope = case
    for seed in (0, 1):  # fresh inputs: the kernel must compute the same function on any input
        qkv, cos_sin = _inputs(batch, seq, heads, kv_heads, head_dim, rope, dtype, seed)
        with torch.no_grad():
            out = short_attention(qkv, cos_sin, heads, kv_heads, head_dim)
        assert out.shape == (batch, seq, heads * head_dim) and out.dtype == dtype
        assert torch.isfinite(out).all(), "non-finite or unwritten output"
        exact = _float64_attention(qkv, cos_sin, heads, kv_heads, head_dim)
        rel = _rel(out, exact)
        portable_rel = _rel(_portable_attention(qkv, cos_sin, heads, kv_heads, head_dim), exact)
        assert rel <= min(CAP[dtype], 1.5 * portable_rel + FLOOR[dtype]), (
            f"seed {seed}: error vs float64 {rel:.2e}, the portable path's {portable_rel:.2e}"
        )


@KERNEL
def test_launch_choices_change_no_result():
    """The persistent launch: one program looping over every work item, several, prefetching the next item or not,
    all give the same bits for a query-block size; each query-block size stays within the float64 bound."""
    from models.short_attention import Tiles, short_attention

    batch, seq, heads, kv_heads, head_dim, dtype = 2, 37, 4, 2, 32, DTYPES[0]
    qkv, cos_sin = _inputs(batch, seq, heads, kv_heads, head_dim, True, dtype, 7)
    exact = _float64_attention(qkv, cos_sin, heads, kv_heads, head_dim)
    portable_rel = _rel(_portable_attention(qkv, cos_sin, heads, kv_heads, head_dim), exact)
    with torch.no_grad():
        for block_m in (16, 64):  # 64 covers the sequence in one block (capped at the 64-key tile)
            outs = [
                short_attention(qkv, cos_sin, heads, kv_heads, head_dim, Tiles(block_m, 4, programs, prefetch))
                for programs in (1, 3)
                for prefetch in (False, True)
            ]
            assert all(torch.equal(out, outs[0]) for out in outs[1:]), f"block_m {block_m}: launch changed bits"
            rel = _rel(outs[0], exact)
            assert rel <= min(CAP[dtype], 1.5 * portable_rel + FLOOR[dtype]), f"block_m {block_m}: {rel:.2e}"


@KERNEL
def test_opaque_and_traced_ops_run_the_same_kernel(monkeypatch):
    """`HRM_SHORT_ATTENTION_OP` only changes how torch.compile sees the kernel: the opaque custom op (the default)
    and the traced triton_op give the same bits, called directly and from a function torch.compile traced whole."""
    import models.short_attention as sa

    batch, seq, heads, kv_heads, head_dim, dtype = 2, 37, 4, 2, 32, DTYPES[0]
    qkv, cos_sin = _inputs(batch, seq, heads, kv_heads, head_dim, True, dtype, 11)
    assert sa.OP == "custom_op"
    outs = {}
    with torch.no_grad():
        for op in ("custom_op", "triton_op"):
            monkeypatch.setattr(sa, "OP", op)
            outs[op] = sa.short_attention(qkv, cos_sin, heads, kv_heads, head_dim)
        assert torch.equal(outs["custom_op"], outs["triton_op"])
        monkeypatch.setattr(sa, "OP", "custom_op")
        compiled = torch.compile(lambda q: sa.short_attention(q, cos_sin, heads, kv_heads, head_dim), fullgraph=True)
        assert torch.equal(compiled(qkv), outs["custom_op"])


@pytest.mark.parametrize("variable", ["HRM_SHORT_ATTENTION_OP", "HRM_TOKEN_MIX_OP"])
def test_op_choice_from_the_environment_is_checked(tmp_path, variable):
    """`HRM_SHORT_ATTENTION_OP` and `HRM_TOKEN_MIX_OP` take custom_op or triton_op (any case; each kernel has its own
    default); anything else stops the launcher before any work with one `error:` line."""
    import os
    import subprocess
    import sys

    import models.short_attention
    import models.token_mix
    from models.triton_common import parse_op
    from tests.helpers import REPO

    assert models.short_attention.OP == "custom_op" and models.token_mix.OP == "triton_op"
    assert parse_op("", variable, "custom_op") == "custom_op" and parse_op(" Triton_Op ", variable, "x") == "triton_op"
    with pytest.raises(ValueError, match=f"{variable}='inductor': expected custom_op or triton_op"):
        parse_op("inductor", variable, "custom_op")
    env = os.environ | {variable: "inductor"}
    cmd = [sys.executable, str(REPO / "pretrain.py"), f"data_path={tmp_path}", "device=cpu"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and lines[-1].startswith(f"error: {variable}='inductor'"), out.stderr
    assert "Traceback" not in out.stderr


def test_tiles_from_the_environment_are_checked():
    """`HRM_SHORT_ATTENTION_TILES` is four numbers; anything else is refused with the expected form, and the
    query block never exceeds the key tile of the sequence."""
    from models.short_attention import Tiles, key_block, parse_tiles

    assert parse_tiles("") == Tiles() and parse_tiles("128:8:1:0") == Tiles(128, 8, 1, False)
    assert Tiles(128, 8, 1, False).spec() == "128:8:1:0" and parse_tiles(Tiles().spec()) == Tiles()
    for bad in ("64:4:2", "64:4:2:yes", "48:4:2:1", "64:3:2:1", "64:4:0:1", "64:4:2:2", "-64:4:2:1"):
        with pytest.raises(ValueError, match="HRM_SHORT_ATTENTION_TILES="):
            parse_tiles(bad)
    assert [key_block(s) for s in (1, 16, 17, 82, 97, 128)] == [16, 16, 32, 128, 128, 128]
    assert Tiles(128, 4, 2, True).for_sequence(20).block_m == 32
    assert Tiles(64, 4, 2, True).for_sequence(82).block_m == 64


def test_bad_tiles_reach_the_launcher_as_one_error_line(tmp_path):
    """A malformed `HRM_SHORT_ATTENTION_TILES` stops the launcher before any work, with one `error:` line."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    env = os.environ | {"HRM_SHORT_ATTENTION_TILES": "64x4"}
    cmd = [sys.executable, str(REPO / "pretrain.py"), f"data_path={tmp_path}", "device=cpu"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and lines[-1].startswith("error: HRM_SHORT_ATTENTION_TILES='64x4'"), out.stderr
    assert "Traceback" not in out.stderr


@KERNEL
def test_strided_projection_and_bad_shapes():
    """A non-contiguous qkv (a slice of a wider buffer) gives the same result; inconsistent head counts and too
    long sequences are refused with the numbers."""
    from models.short_attention import short_attention

    heads, head_dim, dtype = 2, 32, DTYPES[0]
    wide, cos_sin = _inputs(2, 9, heads, heads, head_dim, True, dtype, 3)
    width = wide.shape[-1]
    padded = torch.cat([wide, wide[..., :8]], dim=-1)[..., :width]  # row stride width + 8
    with torch.no_grad():
        assert torch.equal(
            short_attention(padded, cos_sin, heads, heads, head_dim),
            short_attention(wide, cos_sin, heads, heads, head_dim),
        )
        with pytest.raises(ValueError, match="does not match 3 query and 3 key/value heads of 32"):
            short_attention(wide, cos_sin, 3, 3, head_dim)
        narrow, _ = _inputs(1, 4, 1, 1, 16, False, dtype, 4)
        with pytest.raises(ValueError, match="head_dim 16 not supported"):  # Triton's dot needs 16 per half
            short_attention(narrow, None, 1, 1, 16)
        too_long, _ = _inputs(1, 129, 1, 1, 32, False, dtype, 5)
        with pytest.raises(ValueError, match="129 > 128"):
            short_attention(too_long, None, 1, 1, 32)


def test_attention_dispatches_no_grad_short_calls(monkeypatch):
    """Attention.forward routes a call to the kernel exactly when short_attention_supported says so, passing the raw
    projection, and feeds the kernel's [B, S, H*D] output to o_proj."""
    calls = []

    def fake_kernel(qkv, cos_sin, heads, kv_heads, head_dim):
        calls.append((tuple(qkv.shape), heads, kv_heads, head_dim))
        return torch.zeros(qkv.shape[0], qkv.shape[1], heads * head_dim, dtype=qkv.dtype)

    monkeypatch.setattr(layers, "short_attention", fake_kernel)
    monkeypatch.setattr(layers, "short_attention_supported", lambda qkv, head_dim, causal: not torch.is_grad_enabled())
    attn = Attention(hidden_size=32, head_dim=8, num_heads=4, num_key_value_heads=4)
    x = torch.randn(2, 5, 32)
    with_grad = attn(cos_sin=None, hidden_states=x)
    assert not calls and with_grad.abs().sum() > 0
    with torch.no_grad():
        routed = attn(cos_sin=None, hidden_states=x)
    assert calls == [((2, 5, 96), 4, 4, 8)]
    assert torch.equal(routed, torch.zeros_like(routed))  # o_proj of the kernel's zeros (no bias)


def test_supported_only_where_the_kernel_applies(monkeypatch):
    from models import short_attention as sa

    x = torch.zeros(1, 4, 96, dtype=torch.bfloat16, device=DEVICE)
    monkeypatch.setattr(sa, "ENABLED", True)
    if not HAS_TRITON:
        with torch.no_grad():
            assert not sa.short_attention_supported(x, 32, False)
        return
    on_device = DEVICE.type == "cuda" or INTERPRET
    with torch.no_grad():
        assert sa.short_attention_supported(x, 32, False) == on_device
        assert not sa.short_attention_supported(x, 32, True)  # causal
        assert not sa.short_attention_supported(x, 16, False)  # halves narrower than Triton's dot takes
        assert not sa.short_attention_supported(x, 24, False)  # head_dim not a power of two
        assert not sa.short_attention_supported(x.float(), 32, False)  # fp32 activations
        assert not sa.short_attention_supported(torch.zeros(1, 129, 96, dtype=torch.bfloat16, device=DEVICE), 32, False)
        monkeypatch.setattr(sa, "ENABLED", False)  # not measured faster: only with HRM_KERNELS=all
        assert not sa.short_attention_supported(x, 32, False)
    monkeypatch.setattr(sa, "ENABLED", True)
    assert not sa.short_attention_supported(x, 32, False)  # grad mode on
