"""Seeing HRM puzzles and predictions: export for the browser viewer, PNG sheets, accuracy by ACT step.

Design choices:
- evaluate.py saves, per rank, `step_N_all_preds.{rank}` (torch.save of a dict of tensors) with rows in
  each rank's batch order, padding rows of the last batch included. Rather than re-deriving the batch
  layout, `collect_predictions` concatenates the ranks, drops padding rows (inputs all PAD) and matches
  every other row to its dataset example by (puzzle identifier, input tokens), duplicates in order of
  appearance. The result is aligned with the dataset's example order whatever the world size or batch
  size was; a row matching no example means the wrong dataset and is an error, never a silent skip.
- `export` writes what puzzle_visualizer.html opens next to the dataset: `predictions.json` and per set
  `{set}__predictions.npy` (int32 [examples, seq_len], argmax of the logits, -1 where no prediction was
  saved), `{set}__q_halt_logits.npy` and `{set}__q_continue_logits.npy` (float32, NaN where missing).
- The puzzle kind follows (vocab_size, seq_len) exactly as in the viewer: ARC (12, 900), Sudoku (11, 81),
  Maze (6, square), else generic tokens. ARC canvases are cropped to the bounding box of non-PAD tokens
  (input alone; label and prediction together so that they line up). A prediction cell is wrong where
  the label counts (not ignore_label_id / -100) and the predicted token differs, as in token accuracy.
- matplotlib is the optional extra `viz`, imported only by the drawing code, through `Figure` objects rather
  than pyplot so that calling this from a notebook leaves its backend and open figures alone.
- Accuracy by ACT step needs the model run step by step, which the saved outputs do not hold:
  `act_step_accuracy(head, batches)` runs any head with the ACTLossHead interface over evaluation
  batches and returns a JSON-able dict; save it with `json.dump` and pass it to `sheets --step-accuracy`.

Commands:
  python -m tools.visualize export --predictions CKPT_DIR/step_N_all_preds.0 --dataset DATA --out DIR
  python -m tools.visualize sheets --predictions CKPT_DIR/step_N_all_preds.0 --dataset DATA --out DIR [--max N]
                                   [--only-wrong] [--step-accuracy steps.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset.common import read_json
from utils.cli import OneLineErrorParser, run_flag_command

ARC_PALETTE = [
    "#000000",
    "#0074d9",
    "#ff4136",
    "#2ecc40",
    "#ffdc00",
    "#aaaaaa",
    "#f012be",
    "#ff851b",
    "#7fdbff",
    "#870c25",
]
ARC_EOS_COLOUR = "#d9d9e3"
PAD_COLOUR = "#f0f0f0"
# Maze tokens 1..5 = wall, open, start, goal, path (the maze files' characters "# SGo").
MAZE_COLOURS = {1: "#33343d", 2: "#ffffff", 3: "#2ecc40", 4: "#e0312b", 5: "#ffd24d"}
WRONG_COLOUR = "#ff1744"
SPLIT_NAMES = ("train", "test")
PREDICTIONS_FORMAT = "hrm-predictions-v1"
VIZ_INSTALL_HINT = 'matplotlib is needed for PNG output: pip install matplotlib (or the viz extra, "hrm[viz]")'


# ----------------------------------------------------------------------------------------------- puzzle kinds


def detect_kind(vocab_size: int, seq_len: int) -> tuple[str, int]:
    """(kind, grid width) for a dataset; same rule as the HTML viewer."""
    side = math.isqrt(seq_len)
    square = side * side == seq_len
    if vocab_size == 12 and seq_len == 900:
        return "arc", 30
    if vocab_size == 11 and seq_len == 81:
        return "sudoku", 9
    if vocab_size == 6 and square:
        return "maze", side
    return "generic", side if square else seq_len


def non_pad_box(rows: Iterable[np.ndarray | None], width: int, pad_id: int = 0) -> tuple[int, int, int, int] | None:
    """Bounding box (r0, r1, c0, c1), half-open, of tokens that are not PAD (nor negative) over some flat rows."""
    mask = None
    for row in rows:
        if row is None:
            continue
        grid = np.asarray(row).reshape(-1, width)  # [rows, width]
        keep = (grid != pad_id) & (grid >= 0)
        mask = keep if mask is None else mask | keep
    if mask is None or not mask.any():
        return None
    rs, cs = np.nonzero(mask)
    return int(rs.min()), int(rs.max()) + 1, int(cs.min()), int(cs.max()) + 1


def wrong_cells(labels: np.ndarray, predictions: np.ndarray, ignore_label_id: int | None) -> np.ndarray:
    """Bool mask of cells where the label counts and the prediction differs."""
    labels = np.asarray(labels)
    counted = labels >= 0
    if ignore_label_id is not None:
        counted &= labels != ignore_label_id
    return counted & (np.asarray(predictions) != labels)


# ----------------------------------------------------------------------------------------------- dataset files


@dataclass
class SetData:
    name: str
    inputs: np.ndarray  # [examples, seq_len]
    labels: np.ndarray  # [examples, seq_len]
    puzzle_identifiers: np.ndarray  # [puzzles]
    puzzle_indices: np.ndarray  # [puzzles + 1]
    group_indices: np.ndarray  # [groups + 1]
    predictions: np.ndarray | None = None  # [examples, seq_len], -1 = none saved
    q_halt_logits: np.ndarray | None = None  # [examples], NaN = none saved
    q_continue_logits: np.ndarray | None = None

    def example_puzzles(self) -> np.ndarray:
        """Puzzle index of every example."""
        return np.repeat(np.arange(len(self.puzzle_identifiers)), np.diff(self.puzzle_indices))


@dataclass
class SplitData:
    split: str
    meta: dict
    names: list[str] | None
    sets: dict[str, SetData] = field(default_factory=dict)
    prediction_files: list[str] = field(default_factory=list)  # where attached predictions came from

    @property
    def kind(self) -> tuple[str, int]:
        return detect_kind(int(self.meta["vocab_size"]), int(self.meta["seq_len"]))

    def name_of(self, identifier: int) -> str:
        if self.names is not None and 0 <= identifier < len(self.names):
            return str(self.names[identifier])
        return f"#{identifier}"


def _check_offsets(arr: np.ndarray, total: int, path: Path) -> None:
    if arr.ndim != 1 or len(arr) < 1 or arr[0] != 0:
        raise ValueError(f"{path}: offsets must be a 1-D array starting at 0")
    if arr[-1] != total:
        raise ValueError(f"{path}: offsets end at {int(arr[-1])}, expected {total}")
    if np.any(np.diff(arr) < 0):
        raise ValueError(f"{path}: offsets decrease")


def load_split(dataset_dir: str | Path, split: str = "test") -> SplitData:
    """Memory-map one split of a dataset folder (dataset/common.py's layout), checking shapes and offsets."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    meta_path = root / split / "dataset.json"
    meta = read_json(meta_path, "dataset.json")
    for key in ("vocab_size", "seq_len", "sets"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing field '{key}'")
    ids_path = root / "identifiers.json"
    names = read_json(ids_path, "identifiers.json") if ids_path.exists() else None
    if names is not None and not isinstance(names, list):
        raise ValueError(f"{ids_path}: expected a list of names")
    data = SplitData(split=split, meta=meta, names=names)
    seq_len = int(meta["seq_len"])
    for set_name in meta["sets"]:
        arrays = {}
        for part in ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices"):
            path = root / split / f"{set_name}__{part}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"missing file {path}")
            arrays[part] = np.load(path, mmap_mode="r" if part in ("inputs", "labels") else None)
        for part in ("inputs", "labels"):
            if arrays[part].ndim != 2 or arrays[part].shape[1] != seq_len:
                raise ValueError(
                    f"{root / split / f'{set_name}__{part}.npy'}: shape {arrays[part].shape}, seq_len {seq_len}"
                )
        n = arrays["inputs"].shape[0]
        if arrays["labels"].shape[0] != n:
            raise ValueError(
                f"{root / split / f'{set_name}__labels.npy'}: {arrays['labels'].shape[0]} rows, inputs {n}"
            )
        _check_offsets(arrays["puzzle_indices"], n, root / split / f"{set_name}__puzzle_indices.npy")
        if len(arrays["puzzle_identifiers"]) != len(arrays["puzzle_indices"]) - 1:
            raise ValueError(
                f"{root / split / f'{set_name}__puzzle_identifiers.npy'}: one identifier per puzzle expected"
            )
        _check_offsets(
            arrays["group_indices"], len(arrays["puzzle_identifiers"]), root / split / f"{set_name}__group_indices.npy"
        )
        data.sets[set_name] = SetData(name=set_name, **arrays)
    return data


# ----------------------------------------------------------------------------------------------- saved predictions


def load_saved_predictions(files: list[Path]) -> dict[str, np.ndarray]:
    """Concatenate the rank files into numpy: inputs, puzzle_identifiers, predictions (argmax), q logits."""
    from utils.saved_outputs import concatenate_saved_outputs  # torch, imported only by the commands that read files

    keys = ("inputs", "puzzle_identifiers", "preds", "q_halt_logits", "q_continue_logits")
    saved = concatenate_saved_outputs(files, keys, preds=True, require=keys[:3])
    saved["predictions"] = saved.pop("preds")
    return {k: (v.float() if k.startswith("q_") else v).numpy() for k, v in saved.items()}


def _row_keys(identifiers: np.ndarray, inputs: np.ndarray, small: bool) -> np.ndarray:
    """One opaque byte string per row: identifier (int64) then the tokens, as a void array that np.unique can sort."""
    tokens = np.ascontiguousarray(inputs, dtype=np.uint8 if small else np.int64)
    ids = np.ascontiguousarray(identifiers, dtype=np.int64).view(np.uint8).reshape(len(identifiers), 8)  # [N, 8]
    rows = np.concatenate([ids, tokens.view(np.uint8).reshape(len(tokens), -1)], axis=1)  # [N, 8 + S * itemsize]
    return rows.view(np.dtype((np.void, rows.shape[1])))[:, 0]


def _occurrence(ids: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same id (0 for the first)."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids)) - run_start
    return rank


def match_rows(
    ds_ids: np.ndarray, ds_inputs: np.ndarray, saved_ids: np.ndarray, saved_inputs: np.ndarray
) -> np.ndarray:
    """Dataset row index of every saved row (-1 where none): equal (identifier, inputs), k-th copy to k-th copy."""
    # tokens fit a byte in every HRM dataset; the keys then stay ~4x smaller than int32 rows
    small = all(a.size == 0 or (a.min() >= 0 and a.max() < 256) for a in (ds_inputs, saved_inputs))
    keys = np.concatenate([_row_keys(ds_ids, ds_inputs, small), _row_keys(saved_ids, saved_inputs, small)])
    _, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = len(ds_ids)
    ds_key, saved_key = inverse[:n], inverse[n:]
    scale = max(n, len(saved_ids)) + 1
    ds_pair = ds_key.astype(np.int64) * scale + _occurrence(ds_key)
    saved_pair = saved_key.astype(np.int64) * scale + _occurrence(saved_key)
    if n == 0:
        return np.full(len(saved_ids), -1, dtype=np.int64)
    order = np.argsort(ds_pair)
    pos = np.minimum(np.searchsorted(ds_pair[order], saved_pair), n - 1)
    return np.where(ds_pair[order][pos] == saved_pair, order[pos], -1)


def collect_predictions(predictions: str | Path, dataset_dir: str | Path, split: str = "test") -> SplitData:
    """Load a dataset split and attach saved predictions aligned to its examples (see module docstring)."""
    data = load_split(dataset_dir, split)
    from utils.saved_outputs import find_saved_outputs

    files = find_saved_outputs(predictions)
    saved = load_saved_predictions(files)
    seq_len = int(data.meta["seq_len"])
    if saved["inputs"].ndim != 2 or saved["inputs"].shape[1] != seq_len:
        raise ValueError(
            f"{files[0]}: inputs of shape {saved['inputs'].shape} but {dataset_dir}/{split} has seq_len {seq_len}"
        )
    pad_id = int(data.meta.get("pad_id", 0))
    real = ~np.all(saved["inputs"] == pad_id, axis=1)
    saved = {k: v[real] for k, v in saved.items()}

    set_names = list(data.sets)
    ds_ids = np.concatenate([s.puzzle_identifiers[s.example_puzzles()] for s in data.sets.values()])
    ds_inputs = np.concatenate([np.asarray(s.inputs) for s in data.sets.values()])
    where = match_rows(ds_ids, ds_inputs, saved["puzzle_identifiers"], saved["inputs"])
    if np.any(where < 0):
        bad = int(np.flatnonzero(where < 0)[0])
        raise ValueError(
            f"{files[0].parent}: {int(np.sum(where < 0))} of {len(where)} saved rows match no example of "
            f"{Path(dataset_dir) / split} (first: identifier {int(saved['puzzle_identifiers'][bad])}); wrong dataset?"
        )
    offsets = np.cumsum([0] + [len(data.sets[s].inputs) for s in set_names])
    total = offsets[-1]
    preds = np.full((total, seq_len), -1, dtype=np.int32)
    preds[where] = saved["predictions"]
    q = {}
    for key in ("q_halt_logits", "q_continue_logits"):
        if key in saved:
            q[key] = np.full(total, np.nan, dtype=np.float32)
            q[key][where] = saved[key].reshape(len(where))
    for i, name in enumerate(set_names):
        s = data.sets[name]
        s.predictions = preds[offsets[i] : offsets[i + 1]]
        s.q_halt_logits = q["q_halt_logits"][offsets[i] : offsets[i + 1]] if "q_halt_logits" in q else None
        s.q_continue_logits = q["q_continue_logits"][offsets[i] : offsets[i + 1]] if "q_continue_logits" in q else None
    data.prediction_files = [str(f) for f in files]
    return data


def accuracy_summary(data: SplitData) -> dict:
    """Token and exact accuracy over the examples that have a saved prediction (as the loss head defines them)."""
    ignore = data.meta.get("ignore_label_id")
    token_acc, exact, count = 0.0, 0, 0
    for s in data.sets.values():
        has = np.all(s.predictions >= 0, axis=1)
        labels = np.asarray(s.labels)[has]
        counted = labels >= 0
        if ignore is not None:
            counted &= labels != ignore
        correct = counted & (s.predictions[has] == labels)
        valid = counted.sum(1) > 0
        token_acc += float(np.sum(correct.sum(1)[valid] / counted.sum(1)[valid]))
        exact += int(np.sum(correct.sum(1)[valid] == counted.sum(1)[valid]))
        count += int(valid.sum())
    return {"count": count, "accuracy": token_acc / max(count, 1), "exact_accuracy": exact / max(count, 1)}


def export_predictions(
    predictions: str | Path, dataset_dir: str | Path, out_dir: str | Path, split: str = "test"
) -> dict:
    """Write the browser-readable predictions folder; returns the predictions.json content."""
    data = collect_predictions(predictions, dataset_dir, split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = data.prediction_files
    step = re.match(r"step_(\d+)_all_preds", Path(files[0]).name)
    info = {
        "format": PREDICTIONS_FORMAT,
        "dataset": str(Path(dataset_dir).resolve()),
        "split": split,
        "source_files": files,
        "step": int(step.group(1)) if step else None,
        "sets": {},
        **accuracy_summary(data),
    }
    for name, s in data.sets.items():
        np.save(out / f"{name}__predictions.npy", s.predictions)
        for key in ("q_halt_logits", "q_continue_logits"):
            if getattr(s, key) is not None:
                np.save(out / f"{name}__{key}.npy", getattr(s, key))
        info["sets"][name] = {
            "examples": len(s.predictions),
            "predicted": int(np.all(s.predictions >= 0, axis=1).sum()),
        }
    (out / "predictions.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ----------------------------------------------------------------------------------------------- accuracy by ACT step


def act_step_accuracy(head, batches: Iterable, device="cpu", max_calls: int = 10_000) -> dict:
    """Token and exact accuracy of the prediction after each ACT step, over evaluation batches.

    `head` follows the ACTLossHead interface (`initial_carry(batch)`, `head(return_keys=..., carry=..., batch=...)`
    -> (carry, loss, metrics, outputs, all_halted)); `batches` yields batch dicts or the loader's
    (set_name, batch, global_batch_size) tuples. A row that halts keeps its last prediction for later steps.
    Rows whose labels are all ignored (padding) are not counted, as in the loss head's `count`.
    """
    import torch

    from models.losses import IGNORE_LABEL_ID

    per_batch: list[list[tuple[float, float]]] = []  # per batch, per step: (sum of row token accuracies, exact rows)
    count = 0
    with torch.inference_mode():
        for item in batches:
            batch = item[1] if isinstance(item, (tuple, list)) else item  # a loader item: (set, batch, size)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]
            mask = labels != IGNORE_LABEL_ID
            valid = mask.any(-1)
            n_counted = mask.sum(-1)
            carry = head.initial_carry(batch)
            frozen = None
            halted_before = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
            steps: list[tuple[float, float]] = []
            while True:
                if len(steps) >= max_calls:
                    raise ValueError(f"the model did not halt every row within {max_calls} ACT steps")
                carry, _, _, outputs, all_halted = head(return_keys=["logits"], carry=carry, batch=batch)
                pred = outputs["logits"].argmax(-1)
                frozen = pred if frozen is None else torch.where(halted_before[:, None], frozen, pred)
                correct = ((frozen == labels) & mask).sum(-1)
                tok = (correct / n_counted.clamp_min(1))[valid].sum().item()
                exact = (correct == n_counted)[valid].sum().item()
                steps.append((tok, exact))
                halted_before = halted_before | getattr(carry, "halted", halted_before)
                if bool(all_halted):
                    break
            per_batch.append(steps)
            count += int(valid.sum().item())
    if count == 0:
        raise ValueError("no evaluation rows with labels to score")
    num_steps = max(len(steps) for steps in per_batch)
    # a batch that halted before step s keeps its final prediction at step s
    totals = [[sum(steps[min(s, len(steps) - 1)][j] for steps in per_batch) for s in range(num_steps)] for j in (0, 1)]
    return {
        "steps": list(range(1, num_steps + 1)),
        "accuracy": [t / count for t in totals[0]],
        "exact_accuracy": [e / count for e in totals[1]],
        "count": count,
    }


def load_step_accuracy(path: str | Path) -> dict:
    """Read per-step accuracies from JSON or .npz: `steps` plus `accuracy` and/or `exact_accuracy` lists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    if path.suffix == ".npz":
        with np.load(path) as z:
            data = {k: z[k].tolist() for k in z.files}
    else:
        data = read_json(path, "step-accuracy file")
    if not isinstance(data, dict) or "steps" not in data:
        raise ValueError(f"{path}: expected a mapping with 'steps' and 'accuracy' and/or 'exact_accuracy'")
    series = [k for k in ("accuracy", "exact_accuracy") if k in data]
    if not series:
        raise ValueError(f"{path}: neither 'accuracy' nor 'exact_accuracy' present")
    for k in series:
        if len(data[k]) != len(data["steps"]):
            raise ValueError(f"{path}: '{k}' has {len(data[k])} values for {len(data['steps'])} steps")
    return data


# ----------------------------------------------------------------------------------------------- drawing


def figure_class():
    """matplotlib's `Figure` (no pyplot: a caller's backend and open figures are left alone), or a one-line
    error saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError(VIZ_INSTALL_HINT) from None
    return Figure


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    return tuple(int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))


def token_colours(kind: str, tokens: np.ndarray) -> np.ndarray:
    """RGB image [H, W, 3] of a token grid: ARC palette, maze classes, white for Sudoku/generic, grey PAD."""
    img = np.ones(tokens.shape + (3,))
    if kind == "arc":
        for t in range(2, 12):
            img[tokens == t] = _rgb(ARC_PALETTE[t - 2])
        img[tokens == 1] = _rgb(ARC_EOS_COLOUR)
    elif kind == "maze":
        for t, colour in MAZE_COLOURS.items():
            img[tokens == t] = _rgb(colour)
    img[tokens == 0] = _rgb(PAD_COLOUR)
    return img


def _cell_text(kind: str, token: int) -> str:
    if kind == "sudoku":
        return str(token - 1) if 2 <= token <= 10 else ""
    if kind == "maze":
        return {3: "S", 4: "G"}.get(token, "")
    if kind == "generic":
        return str(token)
    return ""


def draw_grid(ax, kind: str, width: int, row: np.ndarray, box, wrong: np.ndarray | None = None, givens=None) -> None:
    """Draw one flat token row cropped to `box` on a matplotlib axis; wrong cells outlined and tinted."""
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    ax.set_xticks([])
    ax.set_yticks([])
    if box is None:
        ax.text(0.5, 0.5, "(all PAD)", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        return
    r0, r1, c0, c1 = box
    grid = np.asarray(row).reshape(-1, width)[r0:r1, c0:c1]  # [h, w]
    img = token_colours(kind, grid)
    bad = None if wrong is None else np.asarray(wrong).reshape(-1, width)[r0:r1, c0:c1]
    if bad is not None and kind in ("sudoku", "generic"):
        img[bad] = _rgb("#ffc9cf")
    ax.imshow(img, interpolation="nearest")
    h, w = grid.shape
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="#999999", linewidth=0.4)
    ax.tick_params(which="minor", length=0)
    if kind == "sudoku":
        for k in (3, 6):
            ax.axhline(k - 0.5, color="black", linewidth=1.6)
            ax.axvline(k - 0.5, color="black", linewidth=1.6)
    fontsize = max(4, min(11, 130 // max(h, w)))
    for r in range(h):
        for c in range(w):
            text = _cell_text(kind, int(grid[r, c]))
            if text:
                given = (
                    kind == "sudoku"
                    and givens is not None
                    and np.asarray(givens).reshape(-1, width)[r0 + r, c0 + c] >= 2
                )
                ax.text(
                    c, r, text, ha="center", va="center", fontsize=fontsize, fontweight="bold" if given else "normal"
                )
    if bad is not None:
        for r, c in zip(*np.nonzero(bad)):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=WRONG_COLOUR, linewidth=1.8))
        if kind in ("arc", "maze") and bad.any():
            # the cell colour is the value here, so a tint would hide it: cross the cell instead, white-edged
            # so that it shows on red cells too
            rs, cs = np.nonzero(bad)
            size = max(3, min(12, 140 // max(h, w)))
            halo = [patheffects.withStroke(linewidth=3.5, foreground="white")]
            ax.plot(cs, rs, "x", color=WRONG_COLOUR, markersize=size, mew=1.8, path_effects=halo)


def render_sheets(
    data: SplitData, out_dir: str | Path, max_examples: int = 24, per_sheet: int = 6, only_wrong: bool = False
) -> list[Path]:
    """PNG sheets, `per_sheet` examples each (input | answer | prediction), in dataset order; returns the paths."""
    from tqdm import tqdm

    Figure = figure_class()
    kind, width = data.kind
    ignore = data.meta.get("ignore_label_id")
    pad_id = int(data.meta.get("pad_id", 0))
    chosen = []
    for s in data.sets.values():
        puzzles = s.example_puzzles()
        for e in range(len(s.inputs)):
            if len(chosen) >= max_examples:
                break
            pred = s.predictions[e]
            if np.any(pred < 0):
                continue
            bad = wrong_cells(s.labels[e], pred, ignore)
            if only_wrong and not bad.any():
                continue
            chosen.append((s, e, int(puzzles[e]), bad))
    if not chosen:
        raise ValueError("no examples to draw: no saved predictions" + (" are wrong" if only_wrong else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    pages = [chosen[i : i + per_sheet] for i in range(0, len(chosen), per_sheet)]
    for page_no, page in enumerate(tqdm(pages, desc="sheets", unit="sheet")):
        fig = Figure(figsize=(9, 3.1 * len(page)))
        axes = fig.subplots(len(page), 3, squeeze=False)
        for (s, e, p, bad), ax_row in zip(page, axes):
            inp, lab, pred = np.asarray(s.inputs[e]), np.asarray(s.labels[e]), s.predictions[e]
            arc = kind == "arc"
            box_in = non_pad_box([inp], width, pad_id) if arc else (0, len(inp) // width, 0, width)
            box_out = non_pad_box([lab, pred], width, pad_id) if arc else box_in
            draw_grid(ax_row[0], kind, width, inp, box_in)
            draw_grid(ax_row[1], kind, width, lab, box_out, givens=inp)
            draw_grid(ax_row[2], kind, width, pred, box_out, wrong=bad, givens=inp)
            verdict = "exact" if not bad.any() else f"{int(bad.sum())} wrong"
            q = s.q_halt_logits[e] if s.q_halt_logits is not None else float("nan")
            halt = "" if np.isnan(q) else f", sigmoid(q_halt)={1 / (1 + math.exp(-float(q))):.2f}"
            name = data.name_of(int(s.puzzle_identifiers[p]))
            ax_row[0].set_title(f"{name} · {s.name}[{e}]\ninput", fontsize=8)
            ax_row[1].set_title("answer", fontsize=8)
            ax_row[2].set_title(
                f"prediction ({verdict}{halt})", fontsize=8, color="black" if not bad.any() else WRONG_COLOUR
            )
        fig.tight_layout()
        path = out / f"sheet_{page_no:03d}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_step_accuracy(step_data: dict, out_path: str | Path) -> Path:
    """Line plot of accuracy (and exact accuracy) against the ACT step."""
    fig = figure_class()(figsize=(6, 4))
    ax = fig.subplots()
    for key, label in (("accuracy", "token accuracy"), ("exact_accuracy", "exact accuracy")):
        if key in step_data:
            ax.plot(step_data["steps"], step_data[key], marker="o", label=label)
    ax.set_xlabel("ACT step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    title = "Accuracy by ACT step"
    if "count" in step_data:
        title += f" ({step_data['count']} examples)"
    ax.set_title(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return out_path


# ----------------------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m tools.visualize", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter
    exp = sub.add_parser(
        "export", help="write saved predictions as .npy files for puzzle_visualizer.html", formatter_class=defaults
    )
    sheets = sub.add_parser("sheets", help="render PNG sheets of predictions next to answers", formatter_class=defaults)
    for p in (exp, sheets):
        p.add_argument(
            "--predictions", help="a step_N_all_preds.R file, its prefix, or a checkpoint folder (latest step)"
        )
        p.add_argument("--dataset", help="dataset folder (identifiers.json, train/, test/)")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--split", default="test", choices=SPLIT_NAMES, help="split the predictions were made on")
    sheets.add_argument("--max", type=int, default=24, help="at most this many examples")
    sheets.add_argument("--per-sheet", type=int, default=6, help="examples per PNG")
    sheets.add_argument("--only-wrong", action="store_true", help="draw only examples with a wrong cell")
    sheets.add_argument("--step-accuracy", help="JSON/.npz of per-step accuracies (see act_step_accuracy) to plot")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_flag_command(lambda: command(_parser().parse_args(argv)))


def command(args: argparse.Namespace) -> int:
    """One `export` or `sheets` run."""
    if args.command == "export":
        if not args.predictions or not args.dataset:
            raise ValueError("export needs --predictions and --dataset")
        info = export_predictions(args.predictions, args.dataset, args.out, args.split)
        print(
            f"wrote {args.out}: {sum(s['predicted'] for s in info['sets'].values())} predictions, "
            f"accuracy {info['accuracy']:.4f}, exact accuracy {info['exact_accuracy']:.4f}"
        )
        return 0
    if args.max < 1 or args.per_sheet < 1:
        raise ValueError("--max and --per-sheet must be positive")
    if not args.predictions and not args.step_accuracy:
        raise ValueError("sheets needs --predictions (with --dataset) and/or --step-accuracy")
    if args.predictions:
        if not args.dataset:
            raise ValueError("--predictions needs --dataset")
        data = collect_predictions(args.predictions, args.dataset, args.split)
        paths = render_sheets(data, args.out, args.max, args.per_sheet, args.only_wrong)
        summary = accuracy_summary(data)
        print(
            f"wrote {len(paths)} sheet(s) to {args.out}; over {summary['count']} predictions: "
            f"accuracy {summary['accuracy']:.4f}, exact accuracy {summary['exact_accuracy']:.4f}"
        )
    if args.step_accuracy:
        path = plot_step_accuracy(load_step_accuracy(args.step_accuracy), Path(args.out) / "accuracy_by_step.png")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
