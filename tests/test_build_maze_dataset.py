"""Maze builder: token mapping, dihedral augmentation (train only), subsample, bad input."""

import json
import os

import numpy as np
import pytest

from dataset.build_maze_dataset import MazeBuildConfig, main
from dataset.cli import run_cli
from dataset.generate_maze import make_maze
from dataset.generation import puzzle_rng

CHARSET = "# SGo"


@pytest.fixture(scope="module")
def mazes():
    return [make_maze(puzzle_rng(2, "train", i), size=8, min_path_length=10, loops=2) for i in range(5)]


def write_csvs(folder, train, test):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("test.csv", test)):
        (folder / name).write_text("source,q,a,rating\n" + "".join(f'x,"{q}","{a}",{r}\n' for q, a, r in rows))
    return folder


def write_hub_csvs(folder, train, test, header="source,question,answer,rating", bom=False, crlf=False):
    """Source files in the layout of sapientinc/maze-30x30-hard-1k: header line, then unquoted
    `source,question,answer,rating` rows of N*N-character grids over "# SGo"."""
    folder.mkdir(parents=True, exist_ok=True)
    end = "\r\n" if crlf else "\n"
    for name, rows in (("train.csv", train), ("test.csv", test)):
        text = end.join([header] + [f"maze-{i},{q},{a},{r}" for i, (q, a, r) in enumerate(rows)]) + end
        (folder / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return folder


def output_files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def build(tmp_path, src, *flags):
    out = tmp_path / "out"
    assert run_cli(main, MazeBuildConfig, ["--source-repo", str(src), "--output-dir", str(out), *flags]) == 0
    return out


def arrays(out, split):
    return {
        f: np.load(out / split / f"all__{f}.npy")
        for f in ("inputs", "labels", "puzzle_indices", "group_indices", "puzzle_identifiers")
    }


def encode(s):
    return [CHARSET.index(ch) + 1 for ch in s]


def test_tokens_and_metadata(tmp_path, mazes):
    out = build(tmp_path, write_csvs(tmp_path / "src", mazes[:3], mazes[3:]))
    train = arrays(out, "train")
    assert train["inputs"].tolist() == [encode(q) for q, _, _ in mazes[:3]]
    assert train["labels"].tolist() == [encode(a) for _, a, _ in mazes[:3]]
    assert train["inputs"].dtype == np.uint8 and train["group_indices"].dtype == np.int32
    meta = json.loads((out / "test" / "dataset.json").read_text())
    assert meta["vocab_size"] == 6 and meta["seq_len"] == 64 and meta["total_groups"] == 2
    assert meta["pad_id"] == 0 and meta["ignore_label_id"] == 0 and meta["sets"] == ["all"]
    assert json.loads((out / "identifiers.json").read_text()) == ["<blank>"]


def test_aug_adds_eight_dihedral_variants_to_train_only(tmp_path, mazes):
    out = build(tmp_path, write_csvs(tmp_path / "src", mazes[:2], mazes[2:4]), "--aug")
    train, test = arrays(out, "train"), arrays(out, "test")
    assert train["group_indices"].tolist() == [0, 8, 16] and train["puzzle_indices"].tolist() == list(range(17))
    assert test["inputs"].shape == (2, 64)
    explicit = [
        lambda g: g,
        lambda g: np.rot90(g),
        lambda g: np.rot90(g, 2),
        lambda g: np.rot90(g, 3),
        lambda g: g[:, ::-1],
        lambda g: g[::-1, :],
        lambda g: g.T,
        lambda g: np.rot90(g)[:, ::-1],
    ]
    for m, (q, a, _) in enumerate(mazes[:2]):
        grid_q, grid_a = np.array(encode(q)).reshape(8, 8), np.array(encode(a)).reshape(8, 8)
        for t, f in enumerate(explicit):
            assert np.array_equal(train["inputs"][m * 8 + t].reshape(8, 8), f(grid_q))
            assert np.array_equal(train["labels"][m * 8 + t].reshape(8, 8), f(grid_a))


def test_subsample_is_seeded_subset(tmp_path, mazes):
    src = write_csvs(tmp_path / "src", mazes, mazes[:1])
    a = arrays(build(tmp_path / "a", src, "--subsample-size", "2", "--seed", "1"), "train")["inputs"]
    b = arrays(build(tmp_path / "b", src, "--subsample-size", "2", "--seed", "1"), "train")["inputs"]
    assert np.array_equal(a, b) and a.shape == (2, 64)
    assert {tuple(r) for r in a.tolist()} <= {tuple(encode(q)) for q, _, _ in mazes}


def test_defaults_match_reference():
    cfg = MazeBuildConfig()
    assert (cfg.source_repo, cfg.output_dir, cfg.subsample_size, cfg.aug) == (
        "sapientinc/maze-30x30-hard-1k",
        "data/maze-30x30-hard-1k",
        None,
        False,
    )


def test_bad_input(tmp_path, mazes, capsys):
    q, a, r = mazes[0]
    src = write_csvs(tmp_path / "src", [(q[:-1] + "x", a, r)], mazes[1:2])
    assert run_cli(main, MazeBuildConfig, ["--source-repo", str(src), "--output-dir", str(tmp_path / "o")]) == 2
    assert "train.csv: line 2: field 'q': invalid character at position 63" in capsys.readouterr().err
    src = write_csvs(tmp_path / "src2", [(q[:-1], a[:-1], r)], mazes[1:2])
    assert run_cli(main, MazeBuildConfig, ["--source-repo", str(src), "--output-dir", str(tmp_path / "o")]) == 2
    assert "field 'q' has 63 characters, not a square grid" in capsys.readouterr().err


def test_output_bytes_do_not_depend_on_header_bom_or_line_ends(tmp_path, mazes):
    outputs = []
    for name, layout in (
        ("short", dict(header="source,q,a,rating")),
        ("hub", dict()),
        ("hub_bom_crlf", dict(bom=True, crlf=True)),
    ):
        src = write_hub_csvs(tmp_path / name, mazes[:3], mazes[3:], **layout)
        outputs.append(output_files(build(tmp_path / f"out_{name}", src, "--aug")))
    assert len(outputs[0]) == 13 and outputs[1] == outputs[0] and outputs[2] == outputs[0]
    train = np.load(tmp_path / "out_hub_bom_crlf" / "out" / "train" / "all__inputs.npy")
    assert train[::8].tolist() == [encode(q) for q, _, _ in mazes[:3]]


def test_non_square_first_row_is_named_by_its_own_line(tmp_path, mazes, capsys):
    q, a, r = mazes[0]
    src = write_hub_csvs(tmp_path / "src", [(q[:-1], a[:-1], r), mazes[1]], mazes[2:3])
    assert run_cli(main, MazeBuildConfig, ["--source-repo", str(src), "--output-dir", str(tmp_path / "o")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {src / 'train.csv'}: line 2: field 'q' has 63 characters, not a square grid\n"
    )


def test_test_grid_of_another_size_names_its_line(tmp_path, mazes, capsys):
    big = make_maze(puzzle_rng(2, "test", 0), size=9, min_path_length=10, loops=2)
    src = write_hub_csvs(tmp_path / "src", mazes[:2], [mazes[2], big])
    assert run_cli(main, MazeBuildConfig, ["--source-repo", str(src), "--output-dir", str(tmp_path / "o")]) == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == f"error: {src / 'test.csv'}: line 3: field 'q' has 81 characters, expected 64"
    )


def test_failure_in_test_csv_leaves_no_partial_dataset(tmp_path, mazes, capsys):
    bad_test = [(mazes[2][0][:-1] + "x", mazes[2][1], 0)]
    src = write_hub_csvs(tmp_path / "src", mazes[:2], bad_test)
    out = tmp_path / "data" / "maze"
    assert run_cli(main, MazeBuildConfig, ["--source-repo", str(src), "--output-dir", str(out)]) == 2
    assert "test.csv: line 2: field 'q': invalid character at position 63" in capsys.readouterr().err
    assert not out.exists() and os.listdir(out.parent) == []  # no train/ written, no staging folder left
    # Over an existing dataset: a failed build leaves it byte-identical, a successful one replaces it.
    good = write_hub_csvs(tmp_path / "good", mazes[:2], mazes[2:3])
    assert run_cli(main, MazeBuildConfig, ["--source-repo", str(good), "--output-dir", str(out)]) == 0
    before = output_files(out)
    assert run_cli(main, MazeBuildConfig, ["--source-repo", str(src), "--output-dir", str(out), "--aug"]) == 2
    assert output_files(out) == before and os.listdir(out.parent) == ["maze"]
    assert run_cli(main, MazeBuildConfig, ["--source-repo", str(good), "--output-dir", str(out), "--aug"]) == 0
    assert np.load(out / "train" / "all__inputs.npy").shape == (16, 64) and os.listdir(out.parent) == ["maze"]
