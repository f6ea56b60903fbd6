"""ARC scoring: crop, undo augmentation, voting, both rules, submission.json, the command line.

Synthetic predictions whose pass@K is known by construction, end-to-end runs on real puzzles
(predictions equal to the labels must give back the real solutions), and golden values from
TRM's evaluator (TinyRecursiveModels e7b6871, evaluators/arc.py): its pass@K and the sha256 of
the submission.json it writes for the predictions of `synthetic_rank_files` on the datasets of
tests/arc_data.py's golden cases A and B. To regenerate, save those files, feed
each rank's rows in batches of 64 to one TRM `ARC` object per rank (its `gather_object` handed
the ranks' states in rank order) and call `result` on rank 0's.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from dataset.build_arc_dataset import ArcBuildConfig
from dataset.build_arc_dataset import main as build_main
from dataset.cli import run_cli
from evaluators import arc_scoring
from evaluators.arc_scoring import (
    crop,
    crop_shapes,
    format_table,
    parse_identifier,
    score_prediction_files,
    score_predictions,
)
from tests.arc_data import (
    GOLDEN,
    GOLDEN_PICKS,
    OFFICIAL_KEYS,
    TRM_EVALUATOR_GOLDEN,
    labels_as_predictions,
    prize_files,
    save_rank_files,
    synthetic_rank_files,
)

PAD, EOS = 0, 1


def encode(grid: np.ndarray) -> np.ndarray:
    """Hand-written canvas encoding: colours + 2 at the top left, EOS row below and column right, PAD elsewhere."""
    canvas = np.full((30, 30), PAD, dtype=np.int64)
    rows, cols = grid.shape
    canvas[:rows, :cols] = grid + 2
    if rows < 30:
        canvas[rows, : min(cols + 1, 30)] = EOS
    if cols < 30:
        canvas[: min(rows + 1, 30), cols] = EOS
    return canvas.reshape(-1)


# Independent formulas for the transforms used below: out[i, j] in terms of the input.
def rot90_ccw(g):
    return np.array([[g[j, g.shape[1] - 1 - i] for j in range(g.shape[0])] for i in range(g.shape[1])])


def augment(grid: np.ndarray, tid: int, mapping: np.ndarray) -> np.ndarray:
    coloured = mapping[grid]
    if tid == 0:
        return coloured
    if tid == 1:
        return rot90_ccw(coloured)
    if tid == 3:
        return rot90_ccw(rot90_ccw(rot90_ccw(coloured)))
    if tid == 6:
        return np.array([[coloured[j, i] for j in range(coloured.shape[0])] for i in range(coloured.shape[1])])
    if tid == 7:  # anti-transpose: out[i, j] = g[C-1-j, R-1-i]
        r, c = coloured.shape
        return np.array([[coloured[r - 1 - j, c - 1 - i] for j in range(r)] for i in range(c)])
    raise AssertionError(tid)


PERM_A = np.array([0, 3, 1, 2, 5, 4, 9, 8, 7, 6])
PERM_B = np.array([0, 9, 8, 7, 6, 5, 4, 3, 2, 1])


def perm_name(p):
    return "".join(str(x) for x in p)


def test_crop_hand_example():
    grid = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 1, 2]])
    np.testing.assert_array_equal(crop(encode(grid)), grid)
    # A prediction with a PAD inside: rows 0-1 have 4 colour cells, row 2 only 1, row 3 has 4.
    canvas = np.full((30, 30), PAD)
    canvas[0:2, 0:4] = 5
    canvas[2, 0] = 6
    canvas[3, 0:4] = 7
    # Candidate rectangles: 1x4=4, 2x4=8, 3x1=3, 4x1=4 → the 2x4 block.
    np.testing.assert_array_equal(crop(canvas.reshape(-1)), np.full((2, 4), 3))
    assert crop(np.zeros(900, dtype=np.int64)).shape == (0, 0)


def scan_crop_shape(canvas):
    """The crop rule as a scan (TRM's `_crop`): rows top-down, the width shrinking to the row's colour run."""
    grid = canvas.reshape(30, 30)
    best, best_shape, width = 0, (0, 0), 30
    for rows in range(1, 31):
        for c in range(width):
            if not 2 <= grid[rows - 1, c] <= 11:
                width = c
                break
        if rows * width > best:
            best, best_shape = rows * width, (rows, width)
    return best_shape


def test_crop_shapes_equal_the_scan():
    rng = np.random.default_rng(0)
    canvases = []
    for i in range(300):  # grids with EOS borders, random holes, random tokens, full canvases
        canvas = encode(rng.integers(0, 10, size=(rng.integers(1, 31), rng.integers(1, 31)))).copy()
        holes = rng.integers(0, 900, size=i % 4)
        canvas[holes] = rng.integers(0, 2, size=holes.size)
        canvases.append(canvas if i % 7 else rng.integers(0, 12, 900))
    canvases.append(np.full(900, 5))
    shapes = crop_shapes(np.stack(canvases))
    assert [tuple(s) for s in shapes.tolist()] == [scan_crop_shape(c) for c in canvases]


def test_parse_identifier_both_styles():
    for name in (f"abc123_t7_{perm_name(PERM_A)}", f"abc123|||t7|||{perm_name(PERM_A)}"):
        base, tid, mapping = parse_identifier(name)
        assert (base, tid) == ("abc123", 7)
        np.testing.assert_array_equal(mapping, PERM_A)
    base, tid, mapping = parse_identifier("abc123")
    assert (base, tid) == ("abc123", 0) and mapping.tolist() == list(range(10))
    assert parse_identifier(f"Copy_t1|||t3|||{perm_name(PERM_B)}")[:2] == ("Copy_t1", 3)
    with pytest.raises(ValueError, match="not a permutation"):
        parse_identifier("abc_t1_0123456788")
    assert arc_scoring.is_arc_dataset(["<blank>", "a", f"a|||t1|||{perm_name(PERM_B)}"])
    assert not arc_scoring.is_arc_dataset(["<blank>", "a", "b"])


@pytest.mark.parametrize("tid", [1, 3, 6, 7])
def test_undo_augmentation_inverts_each_transform(tid):
    grid = np.arange(12).reshape(3, 4) % 10
    np.testing.assert_array_equal(arc_scoring.undo_augmentation(augment(grid, tid, PERM_B), tid, PERM_B), grid)


def build_outputs():
    """(outputs, identifier names) of `build_outputs_and_tasks` (tests/test_evaluate.py uses them)."""
    return build_outputs_and_tasks()[:2]


def build_outputs_and_tasks(style="hrm"):
    """Three puzzles. p1: one test input; its truth gets 2 votes, a wrong answer 3 → solved at K=2, not 1.
    p2: two test inputs; the first is right at the top, the second's truth never appears → never solved.
    p3: one test input; two answers tie on votes (2 each), the truth has the higher mean q_halt → solved at 1.
    Returns (outputs, identifier names, test tasks as test_puzzles.json holds them)."""
    names = ["<blank>"]
    rows = []  # (identifier, input grid, label grid, predicted grid, q_halt logit), all augmented
    tasks = {}

    def add_variants(base, tid_perms, test_in, test_out, answers):
        tasks.setdefault(base, {"train": [], "test": []})["test"].append(
            {"input": test_in.tolist(), "output": test_out.tolist()}
        )
        for (tid, perm), (answer, q) in zip(tid_perms, answers):
            suffix = f"_t{tid}_{perm_name(perm)}" if style == "hrm" else f"|||t{tid}|||{perm_name(perm)}"
            name = base if tid is None else base + suffix
            if name not in names:
                names.append(name)
            t, p = (0, np.arange(10)) if tid is None else (tid, perm)
            rows.append((names.index(name), augment(test_in, t, p), augment(test_out, t, p), augment(answer, t, p), q))

    ident = np.arange(10)
    variants = [(None, ident), (1, PERM_A), (3, PERM_B), (6, PERM_A), (7, PERM_B)]
    p1_in, p1_out = np.array([[1, 2], [3, 4], [5, 6]]), np.array([[7, 7, 1]])
    wrong = np.array([[7, 7, 2]])
    add_variants("p1", variants, p1_in, p1_out, [(p1_out, 0.0), (wrong, 0.0), (p1_out, 0.0), (wrong, 0), (wrong, 0)])

    p2_in1, p2_out1 = np.array([[1]]), np.array([[2, 3], [4, 5]])
    p2_in2, p2_out2 = np.array([[8, 9]]), np.array([[6]])
    add_variants("p2", variants[:2], p2_in1, p2_out1, [(p2_out1, 1.0), (p2_out1, 1.0)])
    add_variants("p2", variants[:2], p2_in2, p2_out2, [(np.array([[5]]), 1.0), (np.array([[4]]), 1.0)])

    p3_in, p3_out = np.array([[2, 2], [0, 1]]), np.array([[3]])
    add_variants(
        "p3",
        variants[:4],
        p3_in,
        p3_out,
        [(p3_out, 3.0), (np.array([[1]]), -3.0), (p3_out, 2.0), (np.array([[1]]), -1.0)],
    )

    outputs = {
        "inputs": np.stack([encode(r[1]) for r in rows]),
        "labels": np.stack([np.where(encode(r[2]) == PAD, -100, encode(r[2])) for r in rows]),
        "puzzle_identifiers": np.array([r[0] for r in rows], dtype=np.int32),
        "preds": np.stack([encode(r[3]) for r in rows]),
        "q_halt_logits": np.array([r[4] for r in rows], dtype=np.float32),
    }
    # A padding row of the last batch (blank identifier) must be ignored.
    for key in outputs:
        outputs[key] = np.concatenate([outputs[key], np.zeros_like(outputs[key][:1])])
    return outputs, names, tasks


def test_score_known_answers_notebook_rule_from_labels():
    outputs, names = build_outputs()
    score = score_predictions(outputs, names)
    assert score.num_puzzles == 3
    assert score.num_test_inputs == 4
    assert score.num_predictions == 5 + 4 + 4
    # p3 at K>=1, p1 at K>=2, p2 never.
    assert score.solved_at == {1: 1, 2: 2, 10: 2, 100: 2, 1000: 2}
    assert score.pass_at[1] == pytest.approx(1 / 3)
    table = format_table(score)
    assert "pass@2" in table and "66.67%" in table


def test_tie_broken_by_q_halt():
    outputs, names = build_outputs()
    # Flip p3's confidences: the wrong answer now has the higher mean sigmoid(q_halt) → p3 unsolved at K=1.
    p3_rows = [i for i, ident in enumerate(outputs["puzzle_identifiers"]) if names[ident].startswith("p3")]
    outputs["q_halt_logits"][p3_rows] = -outputs["q_halt_logits"][p3_rows]
    assert score_predictions(outputs, names).solved_at[1] == 0


def test_inconsistent_labels_rejected():
    outputs, names = build_outputs()
    outputs["labels"][1] = outputs["labels"][0]  # variant 1 of p1 now claims the un-rotated answer
    with pytest.raises(ValueError, match="disagree"):
        score_predictions(outputs, names)


def write_dataset(folder, names, tasks):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "identifiers.json").write_text(json.dumps(names))
    (folder / "test_puzzles.json").write_text(json.dumps(tasks))
    return str(folder)


@pytest.mark.parametrize("style", ["hrm", "trm"])
def test_official_and_notebook_rules_over_all_tasks(tmp_path, style):
    outputs, names, tasks = build_outputs_and_tasks(style)
    tasks["p4"] = {"train": [], "test": [{"input": [[1]], "output": [[1]]}]}  # never predicted: counts as 0
    data = write_dataset(tmp_path / "data", names, tasks)
    files = save_rank_files(tmp_path, outputs, logits_on=(1,))
    official = score_prediction_files(files, data)
    # per task at K=1: p1 0, p2 1/2, p3 1, p4 0; at K>=2: p1 1
    assert official.metrics() == pytest.approx(
        {"ARC/pass@1": 1.5 / 4, **{k: 2.5 / 4 for k in OFFICIAL_KEYS[1:]}}, abs=1e-12
    )
    assert official.missing == ["p4"] and official.num_puzzles == 4
    notebook = score_prediction_files(files, data, rule="notebook")
    assert notebook.metrics() == {
        "ARC/notebook_pass@1": 1 / 4,
        **{f"ARC/notebook_pass@{k}": 2 / 4 for k in (2, 5, 10, 100, 1000)},
    }
    submission = official.submission
    assert list(submission) == ["p1", "p2", "p3", "p4"] and submission["p4"] == []
    assert submission["p1"] == [{"attempt_1": [[7, 7, 2]], "attempt_2": [[7, 7, 1]]}]  # 3 votes, then 2
    assert submission["p3"] == [{"attempt_1": [[3]], "attempt_2": [[1]]}]  # tie on votes, higher mean q first
    assert submission["p2"][0] == {"attempt_1": [[2, 3], [4, 5]], "attempt_2": [[2, 3], [4, 5]]}  # one candidate


def test_ties_keep_the_first_seen_answer_first(tmp_path):
    outputs, names, tasks = build_outputs_and_tasks()
    data = write_dataset(tmp_path / "data", names, tasks)
    p3 = [i for i, ident in enumerate(outputs["puzzle_identifiers"]) if names[ident].startswith("p3")]
    outputs["q_halt_logits"][p3] = 0.5  # votes tie 2:2 and mean q ties too
    first = score_prediction_files(save_rank_files(tmp_path, outputs, ranks=1), data).submission["p3"]
    assert first == [{"attempt_1": [[3]], "attempt_2": [[1]]}]  # the truth arrives first
    order = list(range(len(outputs["inputs"])))
    order[p3[0]], order[p3[1]] = p3[1], p3[0]  # a wrong answer arrives first now
    swapped = {k: v[order] for k, v in outputs.items()}
    second = score_prediction_files(save_rank_files(tmp_path, swapped, ranks=1), data).submission["p3"]
    assert second == [{"attempt_1": [[1]], "attempt_2": [[3]]}]


def test_cli_json_submission_and_rank_order(tmp_path, capsys):
    outputs, names, tasks = build_outputs_and_tasks("trm")
    data = write_dataset(tmp_path / "data", names, tasks)
    files = save_rank_files(tmp_path, outputs, ranks=3, logits_on=(0, 2))
    argv = ["--predictions", *files[::-1], "--data-path", data, "--json"]  # any order: pooled by rank
    assert arc_scoring.main([*argv, "--submission-out", str(tmp_path / "s.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and list(json.loads(lines[0])) == OFFICIAL_KEYS
    assert json.loads(lines[0])["ARC/pass@1"] == pytest.approx(1.5 / 3)
    expected = score_prediction_files(files, data).submission
    assert (tmp_path / "s.json").read_text() == json.dumps(expected)
    assert arc_scoring.main([*argv, "--rule", "notebook"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == [f"ARC/notebook_pass@{k}" for k in (1, 2, 5, 10, 100, 1000)]
    assert arc_scoring.main(argv[:-1]) == 0  # the table
    assert "official rule" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    outputs, names, tasks = build_outputs_and_tasks()
    files = save_rank_files(tmp_path, outputs)
    cases = [
        (tmp_path / "nope", "identifiers.json not found"),
        (tmp_path / "no_tasks", "neither test_puzzles.json nor the test split"),
    ]
    (tmp_path / "no_tasks").mkdir()
    (tmp_path / "no_tasks" / "identifiers.json").write_text(json.dumps(names))
    torch.save({"inputs": torch.zeros(1, 900)}, tmp_path / "thin.0")
    data = write_dataset(tmp_path / "data", names, tasks)
    for data_path, message in cases:
        assert arc_scoring.main(["--predictions", *files, "--data-path", str(data_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    assert arc_scoring.main(["--predictions", str(tmp_path / "thin.0"), "--data-path", data]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs saved puzzle_identifiers, q_halt_logits, logits or preds" in err and "\n" not in err


# ----------------------------------------------------------------------------------------------
# Real datasets: predictions equal to the labels give back the real solutions
# ----------------------------------------------------------------------------------------------


def test_folder_build_scores_its_evaluation_puzzles(raw_data_dir, tmp_path):
    """HRM names and no test_puzzles.json: the tasks come from the test split."""
    root = tmp_path / "raw"
    evaluation = sorted((raw_data_dir / "ARC-AGI/data/evaluation").glob("*.json"))[:6]
    for sub, files in (("evaluation", evaluation), ("training", sorted((raw_data_dir / "ARC-AGI/data/training").glob("*.json"))[:2])):  # fmt: skip
        (root / sub).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / sub)
    data = tmp_path / "data"
    assert run_cli(build_main, ArcBuildConfig, ["--dataset-dirs", str(root), "--output-dir", str(data), "--num-aug", "3"]) == 0  # fmt: skip
    score = score_prediction_files(labels_as_predictions(data, tmp_path), str(data))
    assert score.metrics() == {k: 1.0 for k in OFFICIAL_KEYS}
    assert list(score.submission) == [f.stem for f in evaluation]
    for f in evaluation:
        truth = [pair["output"] for pair in json.loads(f.read_text())["test"]]
        assert [a["attempt_1"] for a in score.submission[f.stem]] == truth
        assert all(a["attempt_2"] == a["attempt_1"] for a in score.submission[f.stem])


# ----------------------------------------------------------------------------------------------
# TRM's evaluator on the same predictions (golden values)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(TRM_EVALUATOR_GOLDEN))
def test_matches_trm_evaluator_golden(raw_data_dir, tmp_path, case):
    picks = GOLDEN_PICKS if case == "B" else {k: v for k, v in GOLDEN_PICKS.items() if k != "concept"}
    prefix = prize_files(raw_data_dir / "kaggle-combined", tmp_path / "src", picks, without_solutions=("concept",))
    data = tmp_path / "data"
    argv = ["--input-file-prefix", prefix, "--output-dir", str(data), *GOLDEN[case][0]]
    assert run_cli(build_main, ArcBuildConfig, argv) == 0
    metrics, digest = TRM_EVALUATOR_GOLDEN[case]
    score = score_prediction_files(
        synthetic_rank_files(data, tmp_path), str(data), submission_path=str(tmp_path / "s.json")
    )
    assert score.metrics() == dict(zip(OFFICIAL_KEYS, metrics))  # the same floats
    assert hashlib.sha256((tmp_path / "s.json").read_bytes()).hexdigest() == digest
