"""HRM ACT-v1: names and state-dict keys, parameter count, embeddings, the 1-step gradient, halting on Q, config
errors. The ACT wrapper it shares with TRM (evaluation halting, exploration, Q target, carry reset): tests/test_act.py."""

import math

import pytest
import torch

from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
from models.losses import ACTLossHead
from tests.helpers import arch_config, run_steps
from tests.helpers import hrm_build as build
from tests.helpers import hrm_make_batch as make_batch
from tests.helpers import hrm_tiny_config as tiny_config
from utils.functions import get_model_source_path, load_model_class

# The default architecture (config/arch/hrm_v1.yaml) on the Sudoku shape, plus keys the launcher passes along.
SUDOKU_DEFAULT = {
    "name": "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1",
    **arch_config("hrm_v1", batch_size=2, seq_len=81, vocab_size=11, num_puzzle_identifiers=1, causal=False),
}


def set_q_head(model, weight_std: float, bias: tuple[float, float]) -> None:
    with torch.no_grad():
        model.inner.q_head.weight.normal_(std=weight_std) if weight_std > 0 else model.inner.q_head.weight.zero_()
        model.inner.q_head.bias.copy_(torch.tensor(bias))


# ---------------------------------------------------------------- names, keys, parameter count


def test_identifiers_resolve():
    assert load_model_class("hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1") is HierarchicalReasoningModel_ACTV1
    assert load_model_class("losses@ACTLossHead", prefix="models.") is ACTLossHead
    assert get_model_source_path("hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1").endswith("hrm_act_v1.py")
    for bad in ("hrm.hrm_act_v1", "hrm.nope@X", "hrm.hrm_act_v1@Nope", "@X"):
        with pytest.raises(ValueError, match="model identifier"):
            load_model_class(bad)


@pytest.fixture(scope="module")
def default_model() -> HierarchicalReasoningModel_ACTV1:
    return build(SUDOKU_DEFAULT)


def test_parameter_count_default_sudoku(default_model):
    model = default_model
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 27_275_266
    # The same number from the layer shapes: d=512, V=11, SwiGLU width m=1536, 8 blocks.
    d, v, m = 512, 11, 1536
    per_block = 3 * d * d + d * d + 2 * m * d + m * d
    assert n_params == 8 * per_block + v * d + v * d + (2 * d + 2)
    # The puzzle embedding is a buffer, not a parameter (it has its own optimizer).
    assert all(not name.endswith("puzzle_emb.weights") for name, _ in model.named_parameters())


def expected_state_dict_shapes(cfg: dict, learned: bool, puzzle: bool) -> dict[str, tuple]:
    d, v, p = cfg["hidden_size"], cfg["vocab_size"], cfg["num_puzzle_identifiers"]
    m = 1536  # SwiGLU width for hidden 512, expansion 4
    puzzle_len = math.ceil(cfg["puzzle_emb_ndim"] / d) if puzzle else 0
    shapes = {
        "model.inner.embed_tokens.embedding_weight": (v, d),
        "model.inner.lm_head.weight": (v, d),
        "model.inner.q_head.weight": (2, d),
        "model.inner.q_head.bias": (2,),
        "model.inner.H_init": (d,),
        "model.inner.L_init": (d,),
    }
    for level, n in (("H_level", cfg["H_layers"]), ("L_level", cfg["L_layers"])):
        for i in range(n):
            prefix = f"model.inner.{level}.layers.{i}."
            shapes[prefix + "self_attn.qkv_proj.weight"] = (3 * d, d)
            shapes[prefix + "self_attn.o_proj.weight"] = (d, d)
            shapes[prefix + "mlp.gate_up_proj.weight"] = (2 * m, d)
            shapes[prefix + "mlp.down_proj.weight"] = (d, m)
    if puzzle:
        shapes["model.inner.puzzle_emb.weights"] = (p, cfg["puzzle_emb_ndim"])
    if learned:
        shapes["model.inner.embed_pos.embedding_weight"] = (cfg["seq_len"] + puzzle_len, d)
    return shapes


@pytest.mark.parametrize(
    "overrides, learned, puzzle",
    [({}, False, True), ({"pos_encodings": "learned"}, True, True), ({"puzzle_emb_ndim": 0}, False, False)],
    ids=["default", "learned", "no_puzzle_emb"],
)
def test_state_dict_keys_and_shapes(overrides, learned, puzzle, default_model):
    cfg = {**SUDOKU_DEFAULT, **overrides}
    head = ACTLossHead(build(cfg) if overrides else default_model, "stablemax_cross_entropy")
    state = head.state_dict()
    assert {k: tuple(t.shape) for k, t in state.items()} == expected_state_dict_shapes(cfg, learned, puzzle)
    assert state["model.inner.H_init"].dtype == torch.bfloat16  # forward dtype
    assert all(t.dtype == torch.float32 for k, t in state.items() if not k.endswith("_init"))
    assert (getattr(head.model, "puzzle_emb", None) is not None) == puzzle


def test_default_initialisation(default_model):
    inner = default_model.inner
    assert torch.count_nonzero(inner.q_head.weight) == 0
    assert inner.q_head.bias.tolist() == [-5.0, -5.0]
    assert torch.count_nonzero(inner.puzzle_emb.weights) == 0  # zero init
    # Token embedding: truncated normal std 1/√512 (5632 samples: allow 4 sampling sigmas).
    assert inner.embed_tokens.embedding_weight.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.04)
    assert inner.H_init.float().std().item() == pytest.approx(1.0, rel=0.15)
    assert inner.H_init.abs().max().item() <= 2 / 0.87962566 * 1.01  # clip at 2·c, c = 1 / std(trunc N at ±2)
    assert not torch.equal(inner.H_init, inner.L_init)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"pos_encodings": "alibi"}, "pos_encodings"),
        ({"hidden_size": 18, "num_heads": 4}, "num_heads"),
        ({"forward_dtype": "float33"}, "forward_dtype"),
        ({"H_cycles": 0}, "H_cycles"),
        ({"vocab_size": "eleven"}, "vocab_size"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field) as info:
        HierarchicalReasoningModel_ACTV1(tiny_config(**overrides))
    assert "\n" not in str(info.value)


def test_missing_field_named():
    cfg = tiny_config()
    del cfg["halt_max_steps"]
    with pytest.raises(ValueError, match="halt_max_steps"):
        HierarchicalReasoningModel_ACTV1(cfg)


def test_launcher_keys_pass_and_unknown_keys_are_one_line_errors():
    model = HierarchicalReasoningModel_ACTV1(
        tiny_config(causal=False, name="hrm.x@Y", loss={"name": "losses@ACTLossHead"})
    )
    assert model.config.hidden_size == 16
    with pytest.raises(ValueError, match=r"^HierarchicalReasoningModel_ACTV1 config: unknown key 'arch.L_cylces'"):
        HierarchicalReasoningModel_ACTV1(tiny_config(L_cylces=3))
    with pytest.raises(ValueError, match=r"config: hidden_size \(16\) must be divisible by num_heads \(3\)$"):
        HierarchicalReasoningModel_ACTV1(tiny_config(num_heads=3))


# ---------------------------------------------------------------- embeddings and outputs


@pytest.mark.parametrize("pos_encodings", ["rope", "learned"])
def test_input_embeddings_layout(pos_encodings):
    # puzzle_emb_ndim 20 with hidden 16 -> 2 prefix positions, the vector right-padded with 12 zeros.
    cfg = tiny_config(puzzle_emb_ndim=20, pos_encodings=pos_encodings)
    model = build(cfg).eval()
    inner = model.inner
    assert inner.puzzle_emb_len == 2
    with torch.no_grad():
        inner.puzzle_emb.weights.normal_()
    batch = make_batch(cfg, 1)
    with torch.no_grad():
        emb = inner._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    assert emb.shape == (4, 8, 16)

    scale = 4.0  # √hidden
    tokens = inner.embed_tokens.embedding_weight[batch["inputs"].long()]  # [B, S, d]
    prefix = torch.zeros(4, 32)
    prefix[:, :20] = inner.puzzle_emb.weights[batch["puzzle_identifiers"].long()]
    expected = torch.cat([prefix.view(4, 2, 16), tokens], dim=1)
    if pos_encodings == "learned":
        expected = 0.707106781 * (expected + inner.embed_pos.embedding_weight)
    torch.testing.assert_close(emb, scale * expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_outputs_shapes_dtypes_and_heads(dtype):
    cfg = tiny_config(puzzle_emb_ndim=20, forward_dtype=dtype)
    model = build(cfg)
    set_q_head(model, 0.5, (0.1, -0.2))
    batch = make_batch(cfg, 2)
    carry = model.initial_carry(batch)
    assert carry.inner_carry.z_H.shape == (4, 8, 16) and carry.inner_carry.z_H.dtype == getattr(torch, dtype)
    assert carry.steps.dtype == torch.int32 and torch.count_nonzero(carry.steps) == 0
    assert carry.halted.dtype == torch.bool and bool(carry.halted.all())
    assert set(carry.current_data) == set(batch)

    new_carry, out = model(carry, batch)
    assert out["logits"].shape == (4, 6, 7) and out["logits"].dtype == getattr(torch, dtype)
    assert out["q_halt_logits"].shape == (4,) and out["q_halt_logits"].dtype == torch.float32
    assert not new_carry.inner_carry.z_H.requires_grad and not new_carry.inner_carry.z_L.requires_grad
    # logits = lm_head(z_H) without the puzzle prefix; Q = q_head(z_H at position 0).
    z_h = new_carry.inner_carry.z_H
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model.inner.lm_head(z_h)[:, 2:])
        q = model.inner.q_head(z_h[:, 0]).float()
    torch.testing.assert_close(out["q_halt_logits"].detach(), q[:, 0])
    torch.testing.assert_close(out["q_continue_logits"].detach(), q[:, 1])
    out["logits"].float().sum().backward()
    assert model.inner.lm_head.weight.grad is not None


def test_rows_are_independent():
    # Attention mixes positions, never batch rows: one row's output does not depend on the others.
    cfg = tiny_config()
    model = build(cfg).eval()
    batch = make_batch(cfg, 3)
    _, out = model(model.initial_carry(batch), batch)
    other = {k: v.clone() for k, v in batch.items()}
    other["inputs"][1:] = (other["inputs"][1:] + 1) % 7
    _, out2 = model(model.initial_carry(other), other)
    torch.testing.assert_close(out["logits"][0], out2["logits"][0])
    assert not torch.allclose(out["logits"][1], out2["logits"][1])


# ---------------------------------------------------------------- 1-step gradient structure


def record_level_calls(inner) -> list[tuple[str, bool]]:
    calls = []
    for name in ("H_level", "L_level"):
        getattr(inner, name).register_forward_hook(
            lambda module, args, output, tag=name[0]: calls.append((tag, torch.is_grad_enabled()))
        )
    return calls


def expected_calls(h_cycles: int, l_cycles: int) -> list[tuple[str, bool]]:
    order = []
    for _ in range(h_cycles):
        order += ["L"] * l_cycles + ["H"]
    last_l = max(i for i, t in enumerate(order) if t == "L")
    return [(t, i in (last_l, len(order) - 1)) for i, t in enumerate(order)]


@pytest.mark.parametrize("h_cycles, l_cycles", [(2, 2), (3, 2), (1, 3)])
def test_one_step_gradient_structure(h_cycles, l_cycles):
    cfg = tiny_config(H_cycles=h_cycles, L_cycles=l_cycles, H_layers=2, L_layers=1)
    model = build(cfg).eval()
    calls = record_level_calls(model.inner)
    block_calls = []
    for block in model.inner.modules():
        if type(block).__name__ == "HierarchicalReasoningModel_ACTV1Block":
            block.register_forward_hook(lambda *_: block_calls.append(torch.is_grad_enabled()))
    batch = make_batch(cfg, 4)
    model(model.initial_carry(batch), batch)
    assert calls == expected_calls(h_cycles, l_cycles)
    assert sum(t == "L" for t, _ in calls) == h_cycles * l_cycles
    assert sum(t == "H" for t, _ in calls) == h_cycles
    # Block applications: L-updates · L_layers + H-updates · H_layers, of which only the last two updates' have grad.
    assert len(block_calls) == h_cycles * l_cycles * 1 + h_cycles * 2
    assert sum(block_calls) == 1 + 2


def test_act_training_step_runs_inner_twice():
    cfg = tiny_config(H_cycles=2, L_cycles=3)
    model = build(cfg).train()
    calls = record_level_calls(model.inner)
    batch = make_batch(cfg, 5)
    model(model.initial_carry(batch), batch)
    once = expected_calls(2, 3)
    # Second pass (target Q) runs entirely without gradients.
    assert calls == once + [(t, False) for t, _ in once]


def test_one_step_gradient_values_and_grads():
    """Outputs equal a full unroll; gradients equal those of differentiating only the final L and H update."""
    cfg = tiny_config(H_cycles=2, L_cycles=3, puzzle_emb_ndim=0)
    model = build(cfg).eval()
    inner = model.inner
    batch = make_batch(cfg, 6)
    carry = model.initial_carry(batch)
    _, out = model(carry, batch)
    out["logits"].pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
    inner.zero_grad()

    cos_sin = inner.rotary_emb()
    x = inner._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    z_h = inner.H_init.expand(4, 6, 16)
    z_l = inner.L_init.expand(4, 6, 16)
    updates = []
    for _ in range(2):
        updates += ["L"] * 3 + ["H"]
    for i, kind in enumerate(updates):
        grad_on = i >= len(updates) - 2  # the final L and the final H update
        with torch.set_grad_enabled(grad_on):
            if kind == "L":
                z_l = inner.L_level(z_l, z_h + x, cos_sin=cos_sin)
            else:
                z_h = inner.H_level(z_h, z_l, cos_sin=cos_sin)
    logits = inner.lm_head(z_h)
    torch.testing.assert_close(out["logits"].detach(), logits.detach())
    logits.pow(2).sum().backward()
    for n, p in inner.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, msg=n)
    # The first L update happened without gradient, yet L_level gets gradient (through the final update).
    assert any(n.startswith("L_level") for n in grads)


# ---------------------------------------------------------------- ACT rules


def test_training_halts_on_q_without_exploration():
    cfg = tiny_config(halt_max_steps=4, halt_exploration_prob=0.0)
    model = build(cfg).train()
    set_q_head(model, 0.0, (5.0, -5.0))
    carry, out = run_steps(model, make_batch(cfg, 8), 1)[0]
    assert bool(carry.halted.all()) and carry.steps.tolist() == [1] * 4
    assert "target_q_continue" in out

    set_q_head(model, 0.0, (-5.0, 5.0))  # "continue" until the step limit
    history = run_steps(model, make_batch(cfg, 8), 4)
    assert [c.halted.tolist() for c, _ in history] == [[False] * 4] * 3 + [[True] * 4]


# ---------------------------------------------------------------- devices and compilation


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    cfg = tiny_config(forward_dtype="bfloat16")
    head = ACTLossHead(build(cfg), "stablemax_cross_entropy").cuda()
    batch = {k: v.cuda() for k, v in make_batch(cfg, 14).items()}
    carry = head.initial_carry(batch)
    assert carry.inner_carry.z_H.is_cuda and carry.steps.is_cuda
    carry, loss, metrics, _, _ = head(return_keys=[], carry=carry, batch=batch)
    loss.backward()
    assert all(v.is_cuda for v in metrics.values())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """torch.compile(dynamic=False, fullgraph=True) of a training step (forward + backward) and of an
    eval forward matches eager. fullgraph=True fails on any graph break, so this also proves the forward
    has no host synchronisation. Backend aot_eager (Dynamo + AOTAutograd, no code generation): inductor's
    C++ code generation takes over a minute on this 2-core CPU, so it is exercised by the GPU benchmarks."""
    cfg = tiny_config(halt_exploration_prob=0.5)
    batch = make_batch(cfg, 15)

    def train_step(head, fn):
        torch.manual_seed(7)
        carry, loss, metrics, _, _ = fn(return_keys=[], carry=head.initial_carry(batch), batch=batch)
        loss.backward()
        grads = [p.grad.clone() for p in head.parameters()]
        head.zero_grad()
        return carry, loss.detach(), grads

    head = ACTLossHead(build(cfg), "softmax_cross_entropy").train()
    compiled_head = torch.compile(head, dynamic=False, fullgraph=True, backend="aot_eager")
    eager = train_step(head, head)
    compiled = train_step(head, compiled_head)
    assert torch.equal(eager[0].halted, compiled[0].halted)
    torch.testing.assert_close(eager[1], compiled[1])
    for g_eager, g_compiled in zip(eager[2], compiled[2]):
        torch.testing.assert_close(g_eager, g_compiled)

    head.eval()
    with torch.inference_mode():
        _, loss_eager, _, out_eager, _ = head(return_keys=["logits"], carry=head.initial_carry(batch), batch=batch)
        _, loss_c, _, out_c, _ = compiled_head(return_keys=["logits"], carry=head.initial_carry(batch), batch=batch)
    torch.testing.assert_close(out_eager["logits"], out_c["logits"])
    torch.testing.assert_close(loss_eager, loss_c)
