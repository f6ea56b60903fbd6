"""The quick start's pieces: 6x6 and 4x4 Sudokus from the generator and builder (checked by a solver written
here), the report's numbers and grid, and (marked full_size, run by .ci/run) the script itself end to end."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import REPO

BOXES = {4: (2, 2), 6: (2, 3)}


def units(size):
    box_rows, box_cols = BOXES[size]
    rows = [[r * size + c for c in range(size)] for r in range(size)]
    cols = [[r * size + c for r in range(size)] for c in range(size)]
    boxes = [
        [(r0 + r) * size + c0 + c for r in range(box_rows) for c in range(box_cols)]
        for r0 in range(0, size, box_rows)
        for c0 in range(0, size, box_cols)
    ]
    return rows + cols + boxes


def is_solution(grid, size):
    return all(sorted(grid[i] for i in unit) == list(range(1, size + 1)) for unit in units(size))


def count_solutions(grid, size, limit=2):
    """Plain backtracking over the first blank cell, no propagation: counts solutions up to `limit`."""
    grid = list(grid)
    if 0 not in grid:
        return 1
    cell = grid.index(0)
    peers = {p for unit in units(size) if cell in unit for p in unit}
    total = 0
    for d in set(range(1, size + 1)) - {grid[p] for p in peers}:
        grid[cell] = d
        total += count_solutions(grid, size, limit - total)
        if total >= limit:
            break
    return total


def generate(out, size, num_train, num_test, *flags):
    cmd = [sys.executable, str(REPO / "dataset/generate_sudoku.py"), "--output-dir", str(out), "--size", str(size)]
    cmd += ["--num-train", str(num_train), "--num-test", str(num_test), "--min-rating", "0", *flags]
    subprocess.run(cmd, check=True, capture_output=True)


def read_rows(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["source", "question", "answer", "rating"]
    return rows[1:]


def digits(text):
    return [0 if ch == "." else int(ch) for ch in text]


@pytest.mark.parametrize("size", [4, 6])
def test_small_sizes_generate_unique_minimal_puzzles(tmp_path, size):
    generate(tmp_path, size, 12, 6)
    for split, count in (("train", 12), ("test", 6)):
        rows = read_rows(tmp_path / f"{split}.csv")
        assert len(rows) == count
        for _source, question, answer, _rating in rows:
            q, a = digits(question), digits(answer)
            assert len(q) == len(a) == size * size
            assert is_solution(a, size)
            assert all(g in (0, s) for g, s in zip(q, a, strict=True))
            assert count_solutions(q, size) == 1
            for cell in (c for c, g in enumerate(q) if g):  # minimal: every given is needed
                fewer = q[:cell] + [0] + q[cell + 1 :]
                assert count_solutions(fewer, size) == 2


def test_size_6_build_keeps_every_augmentation_a_valid_puzzle(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    generate(src, 6, 20, 5)
    build = [sys.executable, str(REPO / "dataset/build_sudoku_dataset.py"), "--source-repo", str(src)]
    subprocess.run([*build, "--output-dir", str(out), "--size", "6", "--num-aug", "5"], check=True, capture_output=True)

    meta = json.loads((out / "train" / "dataset.json").read_text())
    assert (meta["vocab_size"], meta["seq_len"], meta["total_groups"]) == (8, 36, 20)
    inputs = np.load(out / "train" / "all__inputs.npy").astype(int) - 1  # tokens: blank 1, digit d -> d + 1
    labels = np.load(out / "train" / "all__labels.npy").astype(int) - 1
    assert inputs.shape == labels.shape == (20 * 6, 36)
    np.testing.assert_array_equal(np.load(out / "train" / "all__group_indices.npy"), np.arange(0, 121, 6))
    originals = read_rows(src / "train.csv")
    for i, (q, a) in enumerate(zip(inputs, labels, strict=True)):
        assert is_solution(a.tolist(), 6), f"row {i}: labels are not a 6x6 Sudoku with 2x3 boxes"
        assert ((q == 0) | (q == a)).all()
        # a symmetry keeps the number of givens and the uniqueness of the solution
        assert (q > 0).sum() == sum(ch != "." for ch in originals[i // 6][1])
        assert count_solutions(q.tolist(), 6) == 1
    for g, (_source, question, answer, _rating) in enumerate(originals):  # each group starts with its original
        assert inputs[6 * g].tolist() == digits(question) and labels[6 * g].tolist() == digits(answer)
    assert any((inputs[6 * g + k] != inputs[6 * g]).any() for g in range(20) for k in range(1, 6))

    test_q = np.load(out / "test" / "all__inputs.npy").astype(int) - 1
    assert test_q.tolist() == [digits(row[1]) for row in read_rows(src / "test.csv")]  # held out, not augmented


def saved_outputs(tmp_path, src):
    """Saved outputs as evaluate.py writes them for 4 real 6x6 test puzzles: the model right on puzzles 0 and 1,
    one cell wrong on 2 and 3; plus a padding row of the last batch (labels all IGNORE)."""
    rows = read_rows(src / "test.csv")[:4]
    inputs = torch.tensor([[v + 1 for v in digits(q)] for _s, q, _a, _r in rows] + [[0] * 36])
    labels = torch.tensor([[v + 1 for v in digits(a)] for _s, _q, a, _r in rows] + [[-100] * 36])
    preds = labels.clamp(min=0).clone()
    for r in (2, 3):
        blank = int((inputs[r] == 1).nonzero()[0])
        preds[r, blank] = 2 + (preds[r, blank] - 1) % 6  # another digit
    logits = torch.nn.functional.one_hot(preds, 8).float()
    path = tmp_path / "step_9_all_preds.0"
    torch.save({"inputs": inputs, "labels": labels, "logits": logits, "puzzle_identifiers": torch.zeros(5)}, path)
    return path, inputs[:4], labels[:4]


def report(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts/quickstart_report.py"), *map(str, args)], capture_output=True, text=True
    )


def test_report_scores_held_out_puzzles_against_the_baseline_and_draws_a_solved_one(tmp_path):
    src = tmp_path / "src"
    generate(src, 6, 2, 4)
    path, inputs, labels = saved_outputs(tmp_path, src)
    result = report(path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "held-out 6x6 Sudokus (test split, never seen in training): 4" in out
    # baseline: givens copied, the most frequent answer digit over the blanks written into every blank
    blank = inputs == 1
    guess = torch.where(blank, labels[blank].bincount().argmax(), inputs)
    base_exact = (guess == labels).all(-1).float().mean().item()
    base_blank = (guess == labels)[blank].float().mean().item()
    model_blank = 1 - 2 / blank.sum().item()
    exact_line = re.search(r"exact \(whole puzzle right\)\s+([\d.]+)%\s+([\d.]+)%", out)
    assert exact_line and exact_line.groups() == ("50.0", f"{100 * base_exact:.1f}")
    blank_line = re.search(r"blank cells right\s+([\d.]+)%\s+([\d.]+)%", out)
    assert blank_line and blank_line.groups() == (f"{100 * model_blank:.1f}", f"{100 * base_blank:.1f}")
    assert "held-out puzzle 0, solved" in out
    grid = out.split("model's answer\n")[1].splitlines()
    assert len(grid) == 6 + 2  # six rows, two separators between the three bands of two rows
    answer = [int(ch) for line in grid if "-" not in line for ch in line.split("    ")[1] if ch.isdigit()]
    assert answer == (labels[0] - 1).tolist()


def test_report_marks_wrong_cells_when_nothing_is_solved(tmp_path):
    src = tmp_path / "src"
    generate(src, 6, 2, 4)
    path, _inputs, _labels = saved_outputs(tmp_path, src)
    data = torch.load(path)
    data["logits"] = data["logits"].roll(1, dims=-1)  # every prediction one digit off
    torch.save(data, path)
    out = report(path).stdout
    assert re.search(r"exact \(whole puzzle right\)\s+0\.0%", out)
    assert "the model solved none; * marks a wrong cell" in out and "*" in out.split("model's answer\n")[1]


def missing_file(folder):
    return folder / "missing.0"


def not_a_torch_file(folder):
    (folder / "x.0").write_bytes(b"not a torch file")
    return folder / "x.0"


def no_labels(folder):
    torch.save({"inputs": torch.zeros(2, 36)}, folder / "y.0")
    return folder / "y.0"


def not_a_sudoku(folder):  # 25 cells: a square, but no Sudoku size the generator makes
    grids = torch.ones(2, 25, dtype=torch.long)
    torch.save({"inputs": grids, "labels": grids, "logits": torch.ones(2, 25, 8)}, folder / "z.0")
    return folder / "z.0"


@pytest.mark.parametrize(
    "make, message",
    [
        (missing_file, "not found"),
        (not_a_torch_file, "not a readable torch saved-outputs file"),
        (no_labels, "no tensor 'labels'"),
        (not_a_sudoku, "25 cells per puzzle, not a Sudoku"),
    ],
    ids=["missing", "not_torch", "no_labels", "not_a_sudoku"],
)
def test_report_bad_input_is_one_error_line(tmp_path, make, message):
    result = report(make(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.full_size
def test_quickstart_script_solves_most_held_out_puzzles(tmp_path):
    """README's first command as it is, in the test's own environment: at least 80% of the held-out 6x6
    Sudokus solved exactly, far above the no-learning baseline, and the training and evaluation time printed."""
    env = {**os.environ, "VENV": sys.prefix, "QS_OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(REPO / "scripts/quickstart.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    exact = re.search(r"exact \(whole puzzle right\)\s+([\d.]+)%\s+([\d.]+)%", result.stdout)
    assert exact, result.stdout[-2000:]
    model, baseline = map(float, exact.groups())
    assert model >= 80.0 and baseline < 5.0
    took = re.search(r"training and evaluation took (\d+) s", result.stdout)
    print(f"quick start: {model}% exact (baseline {baseline}%), training + evaluation {took.group(1)} s")
    assert "solved (every cell matches the solution)" in result.stdout
    assert list((tmp_path / "checkpoints" / "quickstart").glob("step_*_step_accuracy.json"))
