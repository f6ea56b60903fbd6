"""ARC scoring of saved evaluation outputs: crop, undo augmentation, vote, pass@K.

Design choices (SPEC §7; the reference does this in a notebook):
- Input: the per-rank files `step_{N}_all_preds.{rank}` that evaluation saves, with keys `inputs`,
  `labels`, `puzzle_identifiers`, `q_halt_logits` and `logits` (or already-argmaxed `preds`), plus
  the dataset's `identifiers.json` (identifier → name, augmented variants named `<id>_t<k>_<perm>`).
- Each sequence is a 30×30 canvas (PAD 0, EOS 1, colour c → c+2). An answer is the largest
  top-left rectangle free of PAD/EOS (and of the ignore label −100 in `labels`), minus 2.
- The augmentation applied colours first, then the dihedral transform, so it is undone in the
  opposite order: inverse dihedral (`dataset.common`, table [0,3,2,1,4,5,6,7]), then the inverse
  colour permutation.
- The ground truth comes from the saved labels, un-augmented the same way (all variants of a test
  input must agree, else the files are inconsistent and we refuse). A test input is identified by
  its base puzzle and its un-augmented input grid, so rank files can be read in any order.
- Identical answers for a test input are pooled: ranked by vote count, ties by mean sigmoid(q_halt).
  A puzzle counts as solved at K when every one of its test inputs has its truth among the top K.
"""

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dataset.common import inverse_dihedral_transform

PASS_KS = (1, 2, 10, 100, 1000)
GRID_SIZE = 30
COLOUR_OFFSET = 2  # token = colour + 2 (PAD 0, EOS 1)
NUM_COLOURS = 10
AUGMENTED_NAME = re.compile(r"^(?P<base>.+)_t(?P<tid>[0-7])_(?P<perm>[0-9]{10})$")


def parse_identifier(name: str) -> tuple[str, int, np.ndarray]:
    """`<id>_t<k>_<perm>` → (id, k, colour map); a name without that suffix is the un-augmented puzzle."""
    m = AUGMENTED_NAME.match(name)
    if m is None:
        return name, 0, np.arange(NUM_COLOURS)
    mapping = np.array([int(c) for c in m.group("perm")])
    if sorted(mapping.tolist()) != list(range(NUM_COLOURS)):
        raise ValueError(f"identifier {name!r}: colour map {m.group('perm')} is not a permutation of 0..9")
    return m.group("base"), int(m.group("tid")), mapping


def is_arc_dataset(identifier_names: Sequence[str]) -> bool:
    return any(AUGMENTED_NAME.match(name) for name in identifier_names)


def crop(tokens: np.ndarray, grid_size: int = GRID_SIZE) -> np.ndarray:
    """Largest top-left rectangle of colour tokens in a flattened canvas, as colours 0..9."""
    grid = np.asarray(tokens).reshape(grid_size, grid_size)  # [rows, cols]
    valid = (grid >= COLOUR_OFFSET) & (grid < COLOUR_OFFSET + NUM_COLOURS)
    row_runs = np.where(valid.all(axis=1), grid_size, valid.argmin(axis=1))  # leading valid cells per row
    widths = np.minimum.accumulate(row_runs)  # widest rectangle using rows 0..r
    areas = widths * np.arange(1, grid_size + 1)
    best = int(areas.argmax())
    if areas[best] == 0:
        return np.zeros((0, 0), dtype=np.int64)
    return grid[: best + 1, : widths[best]].astype(np.int64) - COLOUR_OFFSET


def undo_augmentation(grid: np.ndarray, tid: int, mapping: np.ndarray) -> np.ndarray:
    """Inverse of `dihedral_transform(mapping[grid], tid)` (the ARC builder's augmentation)."""
    unrotated = inverse_dihedral_transform(grid, tid)
    return np.argsort(mapping)[unrotated]


def _grid_key(grid: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    return grid.shape, np.ascontiguousarray(grid, dtype=np.int8).tobytes()


@dataclass
class ArcScore:
    pass_at: dict[int, float]  # K → fraction of puzzles solved
    solved_at: dict[int, int]  # K → number of puzzles solved
    num_puzzles: int
    num_test_inputs: int
    num_predictions: int


def score_predictions(
    outputs: dict[str, np.ndarray],
    identifier_names: Sequence[str],
    ks: Iterable[int] = PASS_KS,
    blank_identifier_id: int = 0,
) -> ArcScore:
    """pass@K over saved evaluation outputs (arrays with one row per test example)."""
    for key in ("inputs", "labels", "puzzle_identifiers", "q_halt_logits"):
        if key not in outputs:
            raise ValueError(f"ARC scoring needs saved {key!r} (have: {', '.join(sorted(outputs))})")
    if "preds" in outputs:
        preds = np.asarray(outputs["preds"])
    elif "logits" in outputs:
        preds = np.asarray(outputs["logits"]).argmax(-1)
    else:
        raise ValueError("ARC scoring needs saved 'logits' or 'preds'")
    seq_len = preds.shape[-1]
    grid_size = int(round(seq_len**0.5))
    if grid_size * grid_size != seq_len:
        raise ValueError(f"ARC scoring: sequence length {seq_len} is not a square canvas")
    q_halt = 1 / (1 + np.exp(-np.asarray(outputs["q_halt_logits"], dtype=np.float64)))

    truths: dict[tuple, tuple] = {}  # (puzzle, input) → answer key
    votes: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    num_predictions = 0
    for row, identifier in enumerate(np.asarray(outputs["puzzle_identifiers"]).tolist()):
        if identifier == blank_identifier_id:  # padding of the last batch
            continue
        if not 0 <= identifier < len(identifier_names):
            raise ValueError(f"ARC scoring: puzzle identifier {identifier} not in identifiers.json")
        base, tid, mapping = parse_identifier(identifier_names[identifier])
        test_input = (base, _grid_key(undo_augmentation(crop(outputs["inputs"][row], grid_size), tid, mapping)))
        truth = _grid_key(undo_augmentation(crop(outputs["labels"][row], grid_size), tid, mapping))
        if truths.setdefault(test_input, truth) != truth:
            raise ValueError(f"ARC scoring: variants of puzzle {base!r} disagree on the answer of a test input")
        vote = votes[test_input][_grid_key(undo_augmentation(crop(preds[row], grid_size), tid, mapping))]
        vote[0] += 1
        vote[1] += float(q_halt[row])
        num_predictions += 1

    solved_inputs: dict[str, list[int]] = defaultdict(list)  # puzzle → rank of the truth per test input
    for test_input, answers in votes.items():
        ranking = sorted(answers, key=lambda a: (-answers[a][0], -answers[a][1] / answers[a][0]))
        truth = truths[test_input]
        rank = ranking.index(truth) + 1 if truth in answers else len(ranking) + 10**9
        solved_inputs[test_input[0]].append(rank)

    ks = tuple(ks)
    worst_rank = {puzzle: max(ranks) for puzzle, ranks in solved_inputs.items()}
    solved_at = {k: sum(r <= k for r in worst_rank.values()) for k in ks}
    num_puzzles = len(worst_rank)
    return ArcScore(
        pass_at={k: solved_at[k] / max(num_puzzles, 1) for k in ks},
        solved_at=solved_at,
        num_puzzles=num_puzzles,
        num_test_inputs=len(votes),
        num_predictions=num_predictions,
    )


def format_table(score: ArcScore) -> str:
    lines = [
        f"ARC scoring: {score.num_puzzles} puzzles, {score.num_test_inputs} test inputs, "
        f"{score.num_predictions} predictions",
        f"{'metric':<10}{'solved':>10}{'rate':>10}",
    ]
    for k, rate in score.pass_at.items():
        lines.append(f"{f'pass@{k}':<10}{score.solved_at[k]:>10}{100 * rate:>9.2f}%")
    return "\n".join(lines)


def load_identifier_names(data_path: str) -> list[str]:
    path = os.path.join(data_path, "identifiers.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"identifiers.json not found in {data_path}")
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a list of identifier names")
    return names


def load_prediction_files(paths: Sequence[str]) -> dict[str, np.ndarray]:
    """Concatenate per-rank prediction files; logits are reduced to argmax per file to save memory."""
    if not paths:
        raise FileNotFoundError("no prediction files given")
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prediction file not found: {path}")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a corrupt file
            raise ValueError(f"{path}: not a readable prediction file ({type(e).__name__})") from e
        if "logits" in saved and "preds" not in saved:
            saved["preds"] = saved.pop("logits").argmax(-1)
        for key, value in saved.items():
            parts[key].append(value.float().numpy() if value.is_floating_point() else value.numpy())
    lengths = {key: len(v) for key, v in parts.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"prediction files hold different keys per file: {lengths}")
    return {key: np.concatenate(v, axis=0) for key, v in parts.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ARC pass@K from saved evaluation outputs (step_N_all_preds.*).")
    parser.add_argument("--predictions", nargs="+", required=True, help="the per-rank step_N_all_preds.R files")
    parser.add_argument("--data-path", required=True, help="the ARC dataset folder (holds identifiers.json)")
    args = parser.parse_args(argv)
    try:
        score = score_predictions(load_prediction_files(args.predictions), load_identifier_names(args.data_path))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(score))
    return 0


if __name__ == "__main__":
    sys.exit(main())
