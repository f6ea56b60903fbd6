"""TRM: names and state-dict keys, parameter counts, initialisation and its RNG order, the recursion against a
float64 re-derivation of TRM's equations (values and gradients over ACT steps), its halting rule in both modes,
the loss head, two optimizer steps, config errors. The ACT wrapper it shares with HRM: tests/test_act.py."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from models.common import trunc_normal_init_
from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1Block, HierarchicalReasoningModel_ACTV1Config
from models.losses import IGNORE_LABEL_ID, ACTLossHead
from models.recursive_reasoning.trm import (
    TinyRecursiveReasoningModel_ACTV1,
    TinyRecursiveReasoningModel_ACTV1_Inner,
    TinyRecursiveReasoningModel_ACTV1Block,
    TinyRecursiveReasoningModel_ACTV1Config,
    TinyRecursiveReasoningModel_ACTV1ReasoningModule,
)
from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
from tests.helpers import REPO, arch_config, randomise, run_steps
from tests.helpers import set_q_bias as set_q_head
from tests.helpers import trm_build as build
from tests.helpers import trm_make_batch as make_batch
from tests.helpers import trm_tiny_config as tiny_config
from utils.functions import get_model_source_path, load_model_class
from utils.optimizers import AdamATan2

TRM_ID = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"

# config/arch/trm.yaml on the Sudoku shape (vocab 11, 81 cells), plus the key the launcher passes along.
SUDOKU = arch_config("trm", batch_size=2, seq_len=81, vocab_size=11, num_puzzle_identifiers=3, causal=False)
SUDOKU_MLP_T = {**SUDOKU, "mlp_t": True, "pos_encodings": "none"}  # TRM's README Sudoku command


def swiglu_width(hidden: int, expansion: float) -> int:
    return -(round(expansion * hidden * 2 / 3) // -256) * 256


# ---------------------------------------------------------------- configs


def compose_arch(*overrides: str) -> dict:
    """The `arch` section as the launcher composes it (Hydra, config/cfg_pretrain.yaml)."""
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        cfg = compose(config_name="cfg_pretrain", overrides=list(overrides))
    return OmegaConf.to_container(cfg.arch, resolve=True)


def test_trm_yaml_is_trms_architecture():
    arch = compose_arch("arch=trm")
    assert arch == {
        "name": TRM_ID,
        "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"},
        "halt_exploration_prob": 0.1,
        "halt_max_steps": 16,
        "H_cycles": 3,
        "L_cycles": 6,
        "H_layers": 0,
        "L_layers": 2,
        "hidden_size": 512,
        "num_heads": 8,
        "expansion": 4,
        "puzzle_emb_ndim": 512,
        "pos_encodings": "rope",
        "forward_dtype": "bfloat16",
        "mlp_t": False,
        "puzzle_emb_len": 16,
        "no_ACT_continue": True,
    }


@pytest.mark.parametrize(
    "overrides", [("arch=trm_tiny",), ("arch=trm_tiny", "arch.mlp_t=True", "arch.pos_encodings=none")]
)
def test_tiny_arch_builds_from_the_launchers_keys(overrides):
    arch = compose_arch(*overrides)
    model_keys = {k: v for k, v in arch.items() if k not in ("name", "loss")}
    assert model_keys["forward_dtype"] == "float32"
    launcher = dict(batch_size=2, vocab_size=6, seq_len=8, num_puzzle_identifiers=3, causal=False)
    model = load_model_class(arch["name"])({**model_keys, **launcher})
    head = load_model_class(arch["loss"]["name"])(model, loss_type=arch["loss"]["loss_type"])
    batch = make_batch({**launcher, "vocab_size": 6}, 0)
    _, loss, _, _, _ = head(return_keys=[], carry=head.initial_carry(batch), batch=batch)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- names, keys, parameter counts


def test_identifiers_resolve():
    assert load_model_class(TRM_ID) is TinyRecursiveReasoningModel_ACTV1
    assert load_model_class("losses@ACTLossHead", prefix="models.") is ACTLossHead
    assert get_model_source_path(TRM_ID).endswith("models/recursive_reasoning/trm.py")


@pytest.fixture(scope="module")
def sudoku_attention() -> TinyRecursiveReasoningModel_ACTV1:
    return build(SUDOKU)


@pytest.fixture(scope="module")
def sudoku_mlp_t() -> TinyRecursiveReasoningModel_ACTV1:
    return build(SUDOKU_MLP_T)


def test_parameter_counts_sudoku(sudoku_attention, sudoku_mlp_t):
    d, v = 512, 11
    m = swiglu_width(d, 4)  # 1536
    io = 2 * v * d + (2 * d + 2)  # token embedding, lm_head, q_head (weight + bias)
    attention = sum(p.numel() for p in sudoku_attention.parameters())
    assert attention == 6_828_034
    assert attention == 2 * (4 * d * d + 3 * m * d) + io

    tokens = 81 + 16
    m_t = swiglu_width(tokens, 4)  # 512
    mlp_t = sum(p.numel() for p in sudoku_mlp_t.parameters())
    assert mlp_t == 5_028_866
    assert mlp_t == 2 * (3 * m_t * tokens + 3 * m * d) + io
    # The puzzle table is a buffer with its own optimizer, not a parameter.
    for model in (sudoku_attention, sudoku_mlp_t):
        assert all("puzzle_emb" not in name for name, _ in model.named_parameters())


def expected_shapes(cfg: dict) -> dict[str, tuple]:
    d, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_puzzle_identifiers"]
    ndim, plen = cfg["puzzle_emb_ndim"], cfg["puzzle_emb_len"]
    prefix = plen if plen > 0 else math.ceil(ndim / d)
    tokens = cfg["seq_len"] + prefix
    m = swiglu_width(d, cfg["expansion"])
    shapes = {
        "model.inner.embed_tokens.embedding_weight": (v, d),
        "model.inner.lm_head.weight": (v, d),
        "model.inner.q_head.weight": (2, d),
        "model.inner.q_head.bias": (2,),
        "model.inner.H_init": (d,),
        "model.inner.L_init": (d,),
    }
    for i in range(cfg["L_layers"]):
        prefix_key = f"model.inner.L_level.layers.{i}."
        if cfg["mlp_t"]:
            m_t = swiglu_width(tokens, cfg["expansion"])
            shapes[prefix_key + "mlp_t.gate_up_proj.weight"] = (2 * m_t, tokens)
            shapes[prefix_key + "mlp_t.down_proj.weight"] = (tokens, m_t)
        else:
            shapes[prefix_key + "self_attn.qkv_proj.weight"] = (3 * d, d)
            shapes[prefix_key + "self_attn.o_proj.weight"] = (d, d)
        shapes[prefix_key + "mlp.gate_up_proj.weight"] = (2 * m, d)
        shapes[prefix_key + "mlp.down_proj.weight"] = (d, m)
    if ndim > 0:
        shapes["model.inner.puzzle_emb.weights"] = (n, ndim)
    if cfg["pos_encodings"] == "learned":
        shapes["model.inner.embed_pos.embedding_weight"] = (tokens, d)
    return shapes


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mlp_t": True, "pos_encodings": "none"},
        {"mlp_t": True},  # rope tables are non-persistent: no key
        {"pos_encodings": "learned"},
        {"puzzle_emb_ndim": 0},  # no table; the 16 prefix rows stay (all zero)
        {"puzzle_emb_ndim": 0, "puzzle_emb_len": 0},
        {"puzzle_emb_len": 0, "pos_encodings": "learned"},  # HRM's prefix: ceil(512 / 512) = 1 row
        {"puzzle_emb_len": 0, "puzzle_emb_ndim": 600, "mlp_t": True},  # ceil(600 / 512) = 2 rows
    ],
    ids=["attention", "mlp_t_none", "mlp_t_rope", "learned", "ndim0", "ndim0_len0", "len0_learned", "len0_mlp_t"],
)
def test_state_dict_keys_and_shapes(overrides, sudoku_attention, sudoku_mlp_t):
    cfg = {**SUDOKU, **overrides}
    if overrides == {}:
        model = sudoku_attention
    elif overrides == {"mlp_t": True, "pos_encodings": "none"}:
        model = sudoku_mlp_t
    else:
        model = build(cfg)
    state = ACTLossHead(model, "stablemax_cross_entropy").state_dict()
    assert {k: tuple(t.shape) for k, t in state.items()} == expected_shapes(cfg)
    assert all(".H_level." not in k for k in state)
    assert state["model.inner.H_init"].dtype == torch.bfloat16  # the forward dtype
    assert all(t.dtype == torch.float32 for k, t in state.items() if not k.endswith("_init"))
    assert (getattr(model, "puzzle_emb", None) is not None) == (cfg["puzzle_emb_ndim"] > 0)


def test_class_structure(sudoku_attention):
    inner = sudoku_attention.inner
    assert isinstance(inner, TinyRecursiveReasoningModel_ACTV1_Inner)
    assert isinstance(inner.L_level, TinyRecursiveReasoningModel_ACTV1ReasoningModule)
    assert all(isinstance(b, TinyRecursiveReasoningModel_ACTV1Block) for b in inner.L_level.layers)
    assert not hasattr(inner, "H_level")
    assert isinstance(sudoku_attention.config, TinyRecursiveReasoningModel_ACTV1Config)
    assert sudoku_attention.puzzle_emb is inner.puzzle_emb


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("variant", ["attention", "mlp_t"])
def test_initialisation_statistics(variant, sudoku_attention, sudoku_mlp_t):
    model = sudoku_attention if variant == "attention" else sudoku_mlp_t
    inner = model.inner
    # Truncated LeCun normal at ±2 std, rescaled (JAX's convention) so that the std is exactly 1/√fan_in.
    clip = 2 / 0.87962566103423978  # 2·c, c = 1 / std of a standard normal truncated at ±2
    checked = 0
    for name, p in inner.named_parameters():
        if name.startswith("q_head"):
            continue
        std = 1 / math.sqrt(p.shape[1]) if not name.startswith("embed_tokens") else 1 / math.sqrt(512)
        w = p.detach().double()
        tol = 5 / math.sqrt(2 * w.numel())  # 5 sampling sigmas of a std estimate
        assert w.std().item() == pytest.approx(std, rel=tol), name
        assert abs(w.mean().item()) < 5 * std / math.sqrt(w.numel()), name
        assert w.abs().max().item() <= clip * std * (1 + 1e-6), name
        assert w.abs().max().item() > 0.9 * clip * std, name  # the tails reach the clip
        checked += 1
    assert checked == 2 + 2 * 4
    assert torch.count_nonzero(inner.q_head.weight) == 0
    assert inner.q_head.bias.tolist() == [-5.0, -5.0]
    assert tuple(inner.puzzle_emb.weights.shape) == (3, 512) and torch.count_nonzero(inner.puzzle_emb.weights) == 0
    for state in (inner.H_init, inner.L_init):
        assert state.dtype == torch.bfloat16
        assert state.float().std().item() == pytest.approx(1.0, rel=0.15)
        assert state.float().abs().max().item() <= clip * 1.01
    assert not torch.equal(inner.H_init, inner.L_init)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"mlp_t": True, "pos_encodings": "none"}, {"pos_encodings": "learned", "forward_dtype": "bfloat16"}],
    ids=["attention", "mlp_t", "learned_bf16"],
)
def test_construction_replays_trm_rng_order(overrides):
    """One seed gives TRM's weights: the draws happen in TRM's construction order, written out here."""
    cfg = tiny_config(**overrides)
    model = build(cfg, seed=5)
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    tokens = cfg["seq_len"] + cfg["puzzle_emb_len"]
    m = swiglu_width(d, cfg["expansion"])
    dtype = getattr(torch, cfg["forward_dtype"])

    torch.manual_seed(5)
    draw = lambda *shape, std, dtype=torch.float32: trunc_normal_init_(torch.empty(shape, dtype=dtype), std=std)
    expected = {
        "embed_tokens.embedding_weight": draw(v, d, std=d**-0.5),
        "lm_head.weight": draw(v, d, std=d**-0.5),
        "q_head.weight": draw(2, d, std=d**-0.5),  # drawn, then zeroed at the end
    }
    # The puzzle table is zero-initialised (no draw); RoPE tables are computed.
    if cfg["pos_encodings"] == "learned":
        expected["embed_pos.embedding_weight"] = draw(tokens, d, std=d**-0.5)
    for i in range(cfg["L_layers"]):
        if cfg.get("mlp_t"):
            m_t = swiglu_width(tokens, cfg["expansion"])
            expected[f"L_level.layers.{i}.mlp_t.gate_up_proj.weight"] = draw(2 * m_t, tokens, std=tokens**-0.5)
            expected[f"L_level.layers.{i}.mlp_t.down_proj.weight"] = draw(tokens, m_t, std=m_t**-0.5)
        else:
            expected[f"L_level.layers.{i}.self_attn.qkv_proj.weight"] = draw(3 * d, d, std=d**-0.5)
            expected[f"L_level.layers.{i}.self_attn.o_proj.weight"] = draw(d, d, std=d**-0.5)
        expected[f"L_level.layers.{i}.mlp.gate_up_proj.weight"] = draw(2 * m, d, std=d**-0.5)
        expected[f"L_level.layers.{i}.mlp.down_proj.weight"] = draw(d, m, std=m**-0.5)
    expected["H_init"] = draw(d, std=1, dtype=dtype)
    expected["L_init"] = draw(d, std=1, dtype=dtype)
    expected["q_head.weight"] = torch.zeros(2, d)
    expected["q_head.bias"] = torch.full((2,), -5.0)
    expected["puzzle_emb.weights"] = torch.zeros(cfg["num_puzzle_identifiers"], cfg["puzzle_emb_ndim"])

    state = model.inner.state_dict()
    assert set(state) == set(expected)
    for k, t in expected.items():
        assert torch.equal(state[k], t), k


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"hiden_size": 16}, "unknown key 'arch.hiden_size'"),
        ({"mlpt": True}, "unknown key 'arch.mlpt'"),
        ({"causal": True}, "causal=True: this model attends bidirectionally only"),
        ({"forward_dtype": "float33"}, "forward_dtype"),
        ({"H_cycles": 0}, "H_cycles"),
        ({"L_layers": 0}, "L_layers"),
        ({"puzzle_emb_len": -1}, "puzzle_emb_len"),
        ({"hidden_size": 18, "num_heads": 4}, "num_heads"),
        ({"hidden_size": 18, "num_heads": 2}, "even for rope"),  # head dim 9: RoPE rotates pairs
        ({"puzzle_emb_ndim": 40, "puzzle_emb_len": 2}, "puzzle_emb_ndim"),  # 40 > 2 rows of 16
        ({"vocab_size": "eleven"}, "vocab_size"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, named):
    with pytest.raises(ValueError, match=named) as info:
        TinyRecursiveReasoningModel_ACTV1(tiny_config(**overrides))
    message = str(info.value)
    assert "\n" not in message and message.startswith("TinyRecursiveReasoningModel_ACTV1 config: ")


def test_missing_field_named():
    cfg = tiny_config()
    del cfg["L_cycles"]
    with pytest.raises(ValueError, match="key .arch.L_cycles. is required"):
        TinyRecursiveReasoningModel_ACTV1(cfg)


def test_defaults_and_launcher_keys():
    cfg = tiny_config()
    for key in ("puzzle_emb_len", "forward_dtype"):
        del cfg[key]
    model = TinyRecursiveReasoningModel_ACTV1({**cfg, "causal": False, "H_layers": 0})
    defaults = {"mlp_t": False, "puzzle_emb_len": 16, "no_ACT_continue": True, "forward_dtype": "bfloat16"}
    assert {k: getattr(model.config, k) for k in defaults} == defaults
    assert model.config.fused_ops is False and not hasattr(model.config, "causal")
    # mlp_t without rope does not use heads: a width that is not a multiple of num_heads is fine.
    TinyRecursiveReasoningModel_ACTV1(tiny_config(mlp_t=True, pos_encodings="none", hidden_size=18, num_heads=4))


# ---------------------------------------------------------------- embeddings and position encodings


@pytest.mark.parametrize(
    "overrides, prefix",
    [
        ({"puzzle_emb_ndim": 20, "puzzle_emb_len": 3}, 3),  # 20 values in 3 rows of 16: padded with 28 zeros
        ({"puzzle_emb_ndim": 20, "puzzle_emb_len": 0}, 2),  # HRM's ceil(20 / 16)
        ({"puzzle_emb_ndim": 0, "puzzle_emb_len": 2}, 2),  # no table: zero rows
        ({"puzzle_emb_ndim": 0, "puzzle_emb_len": 0}, 0),
        ({"puzzle_emb_ndim": 16, "puzzle_emb_len": 2, "pos_encodings": "learned"}, 2),
    ],
)
def test_input_embeddings_layout(overrides, prefix):
    cfg = tiny_config(**overrides)
    model = build(cfg).eval()
    randomise(model)
    inner = model.inner
    assert inner.puzzle_emb_len == prefix
    batch = make_batch(cfg, 1)
    with torch.no_grad():
        emb = inner._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    assert emb.shape == (4, 6 + prefix, 16)

    tokens = inner.embed_tokens.embedding_weight[batch["inputs"].long()]  # [B, S, d]
    flat = torch.zeros(4, prefix * 16)
    if cfg["puzzle_emb_ndim"]:
        flat[:, : cfg["puzzle_emb_ndim"]] = inner.puzzle_emb.weights[batch["puzzle_identifiers"].long()]
    expected = torch.cat([flat.view(4, prefix, 16), tokens], dim=1)
    if cfg["pos_encodings"] == "learned":
        expected = 0.707106781 * (expected + inner.embed_pos.embedding_weight)
    torch.testing.assert_close(emb, 4.0 * expected)  # scaled by √hidden


@pytest.mark.parametrize("pos_encodings, has_tables", [("rope", True), ("learned", False), ("none", False)])
def test_position_encodings_reach_the_blocks(pos_encodings, has_tables):
    model = build(tiny_config(pos_encodings=pos_encodings)).eval()
    inner = model.inner
    assert hasattr(inner, "rotary_emb") == (pos_encodings == "rope")
    assert hasattr(inner, "embed_pos") == (pos_encodings == "learned")
    seen = []
    inner.L_level.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["cos_sin"]), with_kwargs=True
    )
    batch = make_batch(tiny_config(), 2)
    model(model.initial_carry(batch), batch)
    assert len(seen) == 2 * (2 + 1)
    if has_tables:
        cos, sin = seen[0]
        assert cos.shape == (6 + 2, 8)  # positions (prefix included) x head dim
    else:
        assert all(cs is None for cs in seen)


# ---------------------------------------------------------------- blocks


def test_attention_block_is_hrms_block():
    """TRM's attention variant and HRM's block are one definition: same weights, same output, same keys."""
    trm_cfg = TinyRecursiveReasoningModel_ACTV1Config(**tiny_config())
    trm_only = ("mlp_t", "puzzle_emb_len", "no_ACT_continue")  # HRM's config refuses TRM's own keys
    hrm_values = {k: v for k, v in tiny_config().items() if k not in trm_only}
    hrm_cfg = HierarchicalReasoningModel_ACTV1Config(**{**hrm_values, "H_layers": 1})
    torch.manual_seed(0)
    trm_block = TinyRecursiveReasoningModel_ACTV1Block(trm_cfg)
    torch.manual_seed(0)
    hrm_block = HierarchicalReasoningModel_ACTV1Block(hrm_cfg)
    assert list(trm_block.state_dict()) == list(hrm_block.state_dict())
    for a, b in zip(trm_block.state_dict().values(), hrm_block.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(3, 8, 16)
    cos_sin = build(tiny_config()).inner.rotary_emb()
    assert torch.equal(trm_block(cos_sin=cos_sin, hidden_states=x), hrm_block(cos_sin=cos_sin, hidden_states=x))


def test_mlp_t_block_mixes_tokens_and_normalises_over_positions():
    cfg = TinyRecursiveReasoningModel_ACTV1Config(**tiny_config(mlp_t=True, pos_encodings="none"))
    torch.manual_seed(0)
    block = TinyRecursiveReasoningModel_ACTV1Block(cfg)
    assert block.mlp_t.gate_up_proj.weight.shape[1] == 8  # the SwiGLU acts on the 6 + 2 positions
    mid = []
    block.mlp.register_forward_pre_hook(lambda module, args: mid.append(args[0]))
    x = torch.randn(3, 8, 16)
    out = block(cos_sin=None, hidden_states=x)

    # After the token-mixing sub-layer every channel has unit RMS over the positions (dim 1), not over channels.
    rms_over_positions = mid[0].pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms_over_positions, torch.ones(3, 16), rtol=1e-4, atol=0)
    assert not torch.allclose(mid[0].pow(2).mean(dim=2).sqrt(), torch.ones(3, 8), rtol=0.05)
    # Formula: y = rms_L(x + W2 swiglu over L); out = rms_D(y + mlp(y)).
    w = {n: p.detach().double() for n, p in block.named_parameters()}
    xt = x.double().transpose(1, 2)  # [B, D, L]
    yt = ref_rms_norm(xt + ref_swiglu(xt, w["mlp_t.gate_up_proj.weight"], w["mlp_t.down_proj.weight"]))
    y = yt.transpose(1, 2)
    expected = ref_rms_norm(y + ref_swiglu(y, w["mlp.gate_up_proj.weight"], w["mlp.down_proj.weight"]))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # Rows mix positions: changing one position changes every position's output.
    x2 = x.clone()
    x2[:, 3] += 1.0
    assert (block(cos_sin=None, hidden_states=x2) - out).abs().amax(dim=2).min() > 0


def test_mlp_t_in_place_layout_matches_trms_transposed_layout(monkeypatch):
    """The GPU's [B, L, D] form of the mlp_t sub-layer (weights multiplied from the left, gate/up weight read
    through a row-padded view, RMSNorm over dim 1) computes TRM's transposed form: float32 outputs and
    gradients within 1e-6 relative over whole ACT steps, on the CPU where both can run."""
    import models.layers

    cfg = tiny_config(mlp_t=True, pos_encodings="none", H_cycles=2, L_cycles=2, seq_len=7)  # 7 + 2 rows: unaligned
    results = {}
    for in_place in (False, True):
        monkeypatch.setattr(models.layers, "_token_mix_in_place", lambda x, flag=in_place: flag)
        model = build(cfg).train()
        batch = make_batch(cfg, 3)
        carry = model.initial_carry(batch)
        for _ in range(2):
            carry, outputs = model(carry, batch)
        loss = outputs["logits"].square().mean() + outputs["q_halt_logits"].sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[in_place] = (outputs["logits"].detach(), carry.inner_carry.z_H, grads)
    (ref_logits, ref_state, ref_grads), (logits, state, grads) = results[False], results[True]
    assert_float32_close(logits, ref_logits.double(), "logits", rel=1e-6)
    assert_float32_close(state, ref_state.double(), "z_H", rel=1e-6)
    assert grads.keys() == ref_grads.keys() and "inner.L_level.layers.0.mlp_t.gate_up_proj.weight" in grads
    for name, grad in grads.items():
        assert_float32_close(grad, ref_grads[name].double(), name, rel=1e-6)


def test_swiglu_over_dim1_is_the_transposed_swiglu():
    """SwiGLU.forward_over_dim1 equals the SwiGLU applied to the transposed input, transposed back (float32)."""
    from models.layers import SwiGLU

    torch.manual_seed(0)
    mix = SwiGLU(hidden_size=97, expansion=4.0)  # TRM's Sudoku width: 81 cells + 16 prefix rows, misaligned rows
    x = torch.randn(3, 97, 24)
    expected = mix(x.transpose(1, 2)).transpose(1, 2)
    assert_float32_close(mix.forward_over_dim1(x), expected.double(), "token mix", rel=1e-6)


@pytest.mark.parametrize("mlp_t", [False, True])
@pytest.mark.parametrize("by_default", [False, True])
def test_fused_ops_dispatch(monkeypatch, mlp_t, by_default):
    """fused_ops, or the default on Hopper (`by_default`), routes no-grad block calls' channel SwiGLU to the fused
    kernel, for both token mixers (CUDA-only, so simulated here by the same math in PyTorch: the outputs stay
    those of the unfused model)."""
    import models.layers

    monkeypatch.setattr(models.layers, "_FUSED_SWIGLU_BY_DEFAULT", by_default)

    calls = []

    def fake_fused(x, w_gate_up):
        calls.append(torch.is_grad_enabled())
        gate, up = torch.nn.functional.linear(x, w_gate_up.to(x.dtype)).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    monkeypatch.setattr(models.layers, "fused_block_supported", lambda x: not torch.is_grad_enabled())
    monkeypatch.setattr(models.layers, "fused_gate_up_swiglu", fake_fused)
    logits = []
    for flag in (False, True):
        cfg = tiny_config(fused_ops=flag, mlp_t=mlp_t, H_cycles=3, L_cycles=2)
        model = build(cfg).train()
        batch = make_batch(cfg, 3)
        calls.clear()
        logits.append(model(model.initial_carry(batch), batch)[1]["logits"])
        expected = 2 * (2 + 1) * 2 if (flag or by_default) else 0  # no-grad cycles x updates x layers
        assert len(calls) == expected and not any(calls)
    assert torch.equal(logits[0], logits[1])


# ---------------------------------------------------------------- an independent float64 TRM


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 2e-5) -> None:
    """float32 model vs float64 reference: max error within `rel` of the tensor's scale (float32 eps ~1.2e-7,
    accumulated over a few dozen matmuls and norms)."""
    err = (actual.double() - expected.detach()).abs().max().item()
    scale = expected.detach().abs().max().item()
    assert err <= rel * scale + 1e-7, f"{what}: max error {err:.3e} at scale {scale:.3e}"


def ref_rms_norm(x, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def ref_swiglu(x, w_gate_up, w_down):
    inter = w_down.shape[1]
    gate, up = x @ w_gate_up[:inter].T, x @ w_gate_up[inter:].T
    return (gate * torch.sigmoid(gate) * up) @ w_down.T


def ref_rope(x, theta=10000.0):
    """Rotate pairs (i, i + D/2) of x [B, L, H, D] by angle position · theta^(-2i/D)."""
    length, head_dim = x.shape[1], x.shape[-1]
    half = head_dim // 2
    inv_freq = theta ** (-2 * torch.arange(half, dtype=torch.float64) / head_dim)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq  # [L, D/2]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # [L, 1, D/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def ref_attention(x, w_qkv, w_o, heads, rope):
    b, length, d = x.shape
    qkv = (x @ w_qkv.T).view(b, length, 3, heads, d // heads)  # [B, L, q/k/v, H, D]
    q, k, v = qkv.unbind(2)
    if rope:
        q, k = ref_rope(q), ref_rope(k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, length, d)
    return out @ w_o.T


def ref_network(h, injection, w, cfg):
    """TRM's L_level: h + injection, then L_layers post-norm blocks."""
    h = h + injection
    for i in range(cfg["L_layers"]):
        p = f"L_level.layers.{i}."
        if cfg.get("mlp_t"):
            ht = h.transpose(1, 2)
            h = ref_rms_norm(ht + ref_swiglu(ht, w[p + "mlp_t.gate_up_proj.weight"], w[p + "mlp_t.down_proj.weight"]))
            h = h.transpose(1, 2)
        else:
            attn = ref_attention(
                h, w[p + "self_attn.qkv_proj.weight"], w[p + "self_attn.o_proj.weight"], cfg["num_heads"],
                cfg["pos_encodings"] == "rope",
            )  # fmt: skip
            h = ref_rms_norm(h + attn)
        h = ref_rms_norm(h + ref_swiglu(h, w[p + "mlp.gate_up_proj.weight"], w[p + "mlp.down_proj.weight"]))
    return h


def ref_act_step(z_h, z_l, x, w, cfg, grad_cycles: int = 1):
    """One ACT step: H_cycles cycles {L_cycles: z_L = L(z_L, z_H + x); z_H = L(z_H, z_L)}; the last
    `grad_cycles` are differentiated. Returns detached new states, logits and (q_halt, q_continue)."""
    for cycle in range(cfg["H_cycles"]):
        with torch.set_grad_enabled(cycle >= cfg["H_cycles"] - grad_cycles):
            for _ in range(cfg["L_cycles"]):
                z_l = ref_network(z_l, z_h + x, w, cfg)
            z_h = ref_network(z_h, z_l, w, cfg)
    prefix = z_h.shape[1] - cfg["seq_len"]
    logits = (z_h @ w["lm_head.weight"].T)[:, prefix:]
    q = z_h[:, 0] @ w["q_head.weight"].T + w["q_head.bias"]
    return z_h.detach(), z_l.detach(), logits, (q[:, 0], q[:, 1])


def ref_embeddings(batch, w, puzzle_rows, cfg):
    d = cfg["hidden_size"]
    tokens = w["embed_tokens.embedding_weight"][batch["inputs"].long()]  # [B, S, d]
    prefix = cfg["puzzle_emb_len"] or math.ceil(cfg["puzzle_emb_ndim"] / d)
    flat = torch.zeros(tokens.shape[0], prefix * d, dtype=torch.float64)
    if puzzle_rows is not None:
        flat = torch.cat([puzzle_rows, flat[:, puzzle_rows.shape[1] :]], dim=1)
    emb = torch.cat([flat.view(-1, prefix, d), tokens], dim=1)
    if cfg["pos_encodings"] == "learned":
        emb = (emb + w["embed_pos.embedding_weight"]) / math.sqrt(2)
    return math.sqrt(d) * emb


@pytest.mark.parametrize(
    "overrides",
    [
        {"H_cycles": 3, "L_cycles": 2},
        {"mlp_t": True, "pos_encodings": "none"},
        {"pos_encodings": "learned", "puzzle_emb_ndim": 20, "puzzle_emb_len": 0},
        {"puzzle_emb_ndim": 0, "H_cycles": 1, "L_cycles": 3},
    ],
    ids=["attention_rope", "mlp_t", "learned_ceil_prefix", "no_puzzle_emb"],
)
def test_forward_and_gradients_match_trm_equations_over_act_steps(overrides):
    cfg = tiny_config(halt_max_steps=8, **overrides)
    model = build(cfg).train()
    randomise(model)
    set_q_head(model, (-5.0, -5.0))  # never halts in these 3 steps; exploration is off
    with torch.no_grad():
        model.inner.q_head.weight.normal_(std=0.1)  # non-zero so Q depends on z_H, still far below 0
    inner = model.inner
    w = {n: p.detach().double().requires_grad_() for n, p in inner.named_parameters()}
    table = inner.puzzle_emb.weights.double() if cfg["puzzle_emb_ndim"] else None
    gen = torch.Generator().manual_seed(4)

    batch = make_batch(cfg, 5)
    carry = model.initial_carry(batch)
    z_h = inner.H_init.double().expand(4, inner.puzzle_emb_len + 6, 16)
    z_l = inner.L_init.double().expand(4, inner.puzzle_emb_len + 6, 16)
    for step in range(3):
        if step > 0:  # each step starts from the model's carry, so float32 drift does not compound
            z_h, z_l = carry.inner_carry.z_H.double(), carry.inner_carry.z_L.double()
        carry, out = model(carry, batch)
        assert not bool(carry.halted.any())
        r_logits, r_q = torch.randn(out["logits"].shape, generator=gen), torch.randn(2, 4, generator=gen)
        loss = (out["logits"] * r_logits).sum() + (
            out["q_halt_logits"] * r_q[0] + out["q_continue_logits"] * r_q[1]
        ).sum()
        model.zero_grad()
        if table is not None:
            inner.puzzle_emb.local_weights.grad = None  # a buffer: zero_grad leaves it (its optimizer clears it)
        loss.backward()

        rows = table[batch["puzzle_identifiers"].long()].requires_grad_() if table is not None else None
        x = ref_embeddings(batch, w, rows, cfg)
        z_h, z_l, logits, (q_halt, q_cont) = ref_act_step(z_h, z_l, x, w, cfg)
        for t in w.values():
            t.grad = None
        ref_loss = (logits * r_logits.double()).sum() + (q_halt * r_q[0] + q_cont * r_q[1]).double().sum()
        ref_loss.backward()

        assert_float32_close(out["logits"], logits, f"step {step}: logits")
        assert_float32_close(out["q_halt_logits"], q_halt, f"step {step}: q_halt")
        assert_float32_close(out["q_continue_logits"], q_cont, f"step {step}: q_continue")
        assert_float32_close(carry.inner_carry.z_H, z_h, f"step {step}: z_H")
        assert_float32_close(carry.inner_carry.z_L, z_l, f"step {step}: z_L")
        for n, p in inner.named_parameters():
            assert_float32_close(p.grad, w[n].grad, f"step {step}: grad {n}")
        if rows is not None:
            assert_float32_close(inner.puzzle_emb.local_weights.grad, rows.grad, f"step {step}: puzzle rows grad")

    # The gradient is the last cycle's only: differentiating every cycle would give another one.
    if cfg["H_cycles"] > 1:
        for t in w.values():
            t.grad = None
        rows = table[batch["puzzle_identifiers"].long()] if table is not None else None
        h0 = inner.H_init.double().expand_as(z_h)
        l0 = inner.L_init.double().expand_as(z_l)
        x = ref_embeddings(batch, w, rows, cfg)
        _, _, logits_all, _ = ref_act_step(h0, l0, x, w, cfg, grad_cycles=cfg["H_cycles"])
        x = ref_embeddings(batch, w, rows, cfg)
        _, _, logits_last, _ = ref_act_step(h0, l0, x, w, cfg)
        (logits_all * r_logits.double()).sum().backward()
        full = w["L_level.layers.0.mlp.down_proj.weight"].grad.clone()
        for t in w.values():
            t.grad = None
        (logits_last * r_logits.double()).sum().backward()
        last = w["L_level.layers.0.mlp.down_proj.weight"].grad
        assert (full - last).abs().max() > 1e-3 * last.abs().max()


# ---------------------------------------------------------------- recursion structure


def record_network_calls(inner) -> list[bool]:
    calls = []
    inner.L_level.register_forward_hook(lambda module, args, output: calls.append(output.requires_grad))
    return calls


@pytest.mark.parametrize("h_cycles, l_cycles", [(3, 2), (2, 4), (1, 3)])
def test_recursion_structure_per_act_step(h_cycles, l_cycles):
    cfg = tiny_config(H_cycles=h_cycles, L_cycles=l_cycles)
    model = build(cfg).train()
    calls = record_network_calls(model.inner)
    block_calls = []
    for block in model.inner.L_level.layers:
        block.register_forward_hook(lambda *_: block_calls.append(torch.is_grad_enabled()))
    batch = make_batch(cfg, 4)
    carry = model.initial_carry(batch)
    for _ in range(2):  # every ACT step does the same, whether rows continue or restart
        calls.clear()
        block_calls.clear()
        carry, out = model(carry, batch)
        # (H_cycles - 1) full cycles of L_cycles + 1 updates without gradient, then one full cycle with it;
        # no second pass: no_ACT_continue has no continue target.
        per_cycle = l_cycles + 1
        assert calls == [False] * ((h_cycles - 1) * per_cycle) + [True] * per_cycle
        assert len(block_calls) == h_cycles * per_cycle * 2 and sum(block_calls) == per_cycle * 2
        assert "target_q_continue" not in out
        assert not carry.inner_carry.z_H.requires_grad and not carry.inner_carry.z_L.requires_grad


def test_act_continue_runs_a_second_pass_without_gradient():
    cfg = tiny_config(H_cycles=2, L_cycles=3, no_ACT_continue=False)
    model = build(cfg).train()
    calls = record_network_calls(model.inner)
    batch = make_batch(cfg, 5)
    _, out = model(model.initial_carry(batch), batch)
    once = [False] * 4 + [True] * 4
    assert calls == once + [False] * 8
    assert "target_q_continue" in out
    model.eval()
    calls.clear()
    model(model.initial_carry(batch), batch)
    assert calls == once  # evaluation never bootstraps


# ---------------------------------------------------------------- halting


@pytest.mark.parametrize(
    "no_act_continue, bias, halts",
    [
        (True, (0.5, 5.0), True),  # q_halt > 0 halts, whatever q_continue says
        (True, (-0.5, -5.0), False),  # q_halt < 0 continues, although q_halt > q_continue
        (False, (0.5, 5.0), False),  # HRM's rule: q_halt < q_continue continues
        (False, (-0.5, -5.0), True),
    ],
)
def test_training_halting_rule(no_act_continue, bias, halts):
    cfg = tiny_config(halt_max_steps=3, no_ACT_continue=no_act_continue)
    model = build(cfg).train()
    set_q_head(model, bias)
    history = run_steps(model, make_batch(cfg, 8), 3)
    expected = [[halts] * 4, [halts] * 4, [True] * 4] if not halts else [[True] * 4] * 3
    assert [c.halted.tolist() for c, _ in history] == expected
    assert [c.steps.tolist() for c, _ in history] == ([[1] * 4] * 3 if halts else [[1] * 4, [2] * 4, [3] * 4])
    assert all(("target_q_continue" in out) == (not no_act_continue) for _, out in history)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_initial_carry_and_output_dtypes(dtype):
    cfg = tiny_config(forward_dtype=dtype)
    model = build(cfg)
    batch = make_batch(cfg, 2)
    carry = model.initial_carry(batch)
    assert carry.inner_carry.z_H.shape == (4, 8, 16) and carry.inner_carry.z_H.dtype == getattr(torch, dtype)
    assert carry.steps.dtype == torch.int32 and bool(carry.halted.all())
    _, out = model(carry, batch)
    assert out["logits"].shape == (4, 6, 7) and out["logits"].dtype == getattr(torch, dtype)
    assert out["q_halt_logits"].dtype == torch.float32 and out["q_halt_logits"].shape == (4,)


# ---------------------------------------------------------------- loss head


def _stablemax_ce(logits: list[float], label: int) -> float:
    s = [1 / (1 - x + 1e-30) if x < 0 else x + 1 for x in logits]
    return -math.log(s[label] / sum(s))


def _softmax_ce(logits: list[float], label: int) -> float:
    m = max(logits)
    return -(logits[label] - m - math.log(sum(math.exp(x - m) for x in logits)))


@pytest.mark.parametrize("loss_type", ["softmax_cross_entropy", "stablemax_cross_entropy"])
@pytest.mark.parametrize("no_act_continue", [True, False])
def test_loss_head_on_trm(loss_type, no_act_continue):
    cfg = tiny_config(no_ACT_continue=no_act_continue)
    head = ACTLossHead(build(cfg), loss_type).train()
    randomise(head.model)
    batch = make_batch(cfg, 17)
    carry, loss, metrics, out, _ = head(
        return_keys=["logits", "preds", "q_halt_logits"], carry=head.initial_carry(batch), batch=batch
    )
    assert torch.equal(out["preds"], out["logits"].argmax(-1)) and out["preds"].dtype == torch.int64
    assert not out["preds"].requires_grad and not out["logits"].requires_grad
    assert ("q_continue_loss" in metrics) == (not no_act_continue)

    ref = _softmax_ce if loss_type == "softmax_cross_entropy" else _stablemax_ce
    labels = batch["labels"]
    lm_loss = 0.0
    for b in range(4):
        labelled = [s for s in range(6) if labels[b, s] != IGNORE_LABEL_ID]
        for s in labelled:
            lm_loss += ref(out["logits"][b, s].double().tolist(), labels[b, s].item()) / len(labelled)
    assert metrics["lm_loss"].item() == pytest.approx(lm_loss, rel=1e-5)
    expected = metrics["lm_loss"] + 0.5 * (metrics["q_halt_loss"] + metrics.get("q_continue_loss", 0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert head.model.inner.L_level.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- two optimizer steps


def test_two_optimizer_steps_follow_the_formulas():
    """AdamATan2 on the parameters and sign-SGD on the touched puzzle rows, against float64 formulas."""
    cfg = tiny_config(batch_size=4, num_puzzle_identifiers=6)
    head = ACTLossHead(build(cfg), "stablemax_cross_entropy").train()
    randomise(head.model)
    inner = head.model.inner
    lr, wd, betas, emb_lr, emb_wd = 3e-3, 0.1, (0.9, 0.95), 1e-2, 0.1
    params = dict(head.named_parameters())
    adam = AdamATan2(params.values(), lr=lr, betas=betas, weight_decay=wd)
    sign_sgd = CastedSparseEmbeddingSignSGD_Distributed(
        head.model.puzzle_emb.buffers(), world_size=1, lr=emb_lr, weight_decay=emb_wd
    )
    m = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    v = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    batch = make_batch(cfg, 18)
    batch["puzzle_identifiers"] = torch.tensor([2, 4, 2, 0], dtype=torch.int32)  # id 2 twice, 1/3/5 untouched
    carry = head.initial_carry(batch)
    for t in (1, 2):
        before = {n: p.detach().double().clone() for n, p in params.items()}
        table_before = inner.puzzle_emb.weights.double().clone()
        carry, loss, _, _, _ = head(return_keys=[], carry=carry, batch=batch)
        loss.backward()
        grads = {n: p.grad.double().clone() for n, p in params.items()}
        row_grads = inner.puzzle_emb.local_weights.grad.double().clone()
        ids = inner.puzzle_emb.local_ids.clone()
        adam.step()
        sign_sgd.step()
        adam.zero_grad()
        sign_sgd.zero_grad()

        for n, p in params.items():
            m[n] = betas[0] * m[n] + (1 - betas[0]) * grads[n]
            v[n] = betas[1] * v[n] + (1 - betas[1]) * grads[n] ** 2
            step = lr / (1 - betas[0] ** t) * torch.atan2(m[n], v[n].sqrt() / math.sqrt(1 - betas[1] ** t))
            torch.testing.assert_close(p.detach().double(), before[n] * (1 - lr * wd) - step, rtol=1e-6, atol=1e-7)
        assert any(g.abs().max() > 0 for g in grads.values())

        expected_table = table_before.clone()
        for row in set(ids.tolist()):
            summed = row_grads[ids == row].sum(0)  # repeated ids: one sign step of the summed gradient
            expected_table[row] = table_before[row] * (1 - emb_lr * emb_wd) - emb_lr * torch.sign(summed)
        torch.testing.assert_close(inner.puzzle_emb.weights.double(), expected_table, rtol=1e-6, atol=1e-7)
        assert torch.equal(inner.puzzle_emb.weights[[1, 3, 5]].double(), table_before[[1, 3, 5]])
        assert row_grads.abs().sum() > 0


# ---------------------------------------------------------------- devices and compilation


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    cfg = tiny_config(forward_dtype="bfloat16", no_ACT_continue=False)
    head = ACTLossHead(build(cfg), "stablemax_cross_entropy").cuda()
    batch = {k: v.cuda() for k, v in make_batch(cfg, 14).items()}
    carry = head.initial_carry(batch)
    assert carry.inner_carry.z_H.is_cuda and carry.steps.is_cuda
    carry, loss, metrics, _, _ = head(return_keys=[], carry=carry, batch=batch)
    loss.backward()
    assert all(t.is_cuda for t in metrics.values())


@pytest.mark.slow
@pytest.mark.parametrize("no_act_continue", [True, False])
def test_torch_compile_matches_eager(no_act_continue):
    """fullgraph=True fails on any graph break, so this also proves the forward has no host synchronisation
    (backend aot_eager: Dynamo + AOTAutograd without code generation, as in the HRM test)."""
    cfg = tiny_config(halt_exploration_prob=0.5, no_ACT_continue=no_act_continue, L_layers=1)
    batch = make_batch(cfg, 15)

    def train_step(head, fn):
        torch.manual_seed(7)
        carry, loss, _, _, _ = fn(return_keys=[], carry=head.initial_carry(batch), batch=batch)
        loss.backward()
        grads = [p.grad.clone() for p in head.parameters()]
        head.zero_grad()
        return carry, loss.detach(), grads

    head = ACTLossHead(build(cfg), "softmax_cross_entropy").train()
    compiled = torch.compile(head, dynamic=False, fullgraph=True, backend="aot_eager")
    eager, comp = train_step(head, head), train_step(head, compiled)
    assert torch.equal(eager[0].halted, comp[0].halted)
    torch.testing.assert_close(eager[1], comp[1])
    for a, b in zip(eager[2], comp[2]):
        torch.testing.assert_close(a, b)
