"""Tests of the three-level Planner/Decomposer/Executor model (models/hrm/hrm_3level.py)."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from models.hrm import hrm_3level
from models.hrm.hrm_3level import (
    HierarchicalLossHead,
    HierarchicalReasoningModel_3Level,
    HierarchicalReasoningModel_3LevelAttention,
    HierarchicalReasoningModel_3LevelCache,
    sample_next_token,
    sparse_attention_mask,
    top_p_filter,
)
from models.layers import rms_norm
from tests.helpers import REPO
from utils.functions import load_model_class


def tiny_config(**overrides) -> dict:
    config = dict(
        batch_size=2,
        seq_len=24,
        vocab_size=13,
        num_puzzle_identifiers=3,
        puzzle_emb_ndim=0,
        hidden_size=32,
        num_heads=4,
        expansion=2,
        planner_layers=1,
        decomposer_layers=1,
        executor_layers=1,
        window_size=3,
        num_global_tokens=2,
        forward_dtype="float32",
        causal=False,
    )
    config.update(overrides)
    return config


def make_model(seed=0, **overrides) -> HierarchicalReasoningModel_3Level:
    torch.manual_seed(seed)
    return HierarchicalReasoningModel_3Level(tiny_config(**overrides))


def random_batch(config: dict, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, S, V = config["batch_size"], config["seq_len"], config["vocab_size"]
    return {
        "inputs": torch.randint(0, V, (B, S), generator=g, dtype=torch.int32),
        "labels": torch.randint(0, V, (B, S), generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.randint(0, config["num_puzzle_identifiers"], (B,), generator=g, dtype=torch.int32),
    }


# --- attention pattern and kernel --------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_mask_matches_brute_force(causal):
    n, window, num_global = 17, 3, 2
    pos = torch.arange(n)
    mask = sparse_attention_mask(pos, pos, window_size=window, num_global=num_global, causal=causal)
    for i in range(n):
        for j in range(n):
            expected = abs(i - j) <= window or j < num_global or i < num_global
            if causal:
                expected = expected and j <= i
            assert bool(mask[i, j]) == expected, (i, j)
    dense = sparse_attention_mask(pos, pos, window_size=None, num_global=0, causal=causal)
    assert torch.equal(
        dense, torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
    )


def naive_rope(t, cos, sin):
    """Rotate-half RoPE written out independently: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = t.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]  # [S, 1, D]
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * c + rotated * s


def naive_attention(module, x, cos, sin, mask, context=None):
    """Dense masked softmax attention from the module's weights, in float64."""
    x = x.double()
    B, S, _ = x.shape
    H, D = module.num_heads, module.head_dim
    if module.cross:
        q = x @ module.q_proj.weight.double().T
        kv = context.double() @ module.kv_proj.weight.double().T
        k, v = kv[..., : H * D], kv[..., H * D :]
    else:
        qkv = x @ module.qkv_proj.weight.double().T
        q, k, v = qkv[..., : H * D], qkv[..., H * D : 2 * H * D], qkv[..., 2 * H * D :]
    q, k, v = (t.reshape(B, S, H, D) for t in (q, k, v))
    q, k = naive_rope(q, cos.double(), sin.double()), naive_rope(k, cos.double(), sin.double())
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, H * D)
    return out @ module.o_proj.weight.double().T


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_dense_masked_reference(cross, causal):
    torch.manual_seed(0)
    B, S, d, H = 2, 20, 32, 4
    module = HierarchicalReasoningModel_3LevelAttention(d, d // H, H, cross=cross)
    rope = hrm_3level.RotaryEmbedding(d // H, S, base=100.0)
    cos, sin = rope()
    x, ctx = torch.randn(B, S, d), torch.randn(B, S, d)
    pos = torch.arange(S)
    sparse = sparse_attention_mask(pos, pos, window_size=4, num_global=3, causal=causal)
    got = module(x, (cos, sin), sparse, causal, context=ctx if cross else None)
    torch.testing.assert_close(got.double(), naive_attention(module, x, cos, sin, sparse, ctx), atol=1e-5, rtol=1e-5)
    # Dense path (mask None -> kernel handles causality) against the same reference with a dense mask.
    dense = sparse_attention_mask(pos, pos, window_size=None, num_global=0, causal=causal)
    got = module(x, (cos, sin), None, causal, context=ctx if cross else None)
    torch.testing.assert_close(got.double(), naive_attention(module, x, cos, sin, dense, ctx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_kv_cache_chunks_equal_full_causal(cross):
    torch.manual_seed(1)
    B, S, d, H = 2, 12, 32, 4
    module = HierarchicalReasoningModel_3LevelAttention(d, d // H, H, cross=cross)
    cos, sin = hrm_3level.RotaryEmbedding(d // H, S, base=1000.0)()
    x, ctx = torch.randn(B, S, d), torch.randn(B, S, d)
    pos = torch.arange(S)
    mask = sparse_attention_mask(pos, pos, window_size=2, num_global=1, causal=True)
    full = module(x, (cos, sin), mask, True, context=ctx if cross else None)
    cache, outs, start = HierarchicalReasoningModel_3LevelCache(), [], 0
    for size in (5, 1, 1, 3, 2):
        end = start + size
        sl = slice(start, end)
        outs.append(
            module(
                x[:, sl], (cos[sl], sin[sl]), mask[sl, :end], True, context=ctx[:, sl] if cross else None, cache=cache
            )
        )
        start = end
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_planner_only_sees_window_and_global_tokens():
    # One planner layer: its output at a position depends only on the keys the sparse mask allows.
    model = make_model(planner_layers=1, window_size=3, num_global_tokens=2, seq_len=30)
    captured = {}
    model.planner.register_forward_hook(lambda mod, inp, out: captured.__setitem__("plan", out))
    batch = random_batch(model.config.model_dump())
    model.eval()
    with torch.no_grad():
        model(model.initial_carry(batch), batch)
        plan_a = captured["plan"]
        changed = {k: v.clone() for k, v in batch.items()}
        j = 20
        changed["inputs"][:, j] = (changed["inputs"][:, j] + 1) % model.config.vocab_size
        model(model.initial_carry(changed), changed)
        plan_b = captured["plan"]
    moved = (plan_a - plan_b).abs().amax(dim=(0, 2)) > 1e-6  # [S]
    expected = torch.tensor([abs(i - j) <= 3 or i < 2 for i in range(30)])
    assert torch.equal(moved, expected)


@pytest.mark.parametrize("puzzle_emb_ndim", [0, 40])
def test_causal_model_never_looks_ahead(puzzle_emb_ndim):
    model = make_model(causal=True, puzzle_emb_ndim=puzzle_emb_ndim).eval()
    batch = random_batch(model.config.model_dump())
    t = 10
    changed = {k: v.clone() for k, v in batch.items()}
    changed["inputs"][:, t + 1 :] = (changed["inputs"][:, t + 1 :] + 5) % model.config.vocab_size
    with torch.no_grad():
        _, a = model(model.initial_carry(batch), batch)
        _, b = model(model.initial_carry(changed), changed)
    torch.testing.assert_close(a["logits"][:, : t + 1], b["logits"][:, : t + 1], atol=1e-5, rtol=1e-5)
    assert (a["logits"][:, t + 1 :] - b["logits"][:, t + 1 :]).abs().max() > 1e-3

    # Non-causal sanity check: the same change does reach earlier positions.
    model = make_model(causal=False, puzzle_emb_ndim=puzzle_emb_ndim).eval()
    with torch.no_grad():
        _, a = model(model.initial_carry(batch), batch)
        _, b = model(model.initial_carry(changed), changed)
    assert (a["logits"][:, :t] - b["logits"][:, :t]).abs().max() > 1e-3


# --- embedding -----------------------------------------------------------------------------------------


def test_level_rope_bases_scale_1_01_001():
    model = make_model(rope_theta=10000.0)
    head_dim = 32 // 4
    for level, scale in enumerate((1.0, 0.1, 0.01)):
        cos, sin = model.embedding.rotary[level]()
        base = 10000.0 * scale
        for pos in (1, 7):
            for i in range(head_dim // 2):
                angle = pos / base ** (2 * i / head_dim)
                assert cos[pos, i].item() == pytest.approx(math.cos(angle), abs=1e-5)
                assert sin[pos, i + head_dim // 2].item() == pytest.approx(math.sin(angle), abs=1e-5)
    assert model.embedding.level_embed.shape == (3, 32)
    assert 0.005 < model.embedding.level_embed.std().item() < 0.04  # init std 0.02


def test_float8_token_table_roundtrip_and_straight_through_gradient():
    model = make_model(token_storage_dtype="float8_e4m3fn")
    emb = model.embedding.embed_tokens
    if not hrm_3level.float8_supported(torch.device("cpu")):
        pytest.skip("this torch build cannot cast/gather float8 on CPU")
    assert emb.table.dtype == torch.float8_e4m3fn
    ids = torch.tensor([[0, 3, 3, 12], [5, 0, 0, 0]])
    out = emb(ids)
    master = emb.embedding_weight.detach()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal numbers, plus the subnormal step.
    deq = emb.dequantised()
    step = master.abs().amax(-1, keepdim=True) / 448 * 2.0**-9
    assert torch.all((deq - master).abs() <= master.abs() * 2.0**-4 + step)
    assert not torch.equal(deq, master)  # it really is quantised
    # The lookup returns the quantised rows.
    torch.testing.assert_close(out, deq[ids], atol=1e-7, rtol=1e-6)
    # Straight-through: d(sum of looked-up rows)/d(master row r) = number of times r was looked up.
    weights = torch.randn(ids.shape + (32,))
    (emb(ids) * weights).sum().backward()
    expected = torch.zeros_like(master).index_add_(0, ids.flatten(), weights.reshape(-1, 32))
    torch.testing.assert_close(emb.embedding_weight.grad, expected)
    # An in-place optimizer-style update of the master is seen by the next lookup (no stale copy).
    with torch.no_grad():
        emb.embedding_weight.mul_(2.0)
    torch.testing.assert_close(emb(ids), 2 * deq[ids], atol=1e-6, rtol=1e-6)


def test_token_table_falls_back_to_bf16_without_float8(monkeypatch):
    monkeypatch.setattr(hrm_3level, "float8_supported", lambda device: False)
    model = make_model(token_storage_dtype="float8_e4m3fn")
    emb = model.embedding.embed_tokens
    assert emb.table.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2]])
    expected = emb.embedding_weight.detach()[ids].to(torch.bfloat16).float()
    torch.testing.assert_close(emb(ids), expected)


# --- optimizer groups, loss head ------------------------------------------------------------------


def test_optimizer_param_groups_cover_every_parameter_once():
    model = make_model(puzzle_emb_ndim=32)
    groups = model.optimizer_param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    by_scale = {g["lr_scale"]: {id(p) for p in g["params"]} for g in groups if g["lr_scale"] != 1.0}
    assert by_scale[1.5] == {id(p) for p in model.decomposer.parameters()}
    assert by_scale[2.0] == {id(p) for p in model.executor.parameters()}
    planner = next(g for g in groups if {id(p) for p in g["params"]} == {id(p) for p in model.planner.parameters()})
    assert planner["lr_scale"] == 1.0
    # The sparse puzzle embedding is a buffer for the sign-SGD optimizer, never in an Adam group.
    assert model.puzzle_emb.weights.data_ptr() not in {p.data_ptr() for p in model.parameters()}


def test_every_parameter_gets_gradient_from_the_loss():
    model = make_model(puzzle_emb_ndim=32)
    head = HierarchicalLossHead(model, loss_type="softmax_cross_entropy")
    batch = random_batch(model.config.model_dump())
    _, loss, *_ = head([], carry=head.initial_carry(batch), batch=batch)
    loss.backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert model.puzzle_emb.local_weights.grad is not None


def test_confidence_probe_trains_only_itself():
    model = make_model()
    head = HierarchicalLossHead(model, lm_loss_weight=0, plan_loss_weight=0, decomp_loss_weight=0, exec_loss_weight=0)
    batch = random_batch(model.config.model_dump())
    _, loss, metrics, _, _ = head([], carry=head.initial_carry(batch), batch=batch)
    assert loss.item() == pytest.approx(0.5 * metrics["q_halt_loss"].item())
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"q_head.weight", "q_head.bias"}


def naive_seq_mean_ce(logits, labels):
    """Sum over sequences of the mean softmax cross entropy over labelled tokens, by explicit loops."""
    total = 0.0
    for b in range(labels.shape[0]):
        terms = []
        for s in range(labels.shape[1]):
            if labels[b, s] != -100:
                row = logits[b, s].double()
                terms.append(-(row[labels[b, s]] - row.exp().sum().log()).item())
        total += sum(terms) / max(len(terms), 1)
    return total


def test_loss_head_hierarchical_objective_and_metrics():
    model = make_model()
    head = HierarchicalLossHead(
        model, loss_type="softmax_cross_entropy", plan_loss_weight=0.3, decomp_loss_weight=0.2, exec_loss_weight=0.1
    )
    batch = random_batch(model.config.model_dump())
    batch["labels"][0, :5] = -100
    batch["labels"][1, :] = -100  # a sequence with no labels counts nowhere
    carry = head.initial_carry(batch)
    new_carry, loss, metrics, outputs, all_halted = head(["logits", "plan"], carry=carry, batch=batch)
    assert bool(all_halted) and set(outputs) == {"logits", "plan"}
    assert set(head.metric_names(training=True)) == set(metrics)  # what the head declares is what it reports
    head.eval()
    assert set(head(["logits"], carry=head.initial_carry(batch), batch=batch)[2]) == set(head.metric_names())

    labels = batch["labels"]
    with torch.no_grad():
        _, out = model(carry, batch)
        expected = {"lm_loss": naive_seq_mean_ce(out["logits"], labels)}
        for key, name in (("plan", "plan_loss"), ("decomposition", "decomp_loss"), ("execution", "exec_loss")):
            readout = rms_norm(out[key], 1e-5) @ model.lm_head.weight.T
            expected[name] = naive_seq_mean_ce(readout, labels)
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value, rel=1e-4)
    # The confidence probe: BCE of q_halt against "the whole sequence is right", written out by hand.
    seq_right = [bool(((out["logits"][b].argmax(-1) == labels[b]) | (labels[b] == -100)).all()) for b in range(2)]
    q = out["q_halt_logits"].double()
    expected["q_halt_loss"] = sum(
        -math.log(torch.sigmoid(q[b]).item()) if seq_right[b] else -math.log(1 - torch.sigmoid(q[b]).item())
        for b in range(2)
    )
    assert metrics["q_halt_loss"].item() == pytest.approx(expected["q_halt_loss"], rel=1e-4)
    combined = (
        expected["lm_loss"]
        + 0.3 * expected["plan_loss"]
        + 0.2 * expected["decomp_loss"]
        + 0.1 * expected["exec_loss"]
        + 0.5 * expected["q_halt_loss"]
    )
    assert loss.item() == pytest.approx(combined, rel=1e-4)

    preds = out["logits"].argmax(-1)
    labelled = labels[0] != -100
    acc0 = ((preds[0] == labels[0]) & labelled).sum().item() / labelled.sum().item()
    assert metrics["count"].item() == 1 and metrics["steps"].item() == 1
    assert metrics["accuracy"].item() == pytest.approx(acc0)
    assert metrics["exact_accuracy"].item() == int(acc0 == 1.0)
    assert metrics["q_halt_accuracy"].item() == int((q[0].item() >= 0) == seq_right[0])

    # Make sequence 0 exactly right: exact accuracy counts it.
    batch["labels"][0] = torch.where(labelled, preds[0], -100).to(torch.int32)
    _, _, metrics, _, _ = head([], carry=carry, batch=batch)
    assert metrics["exact_accuracy"].item() == 1 and metrics["accuracy"].item() == pytest.approx(1.0)


def test_config_errors_and_extra_keys():
    HierarchicalReasoningModel_3Level(tiny_config(causal=False, name="hrm.x@Y"))  # the launcher's keys pass
    with pytest.raises(ValueError, match=r"unknown key 'arch.some_misspelled_key'"):
        HierarchicalReasoningModel_3Level(tiny_config(some_misspelled_key=3))
    with pytest.raises(ValueError, match="num_heads"):
        HierarchicalReasoningModel_3Level(tiny_config(num_heads=3, hidden_size=33))
    with pytest.raises(ValueError, match="hidden_size"):
        HierarchicalReasoningModel_3Level(tiny_config(hidden_size=30, num_heads=4))
    with pytest.raises(ValueError, match="forward_dtype"):
        HierarchicalReasoningModel_3Level(tiny_config(forward_dtype="float13"))
    with pytest.raises(ValueError, match="loss_type"):
        HierarchicalLossHead(make_model(), loss_type="nope")


def test_arch_yaml_builds_through_the_launcher_identifiers():
    arch = OmegaConf.to_container(OmegaConf.load(REPO / "config/arch/hrm_3level.yaml"), resolve=True)
    model_cls = load_model_class(arch.pop("name"), prefix="models.")
    loss_cfg = arch.pop("loss")
    loss_cls = load_model_class(loss_cfg.pop("name"), prefix="models.")
    assert model_cls is HierarchicalReasoningModel_3Level and loss_cls is HierarchicalLossHead
    model = model_cls(
        {**arch, "batch_size": 2, "seq_len": 81, "vocab_size": 11, "num_puzzle_identifiers": 1, "causal": False}
    )
    head = loss_cls(model, **loss_cfg)
    assert model.config.puzzle_emb_ndim == model.config.hidden_size == 512
    assert model.config.rope_level_scales == (1.0, 0.1, 0.01)
    assert head.weights == {"lm_loss": 1.0, "plan_loss": 0.3, "decomp_loss": 0.2, "exec_loss": 0.1, "q_halt_loss": 0.5}
    assert sorted(g["lr_scale"] for g in model.optimizer_param_groups()) == [1.0, 1.0, 1.5, 2.0]


# --- generation ----------------------------------------------------------------------------------------


def test_top_p_filter_and_greedy_sampling_by_hand():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs, 0.8), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs, 0.81), torch.tensor([[0.15, 0.5, 0.0, 0.3]]) / 0.95)
    torch.testing.assert_close(top_p_filter(probs, 0.1), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    assert sample_next_token(logits, temperature=0, top_p=1.0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(probs.log(), 1.0, 0.7, g).item() for _ in range(200)}
    assert draws == {1, 3}  # only the nucleus is ever sampled, and both of its tokens are


@pytest.mark.parametrize("puzzle_emb_ndim", [0, 40])
def test_generate_cached_equals_uncached(puzzle_emb_ndim):
    model = make_model(seed=3, causal=True, seq_len=20, puzzle_emb_ndim=puzzle_emb_ndim, window_size=2)
    prompt = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(0))
    pids = torch.tensor([1, 2], dtype=torch.int32)

    # Incremental logits match the full forward at every position.
    cache = HierarchicalReasoningModel_3LevelCache()
    with torch.no_grad():
        full = model.lm_head(model._forward_levels(prompt, pids)["integrated"])[:, model.puzzle_emb_len :]
        steps = [model.next_token_logits(prompt[:, :3], pids, cache)]
        steps += [model.next_token_logits(prompt[:, t : t + 1], pids, cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 2:], atol=1e-5, rtol=1e-5)

    greedy = [model.generate(prompt, 10, temperature=0, use_cache=c, puzzle_identifiers=pids) for c in (True, False)]
    assert greedy[0].shape == (2, 16) and torch.equal(greedy[0][:, :6], prompt)
    assert torch.equal(greedy[0], greedy[1])

    sampled = [
        model.generate(prompt, 10, temperature=1.3, top_p=0.9, use_cache=c, generator=torch.Generator().manual_seed(7), puzzle_identifiers=pids)
        for c in (True, False)
    ]  # fmt: skip
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], greedy[0])  # sampling really sampled

    # seq_len 20 token positions (the puzzle prefix has its own): a 6-token prompt grows by 15, the
    # last sampled token never being fed back, but not by 16.
    assert model.generate(prompt, 15, temperature=0, puzzle_identifiers=pids).shape == (2, 21)
    with pytest.raises(ValueError, match="exceeds"):
        model.generate(prompt, 16, temperature=0)


def test_generate_requires_causal():
    with pytest.raises(ValueError, match="causal"):
        make_model(causal=False).generate(torch.zeros(1, 3, dtype=torch.long), 2)


# --- training ------------------------------------------------------------------------------------------


def random_sudoku(rng: np.random.Generator) -> np.ndarray:
    """A valid solved 9x9 grid: the pattern (3*(r%3) + r//3 + c) % 9, then validity-preserving permutations."""
    base = np.array([[(3 * (r % 3) + r // 3 + c) % 9 for c in range(9)] for r in range(9)])
    bands = rng.permutation(3)
    rows = np.concatenate([3 * b + rng.permutation(3) for b in bands])
    stacks = rng.permutation(3)
    cols = np.concatenate([3 * s + rng.permutation(3) for s in stacks])
    grid = rng.permutation(9)[base[rows][:, cols]] + 1  # digits 1..9
    return grid.T if rng.random() < 0.5 else grid


def sudoku_batch(rng, batch_size, num_blanks=40):
    grids = np.stack([random_sudoku(rng) for _ in range(batch_size)])
    for g in grids:  # the generator itself is checked: every row, column and box is 1..9
        for k in range(9):
            assert (
                sorted(g[k])
                == sorted(g[:, k])
                == sorted(g[3 * (k // 3) : 3 * (k // 3) + 3, 3 * (k % 3) : 3 * (k % 3) + 3].ravel())
                == list(range(1, 10))
            )
    labels = grids.reshape(batch_size, 81) + 1  # tokens: PAD 0, blank 1, digit d -> d + 1
    inputs = labels.copy()
    for row in inputs:
        row[rng.choice(81, num_blanks, replace=False)] = 1
    return {
        "inputs": torch.from_numpy(inputs).to(torch.int32),
        "labels": torch.from_numpy(labels).to(torch.int32),
        "puzzle_identifiers": torch.zeros(batch_size, dtype=torch.int32),
    }


def test_trains_on_synthetic_sudoku_with_falling_loss():
    start = time.perf_counter()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = tiny_config(
        batch_size=16, seq_len=81, vocab_size=11, num_puzzle_identifiers=1, puzzle_emb_ndim=64,
        hidden_size=64, num_heads=4, window_size=9, num_global_tokens=1,
    )  # fmt: skip
    model = HierarchicalReasoningModel_3Level(config)
    head = HierarchicalLossHead(model, loss_type="stablemax_cross_entropy")
    base_lr = 3e-3
    groups = [{**g, "lr": base_lr * g["lr_scale"]} for g in model.optimizer_param_groups()]
    optimizer = torch.optim.Adam(groups, lr=base_lr)
    totals, lm_losses = [], []
    for _ in range(40):
        batch = sudoku_batch(rng, config["batch_size"])
        _, loss, metrics, _, _ = head([], carry=head.initial_carry(batch), batch=batch)
        (loss / config["batch_size"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        totals.append(loss.item() / config["batch_size"])
        lm_losses.append(metrics["lm_loss"].item() / config["batch_size"])
    first, last = np.mean(totals[:5]), np.mean(totals[-5:])
    # Copying the 41 givens and guessing the rest uniformly is worth ~40/81*ln(9) = 1.08 nats vs ln(11) = 2.4.
    assert last < 0.7 * first, (first, last)
    assert np.mean(lm_losses[-5:]) < 1.4, lm_losses
    print(f"sudoku training: loss {first:.3f} -> {last:.3f} in {time.perf_counter() - start:.1f}s")


# --- launcher integration ------------------------------------------------------------------------------


def write_reverse_dataset(root: Path, seq_len=12, vocab=6, num_train=16, num_test=8):
    """A dataset in the on-disk layout of dataset/common.py, written directly: one example per puzzle and group."""
    rng = np.random.default_rng(0)
    for split, n in (("train", num_train), ("test", num_test)):
        inputs = rng.integers(1, vocab, size=(n, seq_len), dtype=np.int32)
        arrays = {
            "inputs": inputs,
            "labels": inputs[:, ::-1].copy(),
            "puzzle_identifiers": np.full(n, 1 if split == "train" else 0, dtype=np.int32),
            "puzzle_indices": np.arange(n + 1, dtype=np.int32),
            "group_indices": np.arange(n + 1, dtype=np.int32),
        }
        (root / split).mkdir(parents=True)
        for key, value in arrays.items():
            np.save(root / split / f"all__{key}.npy", value)
        meta = dict(
            pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vocab, seq_len=seq_len,
            num_puzzle_identifiers=2, total_groups=n, mean_puzzle_examples=1.0, sets=["all"],
        )  # fmt: skip
        (root / split / "dataset.json").write_text(json.dumps(meta))
    (root / "identifiers.json").write_text(json.dumps(["<blank>", "reverse"]))


@pytest.mark.slow
def test_pretrain_trains_and_evaluates_arch_hrm_3level(tmp_path):
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    write_reverse_dataset(data)
    cmd = [
        sys.executable, "pretrain.py", "arch=hrm_3level", f"data_path={data}", f"checkpoint_path={ckpt}",
        "global_batch_size=8", "epochs=2", "eval_interval=1", "lr=1e-3", "lr_warmup_steps=1", "use_wandb=false",
        "arch.hidden_size=32", "arch.num_heads=4", "arch.planner_layers=1", "arch.decomposer_layers=1",
        "arch.executor_layers=1", "arch.window_size=2", "arch.forward_dtype=float32",
        "eval_save_outputs=[inputs,labels,puzzle_identifiers,logits,q_halt_logits]",
    ]  # fmt: skip
    env = {**os.environ, "DISABLE_COMPILE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # 2 epochs x 16 examples / batch 8 = 4 steps; the weights load into a freshly built loss head.
    weights = torch.load(ckpt / "step_4", map_location="cpu")
    weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
    config = tiny_config(
        batch_size=8, seq_len=12, vocab_size=6, num_puzzle_identifiers=2, puzzle_emb_ndim=32, hidden_size=32,
        num_heads=4, window_size=2, num_global_tokens=8, causal=False,
    )  # fmt: skip
    head = HierarchicalLossHead(HierarchicalReasoningModel_3Level(config))
    head.load_state_dict(weights)  # strict: same keys and shapes
    assert "model.puzzle_emb.weights" in weights
    # The sign-SGD optimizer moved the (zero-initialised) puzzle embedding of the one train puzzle.
    assert weights["model.puzzle_emb.weights"][1].abs().sum() > 0

    preds = torch.load(ckpt / "step_4_all_preds.0", map_location="cpu")
    assert preds["logits"].shape == (8, 12, 6) and preds["q_halt_logits"].shape == (8,)
    test_inputs = torch.from_numpy(np.load(data / "test/all__inputs.npy"))
    assert torch.equal(preds["inputs"], test_inputs)

    # evaluate.py on the checkpoint reports the loss the loaded head computes on the 8 test examples.
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"checkpoint={ckpt / 'step_4'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = float(re.search(r"all/lm_loss\W+([-+0-9.eE]+)", proc.stdout + proc.stderr).group(1))
    batch = {
        "inputs": test_inputs,
        "labels": torch.from_numpy(np.load(data / "test/all__labels.npy")),
        "puzzle_identifiers": torch.zeros(8, dtype=torch.int32),
    }
    head.eval()
    with torch.no_grad():
        _, _, metrics, _, _ = head([], carry=head.initial_carry(batch), batch=batch)
    assert reported == pytest.approx(metrics["lm_loss"].item() / 8, rel=1e-4)
