"""The ACT wrapper HRM and TRM share (models/act.py), through both models: halting in evaluation, exploration,
the carry's reset and reload of halted rows, and the Q-learning target where a model has one (HRM; TRM with
no_ACT_continue=false). What differs between the models — the recursion, TRM's halting rule — is tested in
their own files."""

import math
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
import torch

from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1Carry, HierarchicalReasoningModel_ACTV1InnerCarry
from models.recursive_reasoning.trm import (
    TinyRecursiveReasoningModel_ACTV1Carry,
    TinyRecursiveReasoningModel_ACTV1InnerCarry,
)
from tests import helpers
from tests.helpers import randomise, run_steps
from tests.helpers import set_q_bias as set_q_head

hrm = SimpleNamespace(tiny_config=helpers.hrm_tiny_config, make_batch=helpers.hrm_make_batch, build=helpers.hrm_build)
trm = SimpleNamespace(tiny_config=helpers.trm_tiny_config, make_batch=helpers.trm_make_batch, build=helpers.trm_build)


class Kind(NamedTuple):
    tests: Any  # the model's tiny helpers (tests/helpers.py): tiny_config, make_batch, build
    overrides: dict  # config keys of this variant
    carry: type
    inner_carry: type

    def config(self, **overrides) -> dict:
        return self.tests.tiny_config(**{**self.overrides, **overrides})


KINDS = {
    "hrm": Kind(hrm, {}, HierarchicalReasoningModel_ACTV1Carry, HierarchicalReasoningModel_ACTV1InnerCarry),
    "trm": Kind(trm, {}, TinyRecursiveReasoningModel_ACTV1Carry, TinyRecursiveReasoningModel_ACTV1InnerCarry),
    "trm_act_continue": Kind(
        trm,
        {"no_ACT_continue": False},
        TinyRecursiveReasoningModel_ACTV1Carry,
        TinyRecursiveReasoningModel_ACTV1InnerCarry,
    ),
}
EVERY = list(KINDS)
WITH_TARGET = ["hrm", "trm_act_continue"]  # the models that bootstrap a Q-continue target
MODELS = ["hrm", "trm"]  # where no_ACT_continue plays no part


@pytest.mark.parametrize("kind", EVERY)
def test_eval_halts_only_at_max_steps(kind):
    k = KINDS[kind]
    cfg = k.config(halt_max_steps=3)
    model = k.tests.build(cfg).eval()
    set_q_head(model, (5.0, -5.0))  # Q strongly says "halt" (both rules); evaluation ignores it
    for i, (carry, out) in enumerate(run_steps(model, k.tests.make_batch(cfg, 7), 3), start=1):
        assert carry.steps.tolist() == [i] * 4
        assert carry.halted.tolist() == [i == 3] * 4
        assert "target_q_continue" not in out


@pytest.mark.parametrize("kind", EVERY)
def test_training_with_halt_max_steps_one(kind):
    k = KINDS[kind]
    cfg = k.config(halt_max_steps=1, halt_exploration_prob=1.0)
    model = k.tests.build(cfg).train()
    carry, out = run_steps(model, k.tests.make_batch(cfg, 9), 1)[0]
    assert bool(carry.halted.all())
    assert "target_q_continue" not in out  # the last step never bootstraps


@pytest.mark.parametrize("kind", EVERY)
def test_exploration_minimum_steps_replays_global_rng(kind):
    k = KINDS[kind]
    b, max_steps, prob = 64, 5, 0.5
    cfg = k.config(batch_size=b, halt_max_steps=max_steps, halt_exploration_prob=prob)
    model = k.tests.build(cfg).train()
    set_q_head(model, (5.0, -5.0))  # Q always wants to halt (both rules): only exploration keeps rows running
    batch = k.tests.make_batch(cfg, 10)

    torch.manual_seed(123)
    draws = []
    for _ in range(2):  # rand_like then randint_like, per step
        explore = torch.rand(b) < prob
        draws.append(explore * torch.randint(2, max_steps + 1, (b,), dtype=torch.int32))

    torch.manual_seed(123)
    carry, _ = model(model.initial_carry(batch), batch)
    assert carry.steps.tolist() == [1] * b
    assert torch.equal(carry.halted, draws[0] <= 1)
    assert 0 < int(carry.halted.sum()) < b  # both outcomes occur, so the check has teeth

    steps_before = torch.where(carry.halted, 0, carry.steps)
    carry, _ = model(carry, batch)
    assert torch.equal(carry.steps, steps_before + 1)
    assert torch.equal(carry.halted, carry.steps >= draws[1])


@pytest.mark.parametrize("kind", WITH_TARGET)
def test_target_q_continue_matches_second_inner_pass(kind):
    k = KINDS[kind]
    cfg = k.config(batch_size=8, halt_max_steps=2)
    model = k.tests.build(cfg).train()
    randomise(model)  # Q head and puzzle rows random: rows differ, some halt at once, others run to the limit
    batch = k.tests.make_batch(cfg, 11)
    carry = model.initial_carry(batch)
    seen_last = set()
    for _ in range(4):
        carry, out = model(carry, batch)
        with torch.no_grad():
            _, _, (next_q_halt, next_q_continue) = model.inner(carry.inner_carry, carry.current_data)
        is_last = carry.steps >= 2
        seen_last |= set(is_last.tolist())
        expected = torch.sigmoid(torch.where(is_last, next_q_halt, torch.maximum(next_q_halt, next_q_continue)))
        torch.testing.assert_close(out["target_q_continue"], expected)
    assert seen_last == {True, False}  # both branches of the target were checked


@pytest.mark.parametrize("kind", WITH_TARGET)
def test_target_q_continue_formula_hand_values(kind, monkeypatch):
    """Script the inner model's Q outputs: first pass (decides halting), second pass (bootstrap target)."""
    k = KINDS[kind]
    cfg = k.config(halt_max_steps=2)
    model = k.tests.build(cfg).train()
    scripted = [
        (torch.full((4,), -10.0), torch.full((4,), 10.0)),  # never halt on Q
        (torch.tensor([1.0, 3.0, 2.0, 0.5]), torch.tensor([0.0, -1.0, 5.0, 4.0])),
    ]
    original_forward = model.inner.forward

    def scripted_forward(carry, batch):
        new_carry, logits, _ = original_forward(carry, batch)
        return new_carry, logits, scripted.pop(0)

    monkeypatch.setattr(model.inner, "forward", scripted_forward)
    batch = k.tests.make_batch(cfg, 16)
    carry = model.initial_carry(batch)
    # Rows 0 and 2 have already run one step, rows 1 and 3 none: after this step is_last = [T, F, T, F].
    carry = k.carry(
        model.inner.reset_carry(torch.ones(4, dtype=torch.bool), carry.inner_carry),
        torch.tensor([1, 0, 1, 0], dtype=torch.int32),
        torch.zeros(4, dtype=torch.bool),
        batch,
    )
    carry, out = model(carry, batch)
    assert carry.steps.tolist() == [2, 1, 2, 1]
    assert carry.halted.tolist() == [True, False, True, False]
    # last rows: sigmoid(next q_halt); others: sigmoid(max(next q_halt, next q_continue)).
    expected = [1 / (1 + math.exp(-v)) for v in (1.0, 3.0, 2.0, 4.0)]
    assert out["target_q_continue"].tolist() == pytest.approx(expected, abs=1e-6)
    assert not scripted  # exactly the two passes


@pytest.mark.parametrize("kind", MODELS)
def test_halted_rows_are_reset_and_reloaded(kind):
    k = KINDS[kind]
    cfg = k.config(halt_max_steps=8)
    model = k.tests.build(cfg).eval()
    batch_a, batch_b = k.tests.make_batch(cfg, 12), k.tests.make_batch(cfg, 13)
    carry = run_steps(model, batch_a, 2)[-1][0]
    assert carry.steps.tolist() == [2] * 4

    flag = torch.tensor([True, False, True, False])
    carry = k.carry(carry.inner_carry, carry.steps, flag, carry.current_data)
    new_carry, out = model(carry, batch_b)
    assert new_carry.steps.tolist() == [1, 3, 1, 3]
    for key in batch_a:
        expected = torch.where(flag.view((-1,) + (1,) * (batch_a[key].ndim - 1)), batch_b[key], batch_a[key])
        assert torch.equal(new_carry.current_data[key], expected)

    # Reset rows start from H_init/L_init: identical to a fresh first step on batch B.
    fresh_carry, fresh_out = model(model.initial_carry(batch_b), batch_b)
    torch.testing.assert_close(new_carry.inner_carry.z_H[flag], fresh_carry.inner_carry.z_H[flag])
    torch.testing.assert_close(out["logits"][flag], fresh_out["logits"][flag])
    # Kept rows continue from their own state: the same as a third uninterrupted step on batch A.
    third_out = run_steps(model, batch_a, 3)[-1][1]
    torch.testing.assert_close(out["logits"][~flag], third_out["logits"][~flag])


@pytest.mark.parametrize("kind", MODELS)
def test_reset_carry_uses_init_states(kind):
    k = KINDS[kind]
    inner = k.tests.build(k.config()).inner
    carry = k.inner_carry(z_H=torch.zeros(4, 8, 16), z_L=torch.ones(4, 8, 16))
    out = inner.reset_carry(torch.tensor([False, True, False, False]), carry)
    assert torch.equal(out.z_H[1], inner.H_init.expand(8, 16)) and torch.equal(out.z_L[1], inner.L_init.expand(8, 16))
    assert torch.equal(out.z_H[0], carry.z_H[0]) and torch.equal(out.z_L[3], carry.z_L[3])
