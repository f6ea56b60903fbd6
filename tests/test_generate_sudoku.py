"""Sudoku generator: every puzzle checked by an independent solver written here."""

import csv
import random

import pytest

from dataset.generate_sudoku import GenerateSudokuConfig, main, make_sudoku, rate
from dataset.generation import puzzle_rng


def candidates(grid, cell):
    r, c = divmod(cell, 9)
    br, bc = r // 3 * 3, c // 3 * 3
    used = {grid[r * 9 + k] for k in range(9)} | {grid[k * 9 + c] for k in range(9)}
    used |= {grid[(br + i) * 9 + bc + j] for i in range(3) for j in range(3)}
    return [d for d in range(1, 10) if d not in used]


def count_solutions(grid, limit=2):
    """Plain backtracking (fewest-candidates cell first), no propagation: counts up to `limit`."""
    grid = list(grid)
    empties = [i for i, v in enumerate(grid) if v == 0]
    if not empties:
        return 1
    cell = min(empties, key=lambda i: len(candidates(grid, i)))
    total = 0
    for d in candidates(grid, cell):
        grid[cell] = d
        total += count_solutions(grid, limit - total)
        if total >= limit:
            break
    return total


def singles_only(grid):
    """Fill naked singles (one candidate in a cell) and hidden singles (one place in a unit)."""
    grid = list(grid)
    units = [[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)]
    units += [[(br + i) * 9 + bc + j for i in range(3) for j in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    changed = True
    while changed:
        changed = False
        for cell in range(81):
            if grid[cell] == 0 and len(cands := candidates(grid, cell)) == 1:
                grid[cell], changed = cands[0], True
        for unit in units:
            for d in range(1, 10):
                if d in (grid[i] for i in unit):
                    continue
                places = [i for i in unit if grid[i] == 0 and d in candidates(grid, i)]
                if len(places) == 1:
                    grid[places[0]], changed = d, True
    return grid


def is_valid_solution(sol):
    rows = [sol[r * 9 : r * 9 + 9] for r in range(9)]
    cols = [sol[c::9] for c in range(9)]
    boxes = [[sol[(br + i) * 9 + bc + j] for i in range(3) for j in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    return all(sorted(u) == list(range(1, 10)) for u in rows + cols + boxes)


def parse(q):
    return [0 if ch == "." else int(ch) for ch in q]


@pytest.mark.parametrize("index", range(3))
def test_generated_puzzle_is_unique_hard_and_minimal(index):
    q, a, rating = make_sudoku(puzzle_rng(7, "train", index), min_rating=1)
    grid, sol = parse(q), [int(ch) for ch in a]
    assert len(q) == len(a) == 81
    assert is_valid_solution(sol)
    assert all(g in (0, s) for g, s in zip(grid, sol))  # givens agree with the solution
    assert count_solutions(grid) == 1
    assert 0 in singles_only(grid)  # naked + hidden singles alone get stuck: search is needed
    assert rating >= 1 and rate(grid)[0] == rating and rate(grid)[1] == sol
    for cell in (i for i, v in enumerate(grid) if v):  # minimal: removing any given breaks uniqueness
        reduced = grid[:]
        reduced[cell] = 0
        assert count_solutions(reduced) == 2, cell


def test_rating_zero_for_singles_puzzle_and_min_rating():
    # A full grid with three cells removed is solved by singles: the rater must say 0 guesses.
    q, a, _ = make_sudoku(random.Random(3), min_rating=1)
    full = [int(ch) for ch in a]
    easy = full[:]
    for cell in (0, 40, 80):
        easy[cell] = 0
    assert rate(easy) == (0, full)
    _, _, rating = make_sudoku(random.Random(4), min_rating=3)
    assert rating >= 3


def test_cli_output_is_reproducible_and_independent_of_workers(tmp_path):
    common = dict(num_train=4, num_test=2, seed=11, min_rating=1)
    main(GenerateSudokuConfig(output_dir=str(tmp_path / "w1"), num_workers=1, **common))
    main(GenerateSudokuConfig(output_dir=str(tmp_path / "w2"), num_workers=2, **common))
    for split in ("train", "test"):
        one = (tmp_path / "w1" / f"{split}.csv").read_text()
        assert one == (tmp_path / "w2" / f"{split}.csv").read_text()
        rows = list(csv.reader(one.splitlines()))
        assert rows[0] == ["source", "question", "answer", "rating"]  # the hub files' header
        assert len(rows) == 1 + common[f"num_{split}"]
        for _, q, a, rating in rows[1:]:
            assert rate(parse(q)) == (int(rating), [int(ch) for ch in a])
    train = list(csv.reader((tmp_path / "w1" / "train.csv").read_text().splitlines()))[1:]
    test = list(csv.reader((tmp_path / "w1" / "test.csv").read_text().splitlines()))[1:]
    assert not {r[1] for r in train} & {r[1] for r in test}  # splits use different seeds


def test_cli_bad_value_is_one_line_error(capsys):
    from dataset.cli import run_cli

    assert run_cli(main, GenerateSudokuConfig, ["--min-rating", "-1", "--output-dir", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --min-rating must be >= 0") and err.count("\n") == 1
