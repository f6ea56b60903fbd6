"""Tiny synthetic datasets in the on-disk layout, written with plain numpy (independent of the library).

Each builder returns the arrays it wrote so that tests can compare what a viewer shows against them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ARC_SIDE = 30


def _arc_canvas(rng: np.random.Generator, grid: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """30x30 canvas: PAD 0, colours +2 at `offset`, an EOS (1) row under and column right of the grid where they fit."""
    canvas = np.zeros((ARC_SIDE, ARC_SIDE), dtype=np.int64)
    r, c = offset
    h, w = grid.shape
    canvas[r : r + h, c : c + w] = grid + 2
    if r + h < ARC_SIDE:
        canvas[r + h, c : c + w + 1] = 1
    if c + w < ARC_SIDE:
        canvas[r : r + h + 1, c + w] = 1
    return canvas.reshape(-1)


def arc_split(rng, num_groups: int, variants: int, examples: int, first_id: int, random_offset: bool):
    """Groups of one puzzle plus `variants - 1` renamed variants; each puzzle `examples` input/label pairs."""
    inputs, labels, ids, names = [], [], [], []
    puzzle_indices, group_indices = [0], [0]
    next_id = first_id
    for g in range(num_groups):
        for v in range(variants):
            for _ in range(examples):
                h, w = rng.integers(1, 7, size=2)
                inp = rng.integers(0, 10, size=(h, w))
                out = rng.integers(0, 10, size=(rng.integers(1, 7), rng.integers(1, 7)))
                off_in = tuple(rng.integers(0, 20, size=2)) if random_offset else (0, 0)
                off_out = tuple(rng.integers(0, 20, size=2)) if random_offset else (0, 0)
                inputs.append(_arc_canvas(rng, inp, off_in))
                labels.append(_arc_canvas(rng, out, off_out))
            ids.append(next_id)
            names.append(f"puz{first_id + g:03d}" if v == 0 else f"puz{first_id + g:03d}_t{v}_0{v}23456789")
            next_id += 1
            puzzle_indices.append(len(inputs))
        group_indices.append(len(ids))
    return {
        "inputs": np.stack(inputs),
        "labels": np.stack(labels),
        "puzzle_identifiers": np.array(ids),
        "puzzle_indices": np.array(puzzle_indices),
        "group_indices": np.array(group_indices),
    }, names


def sudoku_split(rng, num_groups: int, variants: int):
    """Random digit grids (validity does not matter to a viewer); about a third of the cells blank in the input."""
    labels = rng.integers(1, 10, size=(num_groups * variants, 81)) + 1
    inputs = np.where(rng.random(labels.shape) < 0.35, 1, labels)
    n = len(labels)
    return {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": np.zeros(n, dtype=np.int64),
        "puzzle_indices": np.arange(n + 1),
        "group_indices": np.arange(0, n + 1, variants),
    }


def maze_split(rng, n: int, side: int):
    """Walls (1) and open cells (2) with a start (3) and goal (4); labels add path cells (5) on some open cells."""
    inputs = np.where(rng.random((n, side * side)) < 0.3, 1, 2)
    labels = inputs.copy()
    for i in range(n):
        cells = rng.permutation(side * side)[:6]
        inputs[i, cells[0]] = labels[i, cells[0]] = 3
        inputs[i, cells[1]] = labels[i, cells[1]] = 4
        inputs[i, cells[2:]] = labels[i, cells[2:]] = 2
        labels[i, cells[2:]] = 5
    return {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": np.zeros(n, dtype=np.int64),
        "puzzle_indices": np.arange(n + 1),
        "group_indices": np.arange(n + 1),
    }


def write_split(root: Path, split: str, arrays: dict, vocab_size: int, seq_len: int, dtypes: dict | None = None):
    """Save one split's arrays (set `all`) and its dataset.json; `dtypes` picks each array's on-disk dtype."""
    dtypes = {
        "inputs": np.uint8,
        "labels": np.uint8,
        "puzzle_identifiers": np.int32,
        "puzzle_indices": np.int32,
        "group_indices": np.int32,
        **(dtypes or {}),
    }
    d = root / split
    d.mkdir(parents=True, exist_ok=True)
    for key, value in arrays.items():
        np.save(d / f"all__{key}.npy", np.asarray(value).astype(dtypes[key]))
    num_ids = int(np.max(arrays["puzzle_identifiers"])) + 1
    meta = {
        "pad_id": 0,
        "ignore_label_id": 0,
        "blank_identifier_id": 0,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "num_puzzle_identifiers": num_ids,
        "total_groups": len(arrays["group_indices"]) - 1,
        "mean_puzzle_examples": len(arrays["inputs"]) / len(arrays["puzzle_identifiers"]),
        "sets": ["all"],
    }
    (d / "dataset.json").write_text(json.dumps(meta))


def write_arc_dataset(root: Path, seed: int = 0, dtypes: dict | None = None) -> dict:
    """ARC-like dataset: train 3 groups x 2 variants x 3 examples (random offsets), test 2 groups x 2 variants x 1."""
    rng = np.random.default_rng(seed)
    train, train_names = arc_split(rng, 3, 2, 3, first_id=1, random_offset=True)
    test, test_names = arc_split(rng, 2, 2, 1, first_id=1 + len(train_names), random_offset=False)
    write_split(root, "train", train, 12, 900, dtypes)
    write_split(root, "test", test, 12, 900, dtypes)
    names = ["<blank>"] + train_names + test_names
    (root / "identifiers.json").write_text(json.dumps(names))
    return {"train": train, "test": test, "names": names}


def write_sudoku_dataset(root: Path, seed: int = 0, dtypes: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    train, test = sudoku_split(rng, 3, 2), sudoku_split(rng, 5, 1)
    write_split(root, "train", train, 11, 81, dtypes)
    write_split(root, "test", test, 11, 81, dtypes)
    (root / "identifiers.json").write_text(json.dumps(["<blank>"]))
    return {"train": train, "test": test, "names": ["<blank>"]}


def write_maze_dataset(root: Path, seed: int = 0, side: int = 7, dtypes: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    train, test = maze_split(rng, 4, side), maze_split(rng, 3, side)
    write_split(root, "train", train, 6, side * side, dtypes)
    write_split(root, "test", test, 6, side * side, dtypes)
    (root / "identifiers.json").write_text(json.dumps(["<blank>"]))
    return {"train": train, "test": test, "names": ["<blank>"]}


def corrupt(rng, labels: np.ndarray, rows: list[int], vocab_size: int, cells: int = 3) -> np.ndarray:
    """Predictions equal to the labels except `cells` counted cells (label != 0) changed in each of `rows`."""
    preds = labels.astype(np.int64).copy()
    for r in rows:
        where = rng.choice(np.flatnonzero(labels[r] != 0), size=cells, replace=False)
        preds[r, where] = (preds[r, where] + rng.integers(1, vocab_size - 1, size=cells)) % vocab_size
        preds[r, where] = np.where(
            preds[r, where] == labels[r, where], (preds[r, where] + 1) % vocab_size, preds[r, where]
        )
    return preds


def write_saved_predictions(
    ckpt: Path,
    step: int,
    split_arrays: dict,
    preds: np.ndarray,
    q_halt: np.ndarray,
    vocab_size: int,
    world_size: int,
    global_batch: int,
    keep: np.ndarray | None = None,
) -> list[Path]:
    """Mimic evaluate.py: test-mode batches in order, each rank its slice, the last batch padded, one file per rank.

    `keep` (bool per example) drops examples from the saved rows, as if some were never evaluated.
    """
    inputs = split_arrays["inputs"].astype(np.int64)
    labels = split_arrays["labels"].astype(np.int64)
    ex_ids = np.repeat(split_arrays["puzzle_identifiers"], np.diff(split_arrays["puzzle_indices"]))
    idx = np.arange(len(inputs)) if keep is None else np.flatnonzero(keep)
    local = global_batch // world_size
    per_rank = {
        r: {k: [] for k in ("inputs", "labels", "puzzle_identifiers", "logits", "q_halt_logits")}
        for r in range(world_size)
    }
    for start in range(0, len(idx), global_batch):
        rows = idx[start : start + global_batch]
        for r in range(world_size):
            mine = rows[r * local : (r + 1) * local]
            pad = local - len(mine)
            inp = np.concatenate([inputs[mine], np.zeros((pad, inputs.shape[1]), dtype=np.int64)])
            lab = np.concatenate(
                [np.where(labels[mine] == 0, -100, labels[mine]), np.full((pad, labels.shape[1]), -100)]
            )
            pid = np.concatenate([ex_ids[mine], np.zeros(pad, dtype=np.int64)])
            # logits whose argmax is the planted prediction; padding rows predict token 0
            pr = np.concatenate([preds[mine], np.zeros((pad, inputs.shape[1]), dtype=np.int64)])
            logits = np.random.default_rng(start + r).normal(size=pr.shape + (vocab_size,)).astype(np.float32)
            np.put_along_axis(logits, pr[..., None], 10.0, axis=-1)
            q = np.concatenate([q_halt[mine], np.zeros(pad)])
            for key, value in (
                ("inputs", inp),
                ("labels", lab),
                ("puzzle_identifiers", pid),
                ("logits", logits),
                ("q_halt_logits", q),
            ):
                per_rank[r][key].append(value)
    files = []
    ckpt.mkdir(parents=True, exist_ok=True)
    for r, parts in per_rank.items():
        saved = {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}
        saved["inputs"] = saved["inputs"].to(torch.int32)
        saved["labels"] = saved["labels"].to(torch.int32)
        saved["puzzle_identifiers"] = saved["puzzle_identifiers"].to(torch.int32)
        saved["q_halt_logits"] = saved["q_halt_logits"].to(torch.float32)
        saved["q_continue_logits"] = -saved["q_halt_logits"]
        path = ckpt / f"step_{step}_all_preds.{r}"
        torch.save(saved, path)
        files.append(path)
    return files
