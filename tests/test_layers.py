"""Numerics of models/common.py and models/layers.py against independent formulas (numpy, float64)."""

import math

import numpy as np
import pytest
import torch

from models import layers
from models.common import trunc_normal_init_
from models.layers import (
    Attention,
    CastedEmbedding,
    CastedLinear,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary_pos_emb,
    attention,
    rms_norm,
)


def _truncated_normal_std_numeric(lower: float, upper: float) -> float:
    """Std of a standard normal truncated to [lower, upper], by numerical integration."""
    x = np.linspace(lower, upper, 400_001)
    pdf = np.exp(-0.5 * x**2)
    mass = np.trapezoid(pdf, x)
    mean = np.trapezoid(x * pdf, x) / mass
    return math.sqrt(np.trapezoid((x - mean) ** 2 * pdf, x) / mass)


# ---------------------------------------------------------------- truncated normal


@pytest.mark.parametrize("std, lower, upper", [(0.5, -2.0, 2.0), (1.0, -1.0, 3.0), (0.02, -2.0, 2.0)])
def test_trunc_normal_has_requested_std_and_bounds(std, lower, upper):
    torch.manual_seed(0)
    t = trunc_normal_init_(torch.empty(1_000_000, dtype=torch.float64), std=std, lower=lower, upper=upper)
    c = std / _truncated_normal_std_numeric(lower, upper)  # scale of the underlying (untruncated) normal
    assert t.std().item() == pytest.approx(std, rel=5e-3)
    assert t.min().item() >= lower * c - 1e-12
    assert t.max().item() <= upper * c + 1e-12
    # The bounds are actually reached (samples near both clip points), i.e. the clip is at lower·c / upper·c.
    assert t.min().item() == pytest.approx(lower * c, rel=1e-2)
    assert t.max().item() == pytest.approx(upper * c, rel=1e-2)


def test_trunc_normal_differs_from_torch_trunc_normal():
    # torch's helper truncates N(0, std) at ±2·std and so ends up with std ≈ 0.88·std; ours keeps std.
    torch.manual_seed(0)
    ours = trunc_normal_init_(torch.empty(400_000), std=1.0)
    theirs = torch.nn.init.trunc_normal_(torch.empty(400_000), std=1.0, a=-2.0, b=2.0)
    assert ours.std().item() == pytest.approx(1.0, rel=1e-2)
    assert theirs.std().item() == pytest.approx(_truncated_normal_std_numeric(-2, 2), rel=1e-2)


def test_trunc_normal_std_zero_fills_zeros():
    t = torch.full((5, 7), 3.0)
    assert trunc_normal_init_(t, std=0) is t
    assert torch.count_nonzero(t) == 0


def test_trunc_normal_bfloat16_in_place():
    torch.manual_seed(0)
    t = trunc_normal_init_(torch.empty(100_000, dtype=torch.bfloat16), std=1.0)
    assert t.dtype == torch.bfloat16
    assert t.float().std().item() == pytest.approx(1.0, rel=2e-2)


# ---------------------------------------------------------------- casted layers


def test_casted_linear_init_and_cast():
    torch.manual_seed(0)
    lin = CastedLinear(1024, 512, bias=True)
    assert lin.weight.dtype == torch.float32 and lin.weight.shape == (512, 1024)
    assert lin.weight.std().item() == pytest.approx(1 / math.sqrt(1024), rel=1e-2)  # truncated LeCun normal
    assert lin.weight.abs().max().item() <= 2 * (1 / math.sqrt(1024)) / _truncated_normal_std_numeric(-2, 2) + 1e-7
    assert torch.count_nonzero(lin.bias) == 0
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(3, 1024).to(torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    expected = x.double() @ lin.weight.to(torch.bfloat16).double().T + lin.bias.to(torch.bfloat16).double()
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)
    assert CastedLinear(4, 3, bias=False).bias is None


def test_casted_embedding_lookup_and_cast():
    torch.manual_seed(0)
    emb = CastedEmbedding(300, 256, init_std=0.1, cast_to=torch.bfloat16)
    assert emb.embedding_weight.dtype == torch.float32
    assert emb.embedding_weight.std().item() == pytest.approx(0.1, rel=2e-2)
    ids = torch.tensor([[0, 5, 299]], dtype=torch.int32)
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 256)
    assert torch.equal(out[0, 1], emb.embedding_weight[5].to(torch.bfloat16))


# ---------------------------------------------------------------- RMSNorm


def test_rms_norm_hand_values():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = rms_norm(x, variance_epsilon=1e-5)
    r = math.sqrt((9 + 16) / 2 + 1e-5)
    torch.testing.assert_close(out[0], torch.tensor([3 / r, 4 / r]))
    assert torch.equal(out[1], torch.zeros(2))  # eps keeps the zero vector finite


def test_rms_norm_matches_float64_formula_and_keeps_dtype():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 64) * 5
    expected = (x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)).float()
    torch.testing.assert_close(rms_norm(x, 1e-5), expected, rtol=1e-6, atol=1e-6)
    out_bf16 = rms_norm(x.to(torch.bfloat16), 1e-5)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), expected, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- RoPE


def test_rotary_tables():
    rope = RotaryEmbedding(dim=8, max_position_embeddings=5, base=10000.0)
    cos, sin = rope()
    assert cos.shape == (5, 8) and cos.dtype == torch.float32
    for pos in range(5):
        for j in range(8):
            angle = pos * 10000.0 ** (-2 * (j % 4) / 8)  # emb = cat(freqs, freqs)
            assert cos[pos, j].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin[pos, j].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert len(rope.state_dict()) == 0  # tables are non-persistent


def _rope_complex_reference(x: np.ndarray, base: float) -> np.ndarray:
    """Rotate pairs (x[i], x[i + D/2]) as complex numbers by pos·base^(-2i/D). x: [B, S, H, D]."""
    d = x.shape[-1]
    half = d // 2
    pos = np.arange(x.shape[1])[None, :, None, None]
    theta = pos * base ** (-2 * np.arange(half) / d)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_apply_rotary_matches_complex_rotation_and_is_relative():
    torch.manual_seed(0)
    b, s, h, d = 2, 6, 3, 8
    q = torch.randn(b, s, h, d)
    k = torch.randn(b, s, h, d)
    cos, sin = RotaryEmbedding(dim=d, max_position_embeddings=s, base=100.0)()
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    np.testing.assert_allclose(q_rot.numpy(), _rope_complex_reference(q.double().numpy(), 100.0), atol=1e-5)
    np.testing.assert_allclose(k_rot.numpy(), _rope_complex_reference(k.double().numpy(), 100.0), atol=1e-5)

    # Relative positions: the same vector pair at positions (m, n) and (m+2, n+2) has the same dot product.
    v = torch.randn(d)
    same = v.expand(1, s, 1, d).contiguous()
    r, _ = apply_rotary_pos_emb(same, same, cos, sin)
    w = torch.randn(d).expand(1, s, 1, d).contiguous()
    rw, _ = apply_rotary_pos_emb(w, w, cos, sin)
    assert torch.dot(r[0, 1, 0], rw[0, 3, 0]).item() == pytest.approx(
        torch.dot(r[0, 3, 0], rw[0, 5, 0]).item(), abs=1e-5
    )


def test_apply_rotary_casts_back():
    cos, sin = RotaryEmbedding(dim=4, max_position_embeddings=3, base=10000.0)()
    q = torch.randn(1, 3, 2, 4).to(torch.bfloat16)
    q_rot, k_rot = apply_rotary_pos_emb(q, q, cos, sin)
    assert q_rot.dtype == torch.bfloat16 and k_rot.dtype == torch.bfloat16


# ---------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("hidden, expansion, width", [(512, 4, 1536), (64, 4, 256), (384, 4, 1024), (512, 2.5, 1024)])
def test_swiglu_width(hidden, expansion, width):
    mlp = SwiGLU(hidden, expansion)
    assert mlp.gate_up_proj.weight.shape == (2 * width, hidden)
    assert mlp.down_proj.weight.shape == (hidden, width)


def test_swiglu_forward_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 4)  # width 256
    x = torch.randn(2, 3, 16)
    w_gate, w_up = mlp.gate_up_proj.weight[:256].double(), mlp.gate_up_proj.weight[256:].double()
    g, u = x.double() @ w_gate.T, x.double() @ w_up.T
    expected = (g * torch.sigmoid(g) * u) @ mlp.down_proj.weight.double().T
    torch.testing.assert_close(mlp(x).double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- attention


def _naive_attention(q, k, v, causal=False):
    """softmax(Q Kᵀ / √d) V in float64 on [B, S, H, D]."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)  # [B, S, H, D]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_attention_matches_naive(dtype, tol, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 16).to(dtype) for _ in range(3))
    out = attention(q, k, v, causal=causal)
    assert out.shape == (2, 7, 3, 16) and out.dtype == dtype
    torch.testing.assert_close(out.double(), _naive_attention(q, k, v, causal), rtol=tol, atol=tol)


def test_sdpa_grouped_kv_heads_match_repeated_heads():
    # 4 query heads sharing 2 key/value heads: query head i uses kv head i // 2.
    torch.manual_seed(0)
    q = torch.randn(2, 5, 4, 8)
    k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    expected = _naive_attention(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(attention(q, k, v).double(), expected, rtol=1e-5, atol=1e-5)


def test_attention_module_matches_naive_composition():
    torch.manual_seed(0)
    b, s, heads, hd = 2, 5, 2, 8
    attn = Attention(hidden_size=16, head_dim=hd, num_heads=heads, num_key_value_heads=heads)
    assert attn.qkv_proj.weight.shape == (3 * heads * hd, 16) and attn.qkv_proj.bias is None
    assert attn.o_proj.weight.shape == (16, heads * hd) and attn.o_proj.bias is None
    cos_sin = RotaryEmbedding(hd, s, 10000.0)()
    x = torch.randn(b, s, 16)

    qkv = (x @ attn.qkv_proj.weight.detach().T).view(b, s, 3, heads, hd)  # q, k, v in that order
    q = torch.from_numpy(_rope_complex_reference(qkv[:, :, 0].double().numpy(), 10000.0))
    k = torch.from_numpy(_rope_complex_reference(qkv[:, :, 1].double().numpy(), 10000.0))
    o = _naive_attention(q, k, qkv[:, :, 2]).reshape(b, s, heads * hd)
    expected = o @ attn.o_proj.weight.double().T
    torch.testing.assert_close(attn(cos_sin=cos_sin, hidden_states=x).double(), expected, rtol=1e-4, atol=1e-5)

    # Non-causal: changing the last token changes the output at the first position.
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(attn(cos_sin, x)[:, 0], attn(cos_sin, x2)[:, 0])
    # Without RoPE (learned positions) the module still works.
    assert attn(None, x).shape == (b, s, 16)


def test_attention_backend_constant_and_env_override(monkeypatch):
    assert layers.ATTENTION_BACKEND in ("fa3", "fa2", "sdpa")
    monkeypatch.setenv("HRM_ATTENTION_BACKEND", "sdpa")
    assert layers._select_attention_backend() == ("sdpa", None)
    monkeypatch.setenv("HRM_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="HRM_ATTENTION_BACKEND"):
        layers._select_attention_backend()
    for name, module in (("fa3", "flash_attn_interface"), ("fa2", "flash_attn")):
        monkeypatch.setenv("HRM_ATTENTION_BACKEND", name)
        try:
            __import__(module)
        except ImportError:
            with pytest.raises(ImportError, match=name):
                layers._select_attention_backend()
        else:
            assert layers._select_attention_backend()[0] == name


def _flash_attn_funcs():
    found = []
    for name, module in (("fa3", "flash_attn_interface"), ("fa2", "flash_attn")):
        try:
            found.append((name, __import__(module).flash_attn_func))
        except ImportError:
            pass
    return found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not _flash_attn_funcs(), reason="flash-attn not importable")
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_matches_sdpa(causal, monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 81, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    monkeypatch.setattr(layers, "_flash_attn_func", None)
    sdpa = attention(q, k, v, causal=causal)
    for _, func in _flash_attn_funcs():
        monkeypatch.setattr(layers, "_flash_attn_func", func)
        flash = attention(q, k, v, causal=causal)
        assert flash.shape == sdpa.shape
        torch.testing.assert_close(flash.float(), sdpa.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(flash.double(), _naive_attention(q, k, v, causal), rtol=3e-2, atol=3e-2)
