"""The ACT carry that persists from one train batch to the next, in one place.

A carry is a tree of dataclasses, mappings and tensors (HRM's and TRM's carry dataclasses, the three-level
model's dictionaries). `tree_map` is the one walk over such trees, over several of the same shape at once; the
operations the training runtime needs are built on it:
- `map_tensors` (a clone after a CUDA-graph replay, the rows of one micro-batch),
- `join` (micro-batches' carries back into the whole batch's),
- `to_state` / `from_state` (a train state holds plain dictionaries of CPU tensors; restoring fills a carry built
  from the next batch, on its devices, and checks every shape),
- `mark_halted` (a skipped update restarts every row, on the device, without a host decision).
The carry's lifecycle in a run (built from the first batch or a restored state, dropped after a skipped last
step, saved with the train state) is `TrainState`'s methods, in training/train_state.py.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def _child(tree: Any, name: str, where: str) -> Any:
    try:
        return getattr(tree, name) if dataclasses.is_dataclass(tree) else tree[name]
    except (AttributeError, KeyError, TypeError):
        raise ValueError(f"train state: {where} is missing") from None


def tree_map(fn: Callable[..., Any], first: Any, *others: Any, where: str = "carry") -> Any:
    """`fn(where, leaf, *other_leaves)` at every leaf of `first` (a tensor or any non-container value), with the
    leaves at the same place of `others`; the result has `first`'s structure. `others` may be plain mappings
    where `first` has dataclasses (a saved state); `where` names the place (`carry.inner_carry.z_H`)."""
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = {
            f.name: tree_map(
                fn,
                getattr(first, f.name),
                *(_child(o, f.name, f"{where}.{f.name}") for o in others),
                where=f"{where}.{f.name}",
            )
            for f in dataclasses.fields(first)
        }
        return dataclasses.replace(first, **fields)
    if isinstance(first, Mapping):
        return {
            k: tree_map(fn, v, *(_child(o, k, f"{where}.{k}") for o in others), where=f"{where}.{k}")
            for k, v in first.items()
        }
    return fn(where, first, *others)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], carry: Any) -> Any:
    """`fn` applied to every tensor of `carry`; other leaves kept."""
    return tree_map(lambda _, leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf, carry)


def join(parts: Sequence[Any]) -> Any:
    """Carries of consecutive row slices concatenated along the batch dimension (the inverse of slicing)."""

    def cat(_: str, *leaves: Any) -> Any:
        return torch.cat(leaves, dim=0) if isinstance(leaves[0], torch.Tensor) else leaves[0]

    return tree_map(cat, parts[0], *parts[1:])


def to_state(carry: Any) -> Any:
    """The carry as a train state holds it: nested plain dictionaries of CPU tensors."""

    def plain(_: str, leaf: Any) -> Any:
        return leaf.detach().cpu().clone() if isinstance(leaf, torch.Tensor) else leaf

    def unfold(tree: Any) -> Any:  # dataclasses → dictionaries, so the file needs no model classes to be read
        if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
            return {f.name: unfold(getattr(tree, f.name)) for f in dataclasses.fields(tree)}
        if isinstance(tree, Mapping):
            return {k: unfold(v) for k, v in tree.items()}
        return tree

    return unfold(tree_map(plain, carry))


def from_state(template: Any, state: Any) -> Any:
    """`template` (a carry made by `initial_carry`) filled with the values of `state`, on the template's devices
    and dtypes; a tensor of another shape, or a missing one, is a ValueError naming its place."""

    def fill(where: str, leaf: Any, saved: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return saved
        if not isinstance(saved, torch.Tensor) or saved.shape != leaf.shape:
            got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"train state: {where} has shape {got}, expected {tuple(leaf.shape)}")
        return saved.to(device=leaf.device, dtype=leaf.dtype)

    return tree_map(fill, template, state)


def mark_halted(carry: Any, flag: torch.Tensor) -> None:
    """Where `flag` (0-dim bool) holds True, mark every row of the carry halted, in place: the next step restarts
    them from the initial state and the next batch, as a fresh carry would."""
    halted = getattr(carry, "halted", None)
    if isinstance(halted, torch.Tensor):
        halted.logical_or_(flag)
