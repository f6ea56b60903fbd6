"""ARC builder: canvas encoding, augmentations as properties, split routing, determinism, bad input.

Uses a handful of real puzzles (fixture `raw_data_dir`) copied into tmp_path in the ARC-AGI-1,
ConceptARC and ARC-AGI-2 folder layouts.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from dataset.build_arc_dataset import ArcBuildConfig, grid_to_canvas, main
from dataset.cli import parse_config, run_cli
from dataset.common import dihedral_transform

FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")


def naive_canvas(grid, r0, c0):
    """Expected 30x30 canvas by the rule: colours+2 in the grid, EOS (1) directly under the grid's
    columns and directly right of its rows where inside the canvas, PAD (0) elsewhere."""
    h, w = len(grid), len(grid[0])
    out = np.zeros((30, 30), dtype=int)
    for r in range(30):
        for c in range(30):
            if r0 <= r < r0 + h and c0 <= c < c0 + w:
                out[r, c] = grid[r - r0][c - c0] + 2
            elif r == r0 + h and c0 <= c < c0 + w:
                out[r, c] = 1
            elif c == c0 + w and r0 <= r < r0 + h:
                out[r, c] = 1
    return out


def decode(seq):
    """(grid, (row, col)) from a canvas, asserting the canvas is exactly the rule's encoding."""
    canvas = np.asarray(seq, dtype=int).reshape(30, 30)
    rows, cols = np.nonzero(canvas >= 2)
    r0, c0 = rows.min(), cols.min()
    grid = canvas[r0 : rows.max() + 1, c0 : cols.max() + 1] - 2
    assert (grid >= 0).all()
    assert np.array_equal(canvas, naive_canvas(grid.tolist(), r0, c0))
    return grid, (int(r0), int(c0))


@pytest.mark.parametrize(
    "shape,offset",
    [
        ((3, 4), (2, 5)),
        ((30, 30), (0, 0)),
        ((30, 5), (0, 25)),
        ((5, 30), (25, 0)),
        ((1, 1), (29, 29)),
        ((2, 2), (28, 0)),
    ],
)
def test_canvas_matches_rule(shape, offset):
    grid = np.random.default_rng(0).integers(0, 10, size=shape).astype(np.uint8)
    canvas = grid_to_canvas(grid, *offset)
    assert canvas.dtype == np.uint8
    assert np.array_equal(canvas, naive_canvas(grid.tolist(), *offset))


def copy_layouts(raw, root, reverse=False):
    """Small copies of the three public layouts; `reverse` creates files in the opposite order."""
    picks = {
        "ARC-AGI/data/training": 2,
        "ARC-AGI/data/evaluation": 2,
        "ConceptARC/corpus/Copy": 2,
        "ConceptARC/corpus/Center": 1,
        "ARC-AGI-2/data/training": 1,
        "ARC-AGI-2/data/evaluation": 2,
    }
    items = list(picks.items())
    for sub, n in reversed(items) if reverse else items:
        files = sorted((raw / sub).glob("*.json"))[:n]
        (root / sub).mkdir(parents=True, exist_ok=True)
        for f in reversed(files) if reverse else files:
            shutil.copy(f, root / sub / f.name)
    return root


def build(out, dirs, *flags):
    assert run_cli(main, ArcBuildConfig, ["--dataset-dirs", *map(str, dirs), "--output-dir", str(out), *flags]) == 0
    return out


def load(out, split):
    return {f: np.load(out / split / f"all__{f}.npy") for f in FIELDS}


@pytest.fixture(scope="module")
def layouts(raw_data_dir, tmp_path_factory):
    return copy_layouts(raw_data_dir, tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def built(layouts, tmp_path_factory):
    out = tmp_path_factory.mktemp("arc") / "arc-aug-3"
    return build(
        out, [layouts / "ARC-AGI/data", layouts / "ConceptARC/corpus", layouts / "ARC-AGI-2/data"], "--num-aug", "3"
    )


DIRS = ("ARC-AGI/data", "ConceptARC/corpus", "ARC-AGI-2/data")


def source_groups(layouts, split):
    """(name, pairs) of every puzzle with pairs in `split`, by the routing rule, in build order
    (dataset dirs as given, then sorted sub-folders and files). Names may repeat: ARC-AGI-2
    training contains ARC-AGI-1 evaluation puzzles."""
    result = []
    for d in DIRS:
        for f in sorted((layouts / d).glob("*/*.json")):
            raw = json.loads(f.read_text())
            test_split = "test" if f.parent.name == "evaluation" else "train"
            pairs = [(p["input"], p["output"]) for p in raw["train"]] if split == "train" else []
            pairs += [(p["input"], p["output"]) for p in raw["test"]] if test_split == split else []
            if pairs:
                result.append((f.stem, pairs))
    return result


def parse_name(name):
    if "_t" not in name:
        return name, 0, np.arange(10)
    base, rest = name.rsplit("_t", 1)
    tid, digits = rest.split("_")
    return base, int(tid), np.array([int(d) for d in digits])


def test_variants_are_dihedral_colour_transforms(built, layouts):
    names = json.loads((built / "identifiers.json").read_text())
    assert names[0] == "<blank>" and len(set(names)) == len(names)
    seen_names = {"train": set(), "test": set()}
    for split in ("train", "test"):
        arr = load(built, split)
        meta = json.loads((built / split / "dataset.json").read_text())
        assert (meta["seq_len"], meta["vocab_size"], meta["pad_id"], meta["ignore_label_id"]) == (900, 12, 0, 0)
        assert meta["num_puzzle_identifiers"] == len(names)
        assert meta["total_groups"] == arr["group_indices"].size - 1
        assert meta["mean_puzzle_examples"] == pytest.approx(arr["inputs"].shape[0] / arr["puzzle_identifiers"].size)
        assert arr["inputs"].dtype == np.uint8 and arr["puzzle_identifiers"].dtype == np.int32
        gi, pi = arr["group_indices"], arr["puzzle_indices"]
        sources = source_groups(layouts, split)
        assert gi.size - 1 == len(sources)
        for g, (source_name, expected) in enumerate(sources):
            group_names = [names[arr["puzzle_identifiers"][p]] for p in range(gi[g], gi[g + 1])]
            base = group_names[0]
            assert base == source_name
            assert "_t" not in base and all(n.startswith(base + "_t") for n in group_names[1:])
            assert len(group_names) == 4  # 3 augmentations found for these (non-symmetric) puzzles
            contents = set()
            for p, name in zip(range(gi[g], gi[g + 1]), group_names):
                _, tid, cmap = parse_name(name)
                assert cmap[0] == 0 and sorted(cmap) == list(range(10)) and 0 <= tid < 8
                assert pi[p + 1] - pi[p] == len(expected)
                offsets, content = [], []
                for e, (inp, out) in zip(range(pi[p], pi[p + 1]), expected):
                    gin, off_in = decode(arr["inputs"][e])
                    gout, off_out = decode(arr["labels"][e])
                    assert off_in == off_out  # one offset per pair
                    assert np.array_equal(gin, dihedral_transform(cmap[np.array(inp)], tid))
                    assert np.array_equal(gout, dihedral_transform(cmap[np.array(out)], tid))
                    offsets.append(off_in)
                    content.append(gin.tobytes() + bytes(gin.shape) + gout.tobytes() + bytes(gout.shape))
                if split == "test":
                    assert offsets == [(0, 0)] * len(offsets)  # no translation in the test split
                else:
                    assert (0, 0) in offsets  # one example per puzzle stays in place
                contents.add(frozenset(content))
                seen_names[split].add(name)
            assert len(contents) == len(group_names)  # no duplicate variants in a group
    # ARC-AGI evaluation puzzles: demonstrations in train, test pairs in test under the same names
    evaluation = {f.stem for f in layouts.glob("*/data/evaluation/*.json")}
    test_bases = {parse_name(n)[0] for n in seen_names["test"]}
    assert test_bases == evaluation
    assert seen_names["test"] <= seen_names["train"]
    train_only = {f.stem for f in layouts.rglob("*.json")} - evaluation
    assert train_only <= {parse_name(n)[0] for n in seen_names["train"]}


def test_translation_happens_in_train(built):
    arr = load(built, "train")
    offsets = [decode(x)[1] for x in arr["inputs"][:200]]
    assert any(o != (0, 0) for o in offsets)


def test_deterministic_and_independent_of_listing_order_and_workers(layouts, raw_data_dir, tmp_path, monkeypatch):
    dirs = lambda root: [root / "ARC-AGI/data", root / "ConceptARC/corpus"]  # noqa: E731
    a = build(tmp_path / "a", dirs(layouts), "--num-aug", "2")
    other = copy_layouts(raw_data_dir, tmp_path / "raw2", reverse=True)
    orig_iterdir, orig_glob = pathlib.Path.iterdir, pathlib.Path.glob
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(orig_iterdir(self), reverse=True)))
    monkeypatch.setattr(pathlib.Path, "glob", lambda self, pat: iter(sorted(orig_glob(self, pat), reverse=True)))
    b = build(tmp_path / "b", dirs(other), "--num-aug", "2")
    monkeypatch.undo()
    c = build(tmp_path / "c", dirs(layouts), "--num-aug", "2", "--seed", "7")
    d = build(tmp_path / "d", dirs(layouts), "--num-aug", "2", "--num-workers", "2")
    for split in ("train", "test"):
        for f in FIELDS:
            assert np.array_equal(load(a, split)[f], load(b, split)[f]), (split, f)
            assert np.array_equal(load(a, split)[f], load(d, split)[f]), (split, f)
    assert (a / "identifiers.json").read_text() == (b / "identifiers.json").read_text()
    assert not np.array_equal(load(a, "train")["inputs"], load(c, "train")["inputs"])


def write_puzzle(folder, name, grids):
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [{"input": g, "output": g} for g in grids]
    (folder / f"{name}.json").write_text(json.dumps({"train": pairs[:-1], "test": pairs[-1:]}))


def test_duplicates_rejected_and_tries_bounded(tmp_path):
    root = tmp_path / "raw"
    write_puzzle(root / "training", "black", [[[0, 0], [0, 0]]] * 2)  # invariant under every variant
    write_puzzle(root / "training", "ones", [[[1, 1], [1, 1]]] * 2)  # only the image of colour 1 matters
    out = build(tmp_path / "out", [root], "--num-aug", "20")
    arr = load(out, "train")
    names = json.loads((out / "identifiers.json").read_text())
    sizes = np.diff(arr["group_indices"]).tolist()
    assert sizes == [1, 9]  # "black": original only; "ones": original + 8 other colours for 1
    ones = [names[i] for i in arr["puzzle_identifiers"][1:]]
    assert sorted(parse_name(n)[2][1] for n in ones) == list(range(1, 10))


def test_dataset_dirs_replace_the_default():
    assert parse_config(ArcBuildConfig, []).dataset_dirs == [
        "dataset/raw-data/ARC-AGI/data",
        "dataset/raw-data/ConceptARC/corpus",
    ]
    assert parse_config(ArcBuildConfig, ["--dataset-dirs", "x"]).dataset_dirs == ["x"]
    cfg = parse_config(ArcBuildConfig, [])
    assert (cfg.output_dir, cfg.seed, cfg.num_aug) == ("data/arc-aug-1000", 42, 1000)


@pytest.mark.parametrize(
    "content,message",
    [
        (
            {"train": [{"input": [[0] * 31], "output": [[0]]}], "test": []},
            "field 'train[0].input': grid 1x31 exceeds 30x30",
        ),
        (
            {"train": [{"input": [[0]], "output": [[0, 10]]}], "test": []},
            "field 'train[0].output': colour 10 at row 0, column 1 outside 0-9",
        ),
        (
            {"train": [], "test": [{"input": [[0, 1], [2]], "output": [[0]]}]},
            "field 'test[0].input': rows of unequal or zero length",
        ),
        ({"train": [{"input": [[0]]}], "test": []}, "field 'train[0]': expected 'input' and 'output'"),
        ({"test": []}, "expected an object with lists 'train' and 'test'"),
        ("{broken", "malformed JSON"),
    ],
)
def test_bad_puzzle_file_is_one_line_error(tmp_path, capsys, content, message):
    folder = tmp_path / "raw" / "training"
    folder.mkdir(parents=True)
    (folder / "bad.json").write_text(content if isinstance(content, str) else json.dumps(content))
    assert (
        run_cli(main, ArcBuildConfig, ["--dataset-dirs", str(tmp_path / "raw"), "--output-dir", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "bad.json" in err and message in err, err


def test_missing_dataset_dir(tmp_path, capsys):
    assert (
        run_cli(main, ArcBuildConfig, ["--dataset-dirs", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")])
        == 2
    )
    assert "nope: dataset folder not found" in capsys.readouterr().err
    (tmp_path / "empty" / "training").mkdir(parents=True)
    assert (
        run_cli(main, ArcBuildConfig, ["--dataset-dirs", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")])
        == 2
    )
    assert "no sub-folder with puzzle *.json files" in capsys.readouterr().err


def test_puzzles_contributing_nothing_are_warned_about(tmp_path, capsys):
    root = tmp_path / "raw"
    write_puzzle(root / "training", "fine", [[[1]], [[2]]])
    (root / "evaluation").mkdir()
    pair = {"input": [[1]], "output": [[2]]}
    (root / "evaluation" / "no_tests.json").write_text(json.dumps({"train": [pair], "test": []}))
    (root / "training" / "no_pairs.json").write_text(json.dumps({"train": [], "test": []}))
    other = {"input": [[3]], "output": [[4]]}  # not a pair of another task: no leakage warning
    (root / "evaluation" / "scored.json").write_text(json.dumps({"train": [pair], "test": [other]}))
    out = build(tmp_path / "out", [root], "--num-aug", "0")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2
    assert "no_tests.json: evaluation puzzle has an empty 'test' list" in warnings[0]
    assert "no_pairs.json: puzzle has no pairs and contributes nothing" in warnings[1]
    names = json.loads((out / "identifiers.json").read_text())
    assert [names[i] for i in load(out, "test")["puzzle_identifiers"]] == ["scored"]


def test_leakage_warning_by_name_and_by_content(raw_data_dir, tmp_path, capsys):
    """ARC-AGI-2's training folder holds ARC-AGI-1 evaluation task 00576224 (demonstrations reordered)."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    (v1 / "evaluation").mkdir(parents=True)
    (v2 / "training").mkdir(parents=True)
    shutil.copy(raw_data_dir / "ARC-AGI/data/evaluation/00576224.json", v1 / "evaluation")
    shutil.copy(raw_data_dir / "ARC-AGI-2/data/training/00576224.json", v2 / "training")
    build(tmp_path / "a", [v1, v2], "--num-aug", "0")
    (v2 / "training" / "00576224.json").rename(v2 / "training" / "renamed.json")
    build(tmp_path / "b", [v1, v2], "--num-aug", "0")
    build(tmp_path / "c", [v1], "--num-aug", "0")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2  # a and b, not c
    for line in warnings:
        assert "1 of 1 test tasks also appear in the train split" in line and ": 00576224;" in line
