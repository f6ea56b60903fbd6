"""Generate Sudoku puzzles offline (hard 9x9 by default; 6x6 and 4x4 too), as CSV files the Sudoku builder reads.

    python dataset/generate_sudoku.py --output-dir data/sudoku-gen --num-train 1000 --num-test 1000
    python dataset/generate_sudoku.py --output-dir data/sudoku6-gen --size 6 --min-rating 0

Design choices:
- A puzzle is made by filling a random complete grid, then removing givens in a random order,
  keeping a removal only if the solution stays unique. Every given is tested once, so the
  result is *minimal* (no given can be removed; removals only ever make that harder).
- Uniqueness of a removal is tested directly: "is there a solution in which this cell has any
  other value?" — usually refuted by propagation alone, much cheaper than counting solutions.
- The solver keeps one candidate bit mask per cell and propagates naked and hidden singles to
  a fixpoint; it branches on the first cell with the fewest candidates, trying digits in
  ascending order. The *rating* is the number of branch values it tries before reaching the
  solution: 0 means singles alone solve the puzzle, >= 1 means it needs search. `--min-rating`
  rejects easier puzzles (default 1: no singles-only puzzles).
- `--size` picks the grid: 9 (3x3 boxes, the default), 6 (boxes of 2 rows x 3 columns) or 4
  (2x2 boxes). Everything above works on any of them through one `Geometry` (units, peers, bit
  tables); for size 9 the random draws are the same as before sizes existed, so 9x9 files are
  unchanged.
- Pure Python integer bit tricks (no numpy inside the hot loops: per-call overhead dominates
  for 81-cell arrays); parallel over processes via `dataset.generation`.

CSV rows: `source,question,answer,rating`, the question size*size characters (`.` blank), the
answer size*size digits.
"""

import random
import sys
from functools import cache, partial
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as `python dataset/generate_sudoku.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel, Field  # noqa: E402

from dataset.cli import run_cli  # noqa: E402
from dataset.generation import CSV_FILES, generate_splits  # noqa: E402

BOX_SHAPES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # grid side -> (rows, columns) of one box


class Geometry(NamedTuple):
    """Tables of one grid size; cells are row-major ids, digit d is bit d-1 of a candidate mask."""

    size: int
    cells: int
    full: int  # mask with every digit possible
    popcount: tuple[int, ...]  # bits set in each mask
    bit_digit: dict[int, int]  # single-bit mask -> its digit
    boxes: list[list[int]]  # row-major over the boxes
    units: list[list[int]]  # rows, then columns, then boxes
    peers: list[tuple[int, ...]]  # cells sharing a unit with each cell


@cache
def geometry(size: int) -> Geometry:
    box_rows, box_cols = BOX_SHAPES[size]
    rows = [[r * size + c for c in range(size)] for r in range(size)]
    cols = [[r * size + c for r in range(size)] for c in range(size)]
    boxes = [
        [(br * box_rows + r) * size + bc * box_cols + c for r in range(box_rows) for c in range(box_cols)]
        for br in range(size // box_rows)
        for bc in range(size // box_cols)
    ]
    units = rows + cols + boxes
    peers = [tuple(sorted({p for u in units if c in u for p in u} - {c})) for c in range(size * size)]
    return Geometry(
        size=size,
        cells=size * size,
        full=(1 << size) - 1,
        popcount=tuple(bin(m).count("1") for m in range(1 << size)),
        bit_digit={1 << d: d + 1 for d in range(size)},
        boxes=boxes,
        units=units,
        peers=peers,
    )


class GenerateSudokuConfig(BaseModel):
    """Generate Sudoku puzzles (unique solution, minimal) into train.csv and test.csv."""

    output_dir: str = Field("data/sudoku-generated", description="folder for train.csv and test.csv")
    num_train: int = Field(1000, description="puzzles in train.csv")
    num_test: int = Field(1000, description="puzzles in test.csv")
    seed: int = Field(0, ge=0, description="master seed; puzzle i of a split uses its own derived seed")
    size: int = Field(9, description="grid side: 9 (3x3 boxes), 6 (2x3 boxes) or 4 (2x2 boxes)")
    min_rating: int = Field(1, description="minimum number of solver guesses (0 allows singles-only puzzles)")
    max_candidates: int = Field(100_000, description="give up on one puzzle after this many rejected candidates")
    num_workers: int = Field(2, description="generator processes")


def propagate(cand: list[int], queue: list[int], geo: Geometry) -> bool:
    """Naked + hidden singles to a fixpoint, in place. `queue`: cells fixed but not yet
    eliminated from their peers. Returns False on a contradiction."""
    peers, popcount, full = geo.peers, geo.popcount, geo.full
    while True:
        while queue:
            c = queue.pop()
            m = cand[c]
            keep = ~m
            for p in peers[c]:
                pm = cand[p]
                if pm & m:
                    pm &= keep
                    if not pm:
                        return False
                    cand[p] = pm
                    if popcount[pm] == 1:
                        queue.append(p)
        for unit in geo.units:
            once = twice = 0
            for c in unit:
                m = cand[c]
                twice |= once & m
                once |= m
            if once != full:
                return False  # some digit has no place left in this unit
            hidden = once & ~twice
            if hidden:
                for c in unit:
                    m = cand[c] & hidden
                    if m and cand[c] != m:
                        if m & (m - 1):
                            return False  # two digits can only go into this one cell
                        cand[c] = m
                        queue.append(c)
        if not queue:
            return True


def _branch_cell(cand: list[int], geo: Geometry) -> int:
    popcount = geo.popcount
    best, best_n = -1, geo.size + 1
    for c in range(geo.cells):
        n = popcount[cand[c]]
        if 1 < n < best_n:
            best, best_n = c, n
            if n == 2:
                break
    return best


def search(cand: list[int], counter: list[int], geo: Geometry, rng: random.Random | None = None) -> list[int] | None:
    """Depth-first search for one solution from a propagated state. `counter[0]` counts branch
    values tried (guesses); digits ascending, or in random order when `rng` is given."""
    cell = _branch_cell(cand, geo)
    if cell < 0:
        return cand
    m = cand[cell]
    bits = [1 << d for d in range(geo.size) if m >> d & 1]
    if rng is not None:
        rng.shuffle(bits)
    for bit in bits:
        counter[0] += 1
        child = cand[:]
        child[cell] = bit
        if propagate(child, [cell], geo):
            found = search(child, counter, geo, rng)
            if found is not None:
                return found
    return None


def _state_from_givens(grid: list[int], geo: Geometry) -> tuple[list[int], list[int]]:
    cand = [geo.full] * geo.cells
    queue = []
    for c, v in enumerate(grid):
        if v:
            cand[c] = 1 << (v - 1)
            queue.append(c)
    return cand, queue


def rate(grid: list[int], size: int = 9) -> tuple[int, list[int] | None]:
    """(guesses needed by the deterministic solver, solution or None); grid: size*size ints, 0 blank."""
    geo = geometry(size)
    cand, queue = _state_from_givens(grid, geo)
    if not propagate(cand, queue, geo):
        return 0, None
    counter = [0]
    found = search(cand, counter, geo)
    return counter[0], None if found is None else [geo.bit_digit[m] for m in found]


def random_solution(rng: random.Random, geo: Geometry) -> list[int]:
    box_rows, box_cols = BOX_SHAPES[geo.size]
    stacks = geo.size // box_cols
    # Boxes on the diagonal of the box grid share no unit, so each can take any order of the digits.
    diagonal = [geo.boxes[i * stacks + i] for i in range(min(geo.size // box_rows, stacks))]
    while True:
        cand = [geo.full] * geo.cells
        queue = []
        for box in diagonal:
            digits = list(range(geo.size))
            rng.shuffle(digits)
            for c, d in zip(box, digits):
                cand[c] = 1 << d
                queue.append(c)
        # Three filled diagonal 3x3 boxes always complete; for 2x3 boxes two may not: draw again.
        if propagate(cand, queue, geo):
            found = search(cand, [0], geo, rng)
            if found is not None:
                return [geo.bit_digit[m] for m in found]


def _has_other_solution(givens: list[int], cell: int, value: int, geo: Geometry) -> bool:
    """Is there a solution of `givens` (cell blank) in which `cell` is not `value`?"""
    cand, queue = _state_from_givens(givens, geo)
    cand[cell] = geo.full & ~(1 << (value - 1))
    if not propagate(cand, queue, geo):
        return False
    return search(cand, [0], geo) is not None


def dig(solution: list[int], rng: random.Random, geo: Geometry) -> list[int]:
    """Remove givens from a full grid in random order while the solution stays unique."""
    givens = solution[:]
    order = list(range(geo.cells))
    rng.shuffle(order)
    for cell in order:
        value = givens[cell]
        givens[cell] = 0
        if _has_other_solution(givens, cell, value, geo):
            givens[cell] = value
    return givens


def make_sudoku(
    rng: random.Random, min_rating: int = 1, max_candidates: int = 100_000, size: int = 9
) -> tuple[str, str, int]:
    """One minimal puzzle with a unique solution and rating >= min_rating: (q, a, rating)."""
    geo = geometry(size)
    for _ in range(max_candidates):
        solution = random_solution(rng, geo)
        puzzle = dig(solution, rng, geo)
        rating, _ = rate(puzzle, size)
        if rating >= min_rating:
            q = "".join(str(v) if v else "." for v in puzzle)
            return q, "".join(map(str, solution)), rating
    raise ValueError(f"--min-rating {min_rating}: no puzzle found in {max_candidates} candidates (try a lower rating)")


def main(config: GenerateSudokuConfig) -> None:
    """Generate Sudoku puzzles (unique solution, minimal) into train.csv and test.csv."""
    if config.size not in BOX_SHAPES:
        raise ValueError(f"--size must be one of {', '.join(map(str, BOX_SHAPES))}, got {config.size}")
    if config.min_rating < 0:
        raise ValueError(f"--min-rating must be >= 0, got {config.min_rating}")
    make = partial(make_sudoku, min_rating=config.min_rating, max_candidates=config.max_candidates, size=config.size)
    source = f"generate_sudoku:seed={config.seed}"
    generate_splits(config.output_dir, make, config.num_train, config.num_test, config.seed, config.num_workers, source)


def command_line() -> int:
    """`python dataset/generate_sudoku.py ...` and `hrm-generate-sudoku ...`: flags, one-line errors, the exit status."""
    return run_cli(main, GenerateSudokuConfig, output_entries=CSV_FILES)


if __name__ == "__main__":
    sys.exit(command_line())
