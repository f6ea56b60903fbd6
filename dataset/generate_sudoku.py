"""Generate hard 9x9 Sudoku puzzles offline, as CSV files the Sudoku builder reads.

    python dataset/generate_sudoku.py --output-dir data/sudoku-gen --num-train 1000 --num-test 1000

Design choices:
- A puzzle is made by filling a random complete grid, then removing givens in a random order,
  keeping a removal only if the solution stays unique. Every given is tested once, so the
  result is *minimal* (no given can be removed; removals only ever make that harder).
- Uniqueness of a removal is tested directly: "is there a solution in which this cell has any
  other value?" — usually refuted by propagation alone, much cheaper than counting solutions.
- The solver keeps one 9-bit candidate mask per cell and propagates naked and hidden singles to
  a fixpoint; it branches on the first cell with the fewest candidates, trying digits in
  ascending order. The *rating* is the number of branch values it tries before reaching the
  solution: 0 means singles alone solve the puzzle, >= 1 means it needs search. `--min-rating`
  rejects easier puzzles (default 1: no singles-only puzzles).
- Pure Python integer bit tricks (no numpy inside the hot loops: per-call overhead dominates
  for 81-cell arrays); parallel over processes via `dataset.generation`.

CSV rows: `source,question,answer,rating`, the question 81 characters (`.` blank), the answer 81 digits.
"""

import random
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as `python dataset/generate_sudoku.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel, Field  # noqa: E402

from dataset.cli import run_cli  # noqa: E402
from dataset.generation import CSV_FILES, generate_splits  # noqa: E402

ALL = 0x1FF  # bit d-1 set <=> digit d still possible
POPCOUNT = tuple(bin(m).count("1") for m in range(512))
BIT_DIGIT = {1 << d: d + 1 for d in range(9)}

ROWS = [[r * 9 + c for c in range(9)] for r in range(9)]
COLS = [[r * 9 + c for r in range(9)] for c in range(9)]
BOXES = [[(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
UNITS = ROWS + COLS + BOXES
PEERS = [tuple(sorted({p for u in UNITS if c in u for p in u} - {c})) for c in range(81)]


class GenerateSudokuConfig(BaseModel):
    """Generate hard 9x9 Sudoku puzzles (unique solution, minimal) into train.csv and test.csv."""

    output_dir: str = Field("data/sudoku-generated", description="folder for train.csv and test.csv")
    num_train: int = Field(1000, description="puzzles in train.csv")
    num_test: int = Field(1000, description="puzzles in test.csv")
    seed: int = Field(0, ge=0, description="master seed; puzzle i of a split uses its own derived seed")
    min_rating: int = Field(1, description="minimum number of solver guesses (0 allows singles-only puzzles)")
    max_candidates: int = Field(100_000, description="give up on one puzzle after this many rejected candidates")
    num_workers: int = Field(2, description="generator processes")


def propagate(cand: list[int], queue: list[int]) -> bool:
    """Naked + hidden singles to a fixpoint, in place. `queue`: cells fixed but not yet
    eliminated from their peers. Returns False on a contradiction."""
    while True:
        while queue:
            c = queue.pop()
            m = cand[c]
            keep = ~m
            for p in PEERS[c]:
                pm = cand[p]
                if pm & m:
                    pm &= keep
                    if not pm:
                        return False
                    cand[p] = pm
                    if POPCOUNT[pm] == 1:
                        queue.append(p)
        for unit in UNITS:
            once = twice = 0
            for c in unit:
                m = cand[c]
                twice |= once & m
                once |= m
            if once != ALL:
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


def _branch_cell(cand: list[int]) -> int:
    best, best_n = -1, 10
    for c in range(81):
        n = POPCOUNT[cand[c]]
        if 1 < n < best_n:
            best, best_n = c, n
            if n == 2:
                break
    return best


def search(cand: list[int], counter: list[int], rng: random.Random | None = None) -> list[int] | None:
    """Depth-first search for one solution from a propagated state. `counter[0]` counts branch
    values tried (guesses); digits ascending, or in random order when `rng` is given."""
    cell = _branch_cell(cand)
    if cell < 0:
        return cand
    m = cand[cell]
    bits = [1 << d for d in range(9) if m >> d & 1]
    if rng is not None:
        rng.shuffle(bits)
    for bit in bits:
        counter[0] += 1
        child = cand[:]
        child[cell] = bit
        if propagate(child, [cell]):
            found = search(child, counter, rng)
            if found is not None:
                return found
    return None


def _state_from_givens(grid: list[int]) -> tuple[list[int], list[int]]:
    cand = [ALL] * 81
    queue = []
    for c, v in enumerate(grid):
        if v:
            cand[c] = 1 << (v - 1)
            queue.append(c)
    return cand, queue


def rate(grid: list[int]) -> tuple[int, list[int] | None]:
    """(guesses needed by the deterministic solver, solution or None); grid: 81 ints, 0 blank."""
    cand, queue = _state_from_givens(grid)
    if not propagate(cand, queue):
        return 0, None
    counter = [0]
    found = search(cand, counter)
    return counter[0], None if found is None else [BIT_DIGIT[m] for m in found]


def random_solution(rng: random.Random) -> list[int]:
    cand = [ALL] * 81
    queue = []
    for box in (BOXES[0], BOXES[4], BOXES[8]):  # diagonal boxes share no unit: fill them freely
        digits = list(range(9))
        rng.shuffle(digits)
        for c, d in zip(box, digits):
            cand[c] = 1 << d
            queue.append(c)
    propagate(cand, queue)  # a partial grid of three diagonal boxes is always completable
    return [BIT_DIGIT[m] for m in search(cand, [0], rng)]


def _has_other_solution(givens: list[int], cell: int, value: int) -> bool:
    """Is there a solution of `givens` (cell blank) in which `cell` is not `value`?"""
    cand, queue = _state_from_givens(givens)
    cand[cell] = ALL & ~(1 << (value - 1))
    if not propagate(cand, queue):
        return False
    return search(cand, [0]) is not None


def dig(solution: list[int], rng: random.Random) -> list[int]:
    """Remove givens from a full grid in random order while the solution stays unique."""
    givens = solution[:]
    order = list(range(81))
    rng.shuffle(order)
    for cell in order:
        value = givens[cell]
        givens[cell] = 0
        if _has_other_solution(givens, cell, value):
            givens[cell] = value
    return givens


def make_sudoku(rng: random.Random, min_rating: int = 1, max_candidates: int = 100_000) -> tuple[str, str, int]:
    """One minimal puzzle with a unique solution and rating >= min_rating: (q, a, rating)."""
    for _ in range(max_candidates):
        solution = random_solution(rng)
        puzzle = dig(solution, rng)
        rating, _ = rate(puzzle)
        if rating >= min_rating:
            q = "".join(str(v) if v else "." for v in puzzle)
            return q, "".join(map(str, solution)), rating
    raise ValueError(f"--min-rating {min_rating}: no puzzle found in {max_candidates} candidates (try a lower rating)")


def main(config: GenerateSudokuConfig) -> None:
    """Generate hard 9x9 Sudoku puzzles (unique solution, minimal) into train.csv and test.csv."""
    if config.min_rating < 0:
        raise ValueError(f"--min-rating must be >= 0, got {config.min_rating}")
    make = partial(make_sudoku, min_rating=config.min_rating, max_candidates=config.max_candidates)
    source = f"generate_sudoku:seed={config.seed}"
    generate_splits(config.output_dir, make, config.num_train, config.num_test, config.seed, config.num_workers, source)


if __name__ == "__main__":
    sys.exit(run_cli(main, GenerateSudokuConfig, output_entries=CSV_FILES))
