"""Saved evaluation outputs: the `step_{N}_all_preds.{rank}` files, written per rank and read back as one.

The evaluation writes them (`save_outputs` / `eval_save_outputs`); ARC scoring, tools/visualize.py and the quick
start's report read them. This module is the one place that knows their name, how rank files make up one
evaluation, and how they are read.

Design choices:
- Each rank writes its own file, `step_{N}_all_preds.{rank}` in the run's folder (evaluate.py: its output
  folder), the reference's name and format: a torch-saved dict of CPU tensors, each the rank's batches
  concatenated along rows in batch order, padding rows of the last batch included. It is written atomically.
- `find_saved_outputs` turns one rank file, the common prefix or a folder (then its latest step) into every rank
  file of that evaluation, in rank order; a missing rank is an error, never a silently smaller evaluation.
  `in_rank_order` orders files named one by one (a shell glob puts `.10` before `.2`).
- `read_saved_outputs(path, preds=True)` turns `logits` into their argmax `preds` at once (a `preds` the model
  saved is kept as it is), so a reader never holds every rank's logits.
- `concatenate_saved_outputs` joins the rank files row-wise: every file must hold the same keys, each key as many
  rows as the others and the same shape per row.
- Every error is one line naming the file (ValueError, or FileNotFoundError for a missing one).
"""

import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from utils.checkpointing import atomic_torch_save, read_tensor_dict

FILE_NAME = re.compile(r"^step_(\d+)_all_preds\.(\d+)$")


def saved_outputs_path(folder: str, step: int, rank: int) -> str:
    return os.path.join(folder, f"step_{step}_all_preds.{rank}")


def write_saved_outputs(folder: str, step: int, rank: int, batches: Mapping[str, Sequence[torch.Tensor]]) -> str:
    """One rank's outputs: each key's batches concatenated along rows, written atomically; returns the path."""
    path = saved_outputs_path(folder, step, rank)
    atomic_torch_save({k: torch.cat(list(v), dim=0) for k, v in batches.items()}, path)
    return path


def rank_of_file(path: str | Path) -> tuple[int, str]:
    """Sort key: the `.{rank}` suffix of `step_N_all_preds.{rank}` (names without one go last)."""
    suffix = str(path).rsplit(".", 1)[-1]
    return (int(suffix), str(path)) if suffix.isdigit() else (sys.maxsize, str(path))


def in_rank_order(paths: Iterable[str]) -> list[str]:
    return sorted(paths, key=rank_of_file)


def find_saved_outputs(path: str | Path) -> list[Path]:
    """All rank files of one evaluation: from one `step_N_all_preds.R` file, its prefix, or a folder (latest step)."""
    path = Path(path)
    if path.is_dir():
        candidates = [p for p in path.glob("step_*_all_preds.*") if FILE_NAME.fullmatch(p.name)]
        if not candidates:
            raise FileNotFoundError(f"no step_N_all_preds.R files in {path}")
        last = max(int(FILE_NAME.fullmatch(p.name).group(1)) for p in candidates)
        path = path / f"step_{last}_all_preds"
    elif path.is_file() and re.fullmatch(r"\d+", path.suffix[1:]):
        path = path.with_suffix("")
    files = {int(p.suffix[1:]): p for p in path.parent.glob(path.name + ".*") if re.fullmatch(r"\d+", p.suffix[1:])}
    if not files:
        raise FileNotFoundError(f"no saved predictions at {path} (expected {path}.0, {path}.1, ...)")
    missing = sorted(set(range(max(files) + 1)) - set(files))
    if missing:
        raise ValueError(f"{path}: rank files {missing} missing (found ranks {sorted(files)})")
    return [files[r] for r in sorted(files)]


def read_saved_outputs(path: str | Path, preds: bool = False, require: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """One rank's file, on the CPU. `preds`: `logits` become their argmax `preds` (module docstring). `require`:
    keys that must be there (`preds` is there when `logits` were saved), else one line naming the first missing."""
    saved = read_tensor_dict(str(path), "saved-outputs file", "dict", "cpu")
    if preds and "logits" in saved:
        logits = saved.pop("logits")
        saved.setdefault("preds", logits.argmax(-1))
    for key in require:
        if key not in saved:
            name = "'logits' (or 'preds')" if key == "preds" else f"'{key}'"
            raise ValueError(f"{path}: no tensor {name} (evaluate with save_outputs including it)")
    return saved


def concatenate_saved_outputs(
    files: Sequence[str | Path], keys: Iterable[str] | None = None, preds: bool = False, require: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """The files (in the order given) read as `read_saved_outputs` reads them and joined row-wise; `keys`: only
    those (the ones saved), else all. Keys saved by some files only, or rows that disagree, are one error line."""
    if not files:
        raise FileNotFoundError("no saved-outputs files given")
    require, parts = tuple(require), []
    for f in files:
        saved = read_saved_outputs(f, preds, require)
        part = {k: v for k, v in saved.items() if keys is None or k in keys}
        first = "inputs" if "inputs" in part else next(iter(part), None)
        for key, value in part.items():
            if value.dim() == 0 or value.shape[0] != part[first].shape[0]:
                rows = value.shape[0] if value.dim() else "no"
                raise ValueError(f"{f}: '{key}' has {rows} rows, '{first}' {part[first].shape[0]}")
        parts.append(part)
    uneven = sorted(set().union(*parts) - set.intersection(*(set(p) for p in parts)))
    if uneven:
        raise ValueError(f"{Path(files[0]).parent}: {uneven} saved by some ranks only")
    for key in parts[0]:
        shapes = {tuple(p[key].shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"{', '.join(map(str, files))}: '{key}' has rows of different shapes {sorted(shapes)}")
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
