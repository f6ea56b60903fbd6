"""Sudoku builder: on-disk format, augmentation as a property, filters, hub source, bad input."""

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset.build_sudoku_dataset import SudokuBuildConfig, main
from dataset.cli import run_cli
from dataset.generate_sudoku import make_sudoku
from dataset.generation import puzzle_rng
from tests.helpers import REPO


@pytest.fixture(scope="module")
def puzzles():
    """Six generated hard puzzles: (q, a, rating)."""
    return [make_sudoku(puzzle_rng(1, "train", i), min_rating=1) for i in range(6)]


def write_csvs(folder: Path, train_rows, test_rows):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train_rows), ("test.csv", test_rows)):
        lines = ["source,q,a,rating"] + [f"src,{q},{a},{r}" for q, a, r in rows]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


HUB_HEADER = "source,question,answer,rating"  # line 1 of sapientinc/sudoku-extreme's train.csv and test.csv


def write_hub_csvs(folder: Path, train_rows, test_rows, header=HUB_HEADER, bom=False, crlf=False):
    """Source files in the hub files' layout: a header line, then `source,question,answer,rating` rows
    (question 81 characters with '.' blank, answer 81 digits, integer rating); optionally with a UTF-8
    byte-order mark and CRLF line ends."""
    folder.mkdir(parents=True, exist_ok=True)
    end = "\r\n" if crlf else "\n"
    for name, rows in (("train.csv", train_rows), ("test.csv", test_rows)):
        text = end.join([header] + [f"sudoku-extreme-{i},{q},{a},{r}" for i, (q, a, r) in enumerate(rows)]) + end
        (folder / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return folder


def output_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def build(tmp_path, src, *flags):
    out = tmp_path / "out"
    assert run_cli(main, SudokuBuildConfig, ["--source-repo", str(src), "--output-dir", str(out), *flags]) == 0
    return out


def load(out, split):
    return {
        f: np.load(out / split / f"all__{f}.npy")
        for f in ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
    }


def tokens(s):
    return [1 if ch in ".0" else int(ch) + 1 for ch in s]


def test_on_disk_format(tmp_path, puzzles):
    src = write_csvs(tmp_path / "src", puzzles[:4], puzzles[4:])
    out = build(tmp_path, src, "--num-aug", "3")
    for split, n, per in (("train", 4, 4), ("test", 2, 1)):
        arr = load(out, split)
        assert arr["inputs"].dtype == arr["labels"].dtype == np.uint8
        assert {arr[k].dtype for k in ("puzzle_identifiers", "puzzle_indices", "group_indices")} == {np.dtype(np.int32)}
        assert arr["inputs"].shape == arr["labels"].shape == (n * per, 81)
        assert arr["puzzle_identifiers"].tolist() == [0] * (n * per)
        assert arr["puzzle_indices"].tolist() == list(range(n * per + 1))
        assert arr["group_indices"].tolist() == list(range(0, n * per + 1, per))
        meta = json.loads((out / split / "dataset.json").read_text())
        assert meta == {
            "pad_id": 0,
            "ignore_label_id": 0,
            "blank_identifier_id": 0,
            "vocab_size": 11,
            "seq_len": 81,
            "num_puzzle_identifiers": 1,
            "total_groups": n,
            "mean_puzzle_examples": 1.0,
            "total_puzzles": n * per,
            "sets": ["all"],
        }
    assert json.loads((out / "identifiers.json").read_text()) == ["<blank>"]
    test = load(out, "test")
    assert test["inputs"].tolist() == [tokens(q) for q, _, _ in puzzles[4:]]
    assert test["labels"].tolist() == [tokens(a) for _, a, _ in puzzles[4:]]
    train = load(out, "train")  # original first in each group
    assert train["inputs"][::4].tolist() == [tokens(q) for q, _, _ in puzzles[:4]]


ROW_PERMS = np.array(
    [
        [b * 3 + w for b, within in zip(bands, ws) for w in within]
        for bands in itertools.permutations(range(3))
        for ws in itertools.product(itertools.permutations(range(3)), repeat=3)
    ]
)  # all 1296 band-preserving row orders


def find_symmetry(orig, aug):
    """Search (transpose, band-preserving rows R, stack-preserving columns C, digit map D) with
    aug[i, j] = D[orig_t[R[i], C[j]]]. Returns the first found or None. Vectorised over R."""
    for t in (False, True):
        base = orig.T if t else orig
        grids = base[ROW_PERMS]  # [1296, 9, 9]
        for c0 in range(9):
            inv = np.zeros((len(ROW_PERMS), 10), dtype=np.int64)  # aug digit -> original digit
            inv[np.arange(len(ROW_PERMS))[:, None], aug[None, :, 0]] = grids[:, :, c0]
            mapped = np.take_along_axis(inv, np.broadcast_to(aug.reshape(1, 81), (len(ROW_PERMS), 81)), axis=1).reshape(
                -1, 9, 9
            )
            # match[k, j, c]: column j of the un-relabelled aug equals column c of the row-permuted original
            match = (mapped[:, :, :, None] == grids[:, :, None, :]).all(axis=1)
            ok = match.sum(axis=2) == 1
            for k in np.flatnonzero(ok.all(axis=1)):
                cols = match[k].argmax(axis=1)
                stacks = cols.reshape(3, 3) // 3
                if (stacks == stacks[:, :1]).all() and sorted(stacks[:, 0]) == [0, 1, 2]:
                    return t, ROW_PERMS[k], cols, inv[k]
    return None


def valid_solution(g):
    units = list(g) + list(g.T) + [g[r : r + 3, c : c + 3].ravel() for r in (0, 3, 6) for c in (0, 3, 6)]
    return all(sorted(u) == list(range(1, 10)) for u in units)


def test_augmentations_are_symmetries_of_the_original(tmp_path, puzzles):
    src = write_csvs(tmp_path / "src", puzzles[:2], puzzles[2:3])
    out = build(tmp_path, src, "--num-aug", "4", "--seed", "3")
    arr = load(out, "train")
    inputs, labels = arr["inputs"].astype(int) - 1, arr["labels"].astype(int) - 1  # back to values, blank 0
    for g in range(2):
        oq, oa = inputs[g * 5].reshape(9, 9), labels[g * 5].reshape(9, 9)
        for k in range(1, 5):
            q, a = inputs[g * 5 + k].reshape(9, 9), labels[g * 5 + k].reshape(9, 9)
            assert valid_solution(a)
            assert ((q == 0) | (q == a)).all()  # givens agree with the solution
            assert (q == 0).sum() == (oq == 0).sum()
            found = find_symmetry(oa, a)
            assert found is not None, (g, k)
            t, rows, cols, inv = found
            assert sorted(inv[1:]) == list(range(1, 10)) and inv[0] == 0  # a relabelling, blank fixed
            base = oq.T if t else oq
            fwd = np.argsort(inv)  # original digit -> aug digit
            assert np.array_equal(fwd[base[rows][:, cols]], q)  # the same transform maps puzzle to puzzle


def test_symmetry_search_rejects_non_symmetric(puzzles):
    a = np.array([int(ch) for ch in puzzles[0][1]]).reshape(9, 9)
    b = a.copy()
    b[[0, 3]] = b[[3, 0]]  # swapping rows of two different bands is not a Sudoku symmetry
    assert find_symmetry(a, a) is not None
    assert find_symmetry(a, b) is None


def test_filters_subsample_and_determinism(tmp_path, puzzles):
    rows = [(q, a, i) for i, (q, a, _) in enumerate(puzzles)]  # ratings 0..5
    src = write_csvs(tmp_path / "src", rows, rows[-1:])  # the filter applies to both splits, as in the reference
    out = build(tmp_path, src, "--min-difficulty", "2")
    kept = load(out, "train")["inputs"].tolist()
    assert kept == [tokens(q) for q, _, r in rows if r >= 2]
    out_a = build(tmp_path / "a", src, "--subsample-size", "3", "--num-aug", "2", "--seed", "5")
    out_b = build(tmp_path / "b", src, "--subsample-size", "3", "--num-aug", "2", "--seed", "5")
    out_c = build(tmp_path / "c", src, "--subsample-size", "3", "--num-aug", "2", "--seed", "6")
    a, b, c = (load(o, "train")["inputs"] for o in (out_a, out_b, out_c))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    originals = {tuple(tokens(q)) for q, _, _ in rows}
    assert len({tuple(x) for x in a[::3]}) == 3 and {tuple(x) for x in a[::3]} <= originals
    assert load(out_a, "test")["inputs"].shape == (1, 81)  # subsample and augmentation: train only


def test_hub_source_uses_hf_hub_download(tmp_path, puzzles, monkeypatch):
    local = write_csvs(tmp_path / "cache", puzzles[:2], puzzles[2:3])
    calls = []

    def fake_download(repo_id, filename, repo_type=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        return str(local / filename)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out = build(tmp_path, "sapientinc/sudoku-extreme")
    assert calls == [
        ("sapientinc/sudoku-extreme", "train.csv", "dataset"),
        ("sapientinc/sudoku-extreme", "test.csv", "dataset"),
    ]
    assert load(out, "train")["inputs"].shape == (2, 81)


def test_output_bytes_do_not_depend_on_header_bom_or_line_ends(tmp_path, puzzles):
    variants = {
        "generator_header": dict(header="source,q,a,rating"),
        "hub_header": dict(),
        "hub_header_bom_crlf": dict(bom=True, crlf=True),
        "any_names": dict(header="w,x,y,z", crlf=True),
    }
    outputs = {}
    for name, layout in variants.items():
        src = write_hub_csvs(tmp_path / name, puzzles[:3], puzzles[3:5], **layout)
        outputs[name] = output_files(build(tmp_path / f"out_{name}", src, "--num-aug", "2", "--seed", "4"))
    raw = (tmp_path / "hub_header_bom_crlf" / "train.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfsource,question,answer,rating\r\n") and raw.count(b"\r\n") == 4
    reference = outputs["generator_header"]
    assert len(reference) == 13  # identifiers.json + 2 splits x (dataset.json + 5 arrays)
    for name in variants:
        assert outputs[name] == reference, name
    test_inputs = np.load(tmp_path / "out_hub_header_bom_crlf" / "out" / "test" / "all__inputs.npy")
    assert test_inputs.tolist() == [tokens(q) for q, _, _ in puzzles[3:5]]  # every data row read, none lost


def test_headerless_file_loses_its_first_row_with_a_warning(tmp_path, puzzles, capsys):
    # The reference skips line 1 whatever it holds; a file without a header loses a puzzle, so say so.
    src = write_hub_csvs(tmp_path / "src", puzzles[1:3], puzzles[3:4], header=f"src,{puzzles[0][0]},{puzzles[0][1]},1")
    write_hub_csvs(tmp_path / "hub", [], puzzles[3:4])
    shutil.copy(tmp_path / "hub" / "test.csv", src / "test.csv")  # test.csv keeps its header: no warning
    out = build(tmp_path, src)
    assert load(out, "train")["inputs"].tolist() == [tokens(q) for q, _, _ in puzzles[1:3]]
    err = capsys.readouterr().err
    assert "warning: " in err and "train.csv: line 1 reads like a data row" in err and "test.csv" not in err


def test_non_utf8_byte_names_its_line_and_field(tmp_path, puzzles, capsys):
    a = puzzles[1][1]
    src = write_hub_csvs(tmp_path / "src", puzzles[:2], puzzles[2:3])
    rows = (src / "train.csv").read_bytes().split(b"\n")
    rows[2] = rows[2].replace(a[:5].encode(), a[:4].encode() + b"\xff", 1)  # line 3, answer position 4
    (src / "train.csv").write_bytes(b"\n".join(rows))
    assert run_cli(main, SudokuBuildConfig, ["--source-repo", str(src), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {src / 'train.csv'}: line 3: field 'a': non-ASCII character at position 4\n"


def test_defaults_match_reference():
    cfg = SudokuBuildConfig()
    assert (cfg.source_repo, cfg.output_dir, cfg.subsample_size, cfg.min_difficulty, cfg.num_aug) == (
        "sapientinc/sudoku-extreme",
        "data/sudoku-extreme-full",
        None,
        None,
        0,
    )


@pytest.mark.parametrize(
    "train_text,flags,message",
    [
        ("source,q,a,rating\nx,{q},{a}\n", [], r"train\.csv: line 2: expected 4 fields"),
        (
            "source,q,a,rating\nx,{q},{a},1\nx,{q}1,{a},1\n",
            [],
            r"train\.csv: line 3: field 'q' has 82 characters, expected 81",
        ),
        ("source,q,a,rating\nx,{bad_q},{a},1\n", [], r"train\.csv: line 2: field 'q': invalid character at position 5"),
        ("source,q,a,rating\nx,{q},{q},1\n", [], r"train\.csv: line 2: field 'a': invalid character"),
        (
            "source,q,a,rating\nx,{q},{a},hard\n",
            ["--min-difficulty", "1"],
            r"train\.csv: line 2: field 'rating': not a number",
        ),
        ("source,q,a,rating\nx,{wrong_q},{a},1\n", [], r"train\.csv: line 2: field 'a' contradicts a given"),
        ("q,a\n", [], r"train\.csv: no data rows after the header line"),
        ("", [], r"train\.csv: empty file"),
        ("source,q,a,rating\nx,{q},{a},1\n", ["--min-difficulty", "2"], r"train\.csv: no row has rating >= 2"),
        ("source,q,a,rating\nx,{q}\xe9,{a},1\n", [], r"train\.csv: line 2: field 'q' has 82 characters"),
        ("source,q,a,rating\nx,{q},{a}\xe9,1\n", [], r"train\.csv: line 2: field 'a' has 82 characters"),
        (
            "source,q,a,rating\nx,{nonascii_q},{a},1\n",
            [],
            r"train\.csv: line 2: field 'q': non-ASCII character at position 3",
        ),
        ("source,q,a,rating\nx,{q},{a},1\n\nx,{q},{a}\n", [], r"train\.csv: line 4: expected 4 fields"),
        ('source,q,a,rating\nx,"{q}\n",{a},1\n', [], r"train\.csv: line 2: field 'q' has 82 characters"),
    ],
)
def test_bad_csv_is_one_line_error(tmp_path, puzzles, capsys, train_text, flags, message):
    q, a, _ = puzzles[0]
    bad_q = q[:5] + "x" + q[6:]
    first_given = next(i for i, ch in enumerate(q) if ch != ".")
    wrong_q = q[:first_given] + str(int(a[first_given]) % 9 + 1) + q[first_given + 1 :]
    nonascii_q = q[:3] + "\u00e9" + q[4:]
    src = write_csvs(tmp_path / "src", [], [puzzles[1]])
    text = train_text.format(q=q, a=a, bad_q=bad_q, wrong_q=wrong_q, nonascii_q=nonascii_q)
    (src / "train.csv").write_text(text, encoding="utf-8")
    code = run_cli(main, SudokuBuildConfig, ["--source-repo", str(src), "--output-dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_missing_source_file(tmp_path, puzzles, capsys):
    src = write_csvs(tmp_path / "src", puzzles[:1], [])
    (src / "test.csv").unlink()
    assert run_cli(main, SudokuBuildConfig, ["--source-repo", str(src), "--output-dir", str(tmp_path / "o")]) == 2
    assert "test.csv: not found" in capsys.readouterr().err


def test_script_entry_points(tmp_path, puzzles):
    src = write_csvs(tmp_path / "src", puzzles[:2], puzzles[2:3])
    for cmd in (
        [sys.executable, "dataset/build_sudoku_dataset.py"],
        [sys.executable, "-m", "dataset.build_sudoku_dataset"],
    ):
        out = tmp_path / cmd[-1].replace("/", "_")
        res = subprocess.run(
            [*cmd, "--source-repo", str(src), "--output-dir", str(out)], cwd=REPO, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        assert (out / "train" / "dataset.json").is_file()
    res = subprocess.run(
        [
            sys.executable,
            "dataset/build_sudoku_dataset.py",
            "--source-repo",
            str(tmp_path / "nope"),
            "--output-dir",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
