"""The ACT carry's tree operations (training/carry.py) on carries shaped as HRM's, TRM's and the three-level
model's are: dataclasses holding dataclasses, tensors and dictionaries."""

import dataclasses

import pytest
import torch

from training import carry as carry_tree


@dataclasses.dataclass
class Inner:
    z_H: torch.Tensor
    z_L: torch.Tensor


@dataclasses.dataclass
class Carry:
    inner_carry: Inner
    steps: torch.Tensor
    halted: torch.Tensor
    current_data: dict


def make(rows: int, seed: int = 0) -> Carry:
    g = torch.Generator().manual_seed(seed)
    return Carry(
        Inner(torch.randn(rows, 3, generator=g), torch.randn(rows, 3, generator=g)),
        torch.randint(0, 4, (rows,), generator=g),
        torch.zeros(rows, dtype=torch.bool),
        {"inputs": torch.randint(0, 9, (rows, 5), generator=g), "tag": "kept"},
    )


def assert_same(a: Carry, b: Carry) -> None:
    for x, y in zip(dataclasses.astuple(a.inner_carry), dataclasses.astuple(b.inner_carry)):
        assert torch.equal(x, y)
    assert torch.equal(a.steps, b.steps) and torch.equal(a.halted, b.halted)
    assert torch.equal(a.current_data["inputs"], b.current_data["inputs"])
    assert a.current_data["tag"] == b.current_data["tag"]


def test_slices_joined_give_the_carry_back():
    carry = make(6)
    parts = [carry_tree.map_tensors(lambda t, r=r: t[r], carry) for r in (slice(0, 2), slice(2, 4), slice(4, 6))]
    assert parts[1].inner_carry.z_H.shape == (2, 3) and parts[1].current_data["tag"] == "kept"
    joined = carry_tree.join(parts)
    assert isinstance(joined, Carry) and isinstance(joined.inner_carry, Inner)
    assert_same(joined, carry)


def test_saved_state_is_plain_and_restores_onto_a_template():
    carry = make(4, seed=1)
    state = carry_tree.to_state(carry)
    assert type(state) is dict and type(state["inner_carry"]) is dict  # no model classes in a train state
    assert state["steps"].data_ptr() != carry.steps.data_ptr()
    template = carry_tree.map_tensors(torch.zeros_like, make(4, seed=2))
    restored = carry_tree.from_state(template, state)
    assert_same(restored, carry)
    assert restored.steps.dtype == template.steps.dtype


def test_a_saved_state_of_another_shape_or_missing_a_field_names_the_place():
    state = carry_tree.to_state(make(4))
    with pytest.raises(
        ValueError, match=r"^train state: carry\.inner_carry\.z_H has shape \(4, 3\), expected \(3, 3\)$"
    ):
        carry_tree.from_state(make(3), state)
    del state["inner_carry"]["z_L"]
    with pytest.raises(ValueError, match=r"^train state: carry\.inner_carry\.z_L is missing$"):
        carry_tree.from_state(make(4), state)


def test_mark_halted_only_where_the_flag_holds():
    carry = make(3)
    carry_tree.mark_halted(carry, torch.tensor(False))
    assert not carry.halted.any()
    carry_tree.mark_halted(carry, torch.tensor(True))
    assert carry.halted.all()
    carry_tree.mark_halted({"no": "halted field"}, torch.tensor(True))  # a carry without one is left alone
