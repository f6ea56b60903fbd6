"""ARC scoring on synthetic predictions whose pass@K is known by construction."""

import numpy as np
import pytest
import torch

from utils import arc_scoring
from utils.arc_scoring import crop, format_table, parse_identifier, score_predictions

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


def test_parse_identifier():
    base, tid, mapping = parse_identifier(f"abc123_t7_{perm_name(PERM_A)}")
    assert (base, tid) == ("abc123", 7)
    np.testing.assert_array_equal(mapping, PERM_A)
    base, tid, mapping = parse_identifier("abc123")
    assert (base, tid) == ("abc123", 0) and mapping.tolist() == list(range(10))
    with pytest.raises(ValueError, match="not a permutation"):
        parse_identifier("abc_t1_0123456788")


@pytest.mark.parametrize("tid", [1, 3, 6, 7])
def test_undo_augmentation_inverts_each_transform(tid):
    grid = np.arange(12).reshape(3, 4) % 10
    np.testing.assert_array_equal(arc_scoring.undo_augmentation(augment(grid, tid, PERM_B), tid, PERM_B), grid)


def build_outputs():
    """Two puzzles. p1: one test input; its truth gets 2 votes, a wrong answer 3 → solved at K=2, not 1.
    p2: two test inputs; the first is right at the top, the second's truth never appears → never solved.
    p3: one test input; two answers tie on votes (2 each), the truth has the higher mean q_halt → solved at 1."""
    names = ["<blank>"]
    rows = []  # (identifier, input grid, label grid, predicted grid, q_halt logit), all augmented

    def add_variants(base, tid_perms, test_in, test_out, answers):
        for (tid, perm), (answer, q) in zip(tid_perms, answers):
            name = base if tid is None else f"{base}_t{tid}_{perm_name(perm)}"
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
    return outputs, names


def test_score_known_answers():
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


def test_cli_reads_rank_files_with_logits(tmp_path, capsys):
    outputs, names = build_outputs()
    logits = np.eye(12, dtype=np.float32)[outputs.pop("preds")]  # one-hot logits, argmax = the prediction
    outputs["logits"] = logits
    half = len(outputs["inputs"]) // 2
    for rank, sl in enumerate([slice(0, half), slice(half, None)]):
        torch.save(
            {k: torch.from_numpy(np.ascontiguousarray(v[sl])) for k, v in outputs.items()},
            tmp_path / f"step_5_all_preds.{rank}",
        )
    (tmp_path / "identifiers.json").write_text(__import__("json").dumps(names))
    files = [str(tmp_path / f"step_5_all_preds.{r}") for r in (1, 0)]  # any order
    assert arc_scoring.main(["--predictions", *files, "--data-path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 puzzles" in out and "33.33%" in out


def test_cli_missing_identifiers(tmp_path, capsys):
    torch.save({"inputs": torch.zeros(1, 900)}, tmp_path / "p.0")
    assert arc_scoring.main(["--predictions", str(tmp_path / "p.0"), "--data-path", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: identifiers.json not found") and "\n" not in err


def test_inconsistent_labels_rejected():
    outputs, names = build_outputs()
    outputs["labels"][1] = outputs["labels"][0]  # variant 1 of p1 now claims the un-rotated answer
    with pytest.raises(ValueError, match="disagree"):
        score_predictions(outputs, names)
