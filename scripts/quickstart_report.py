"""Summarise the quick start's evaluation: exact accuracy on held-out Sudokus against a no-learning baseline,
and one held-out puzzle with the model's answer as a grid.

    python scripts/quickstart_report.py CHECKPOINT_DIR/step_N_all_preds.0 [more rank files]

Design choices:
- Reads what `evaluate.py ... save_outputs=[inputs,labels,puzzle_identifiers,logits]` saved for the test
  split, i.e. puzzles the model never saw in training (nor any augmentation of them). The grid side
  comes from the sequence length (16, 36 or 81 cells: 4x4, 6x6 or 9x9, the sizes of
  dataset/generate_sudoku.py), the box shape from the same table as the generator's.
- The baseline learns nothing about Sudoku: it copies the givens and writes the test set's most
  frequent digit into every blank (a constant guess tuned on the answers, so if anything too kind).
- The puzzle shown is the first one the model solved entirely; when it solved none, the first puzzle,
  with its wrong cells marked, so a newcomer sees where it fails instead of a hand-picked success.
- Bad input (missing or unreadable file, missing keys, shapes that do not fit a Sudoku of the known
  sizes, tokens outside the Sudoku vocabulary) is one `error:` line on stderr and exit status 2.
"""

import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python scripts/quickstart_report.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.generate_sudoku import BOX_SHAPES  # noqa: E402
from models.losses import IGNORE_LABEL_ID  # noqa: E402  (labels of cells that are not scored)
from utils.cli import bad_input_exits  # noqa: E402
from utils.saved_outputs import concatenate_saved_outputs  # noqa: E402

PAD, BLANK = 0, 1  # Sudoku tokens: PAD 0, blank 1, digit d as d + 1
KEYS = ("inputs", "labels", "preds")  # preds: the argmax of the saved logits
USAGE = "usage: python scripts/quickstart_report.py CHECKPOINT_DIR/step_N_all_preds.0 [more rank files]"


def load_outputs(paths: list[str]) -> dict[str, torch.Tensor]:
    """The rank files' inputs, labels and predicted tokens, concatenated; checks everything read."""
    out = concatenate_saved_outputs(paths, KEYS, preds=True, require=KEYS)
    inputs, labels, preds = (out[k] for k in KEYS)
    if inputs.dim() != 2 or labels.shape != inputs.shape or preds.shape != inputs.shape:
        raise ValueError(
            f"{', '.join(paths)}: expected inputs, labels and predictions [N, cells] (logits [N, cells, vocab]), got "
            f"{list(inputs.shape)}, {list(labels.shape)}, {list(preds.shape)}"
        )
    return out


def grid_side(cells: int, source: str) -> int:
    side = math.isqrt(cells)
    if side * side != cells or side not in BOX_SHAPES:
        sizes = ", ".join(f"{s * s} ({s}x{s})" for s in BOX_SHAPES)
        raise ValueError(f"{source}: {cells} cells per puzzle, not a Sudoku of {sizes} cells")
    return side


def render(values: list[str], side: int) -> list[str]:
    """Text lines of one grid (cell strings of width 2: digit or `.`, then a space or a mark; row-major),
    boxes separated by | and -."""
    box_rows, box_cols = BOX_SHAPES[side]
    lines = []
    for r in range(side):
        if r and r % box_rows == 0:
            lines.append("+".join("-" * (2 * box_cols + 1) for _ in range(side // box_cols)))
        cells = values[r * side : (r + 1) * side]
        lines.append("|".join(" " + "".join(cells[c : c + box_cols]) for c in range(0, side, box_cols)))
    return lines


def digit(token: int) -> str:
    return "." if token == BLANK else str(token - 1)


def main(paths: list[str]) -> int:
    if not paths:
        print(USAGE, file=sys.stderr)
        return 2
    out = load_outputs(paths)
    source = ", ".join(paths)
    inputs, labels, preds = out["inputs"], out["labels"], out["preds"]
    valid = labels != IGNORE_LABEL_ID
    rows = valid.any(-1)  # drop padding rows of the last batch
    inputs, labels, preds, valid = inputs[rows], labels[rows], preds[rows], valid[rows]
    if inputs.shape[0] == 0:
        raise ValueError(f"{source}: no scored puzzle (every label is {IGNORE_LABEL_ID})")
    side = grid_side(inputs.shape[1], source)
    digits = (labels >= BLANK + 1) & (labels <= side + 1)
    if not bool((digits | ~valid).all()) or not bool(((inputs >= BLANK) & (inputs <= side + 1)).all()):
        raise ValueError(f"{source}: tokens outside a {side}x{side} Sudoku's (blank 1, digits 2..{side + 1})")

    blank = valid & (inputs == BLANK)
    correct = (preds == labels) | ~valid
    solved = correct.all(-1)
    most_frequent = labels[blank].bincount().argmax() if blank.any() else torch.tensor(BLANK + 1)
    guess = torch.where(inputs == BLANK, most_frequent, inputs)
    base_correct = (guess == labels) | ~valid
    n = inputs.shape[0]

    def pct(x: torch.Tensor) -> str:
        return f"{100 * x.float().mean().item():5.1f}%"

    print(f"held-out {side}x{side} Sudokus (test split, never seen in training): {n}")
    print(f"{'':28}{'model':>8}   no learning (givens + most frequent digit)")
    print(f"{'exact (whole puzzle right)':28}{pct(solved):>8}   {pct(base_correct.all(-1))}")
    print(f"{'blank cells right':28}{pct(correct[blank]):>8}   {pct(base_correct[blank])}")

    shown = int(solved.float().argmax()) if solved.any() else 0
    puzzle = [digit(t) + " " for t in inputs[shown].tolist()]
    answer = [
        digit(p) + (" " if ok else "*") for p, ok in zip(preds[shown].tolist(), correct[shown].tolist(), strict=True)
    ]
    width = max(len(line) for line in render(puzzle, side))
    if solved[shown]:
        title = f"held-out puzzle {shown}, solved (every cell matches the solution):"
    else:
        title = f"held-out puzzle {shown}: the model solved none; * marks a wrong cell:"
    print()
    print(title)
    print(f"{'puzzle':<{width}}    model's answer")
    for left, right in zip(render(puzzle, side), render(answer, side), strict=True):
        print(f"{left:<{width}}    {right}")
    return 0


if __name__ == "__main__":
    with bad_input_exits():
        sys.exit(main(sys.argv[1:]))
