"""ARC builder in ARC Prize mode (TRM's flags and output), on the real kaggle-combined files.

- Golden files: sha256 of every output file of TRM's own builder (TinyRecursiveModels e7b6871,
  dataset/build_arc_dataset.py, numpy 2.4) on small subsets of the real files, written by
  `prize_files` below. To regenerate: write the same subset files into a folder, run
  `python -m dataset.build_arc_dataset --input-file-prefix <folder>/arc ...` (the flags in
  GOLDEN) from a checkout of TRM, and `sha256sum` the output files.
- `expected_build` derives the whole output independently from the rule (TRM's ARC Prize build), in the
  plainest form: TRM's order of random draws on one RandomState, scalar draws, a content-set
  duplicate test, canvases by np.pad. It pins every byte on the full real files.
"""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dataset.build_arc_dataset import ArcBuildConfig, main
from dataset.cli import run_cli
from dataset.common import dihedral_transform
from tests.arc_data import GOLDEN, GOLDEN_PICKS, prize_files
from tests.helpers import REPO

FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
SUBSETS = ("training", "evaluation", "concept", "training2", "evaluation2")


@pytest.fixture(scope="module")
def kaggle(raw_data_dir):
    folder = raw_data_dir / "kaggle-combined"
    if not (folder / "arc-agi_concept_challenges.json").is_file():
        pytest.skip(f"ARC Prize files not found in {folder}")
    return folder


def build(prefix, out, *flags):
    argv = ["--input-file-prefix", str(prefix), "--output-dir", str(out), *map(str, flags)]
    assert run_cli(main, ArcBuildConfig, argv) == 0
    return Path(out)


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_matches_trm_builder_golden_files(kaggle, tmp_path, case, capsys):
    flags, digests = GOLDEN[case]
    picks = GOLDEN_PICKS if case == "B" else {k: v for k, v in GOLDEN_PICKS.items() if k != "concept"}
    prefix = prize_files(kaggle, tmp_path / "src", picks, without_solutions=("concept",))
    out = build(prefix, tmp_path / "out", *flags)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(digests)
    for name, digest in digests.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    if case == "B":
        assert "arc_concept_solutions.json not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Independent derivation of the output from the rule
# ----------------------------------------------------------------------------------------------


def content(pairs, tid, mapping):
    """The multiset of transformed pairs, as a hashable value."""
    items = Counter()
    for inp, out in pairs:
        a, b = dihedral_transform(mapping[inp], tid), dihedral_transform(mapping[out], tid)
        items[(a.shape, a.tobytes(), b.shape, b.tobytes())] += 1
    return frozenset(items.items())


def padded_canvas(grid, r, c):
    canvas = np.pad(grid + 2, ((r, 30 - r - grid.shape[0]), (c, 30 - c - grid.shape[1]))).astype(np.uint8)
    if r + grid.shape[0] < 30:
        canvas[r + grid.shape[0], c : c + grid.shape[1]] = 1
    if c + grid.shape[1] < 30:
        canvas[r : r + grid.shape[0], c + grid.shape[1]] = 1
    return canvas.reshape(-1)


def expected_build(folder, subsets, test_sets, seed, num_aug, start=1):
    rs = np.random.RandomState(seed)
    groups, test_puzzles = [], {}
    for subset in subsets:
        puzzles = json.loads((folder / f"arc-agi_{subset}_challenges.json").read_text())
        solutions = json.loads((folder / f"arc-agi_{subset}_solutions.json").read_text())
        for pid, puzzle in puzzles.items():
            for pair, grid in zip(puzzle["test"], solutions[pid]):
                pair["output"] = grid
        items = list(puzzles.items())
        rs.shuffle(items)
        for pid, puzzle in items:
            split_of = {"train": "train", "test": "test" if subset in test_sets else "train"}
            pairs = {"train": [], "test": []}
            for kind, entries in puzzle.items():
                pairs[split_of[kind]] += [
                    (np.array(e["input"], np.uint8), np.array(e["output"], np.uint8)) for e in entries
                ]
            variants = [(0, np.arange(10, dtype=np.uint8))]
            seen = {content(pairs["train"] + pairs["test"], *variants[0])}
            for _ in range(5 * num_aug if num_aug else 0):
                tid = rs.randint(0, 8)
                mapping = np.concatenate([[0], rs.permutation(np.arange(1, 10, dtype=np.uint8))]).astype(np.uint8)
                c = content(pairs["train"] + pairs["test"], tid, mapping)
                if c not in seen:
                    seen.add(c)
                    variants.append((tid, mapping))
                if len(variants) >= num_aug + 1:
                    break
            groups.append((pid, pairs, variants))
            if subset in test_sets:
                test_puzzles[pid] = puzzle

    def name(pid, v, tid, mapping):
        return pid if v == 0 else f"{pid}|||t{tid}|||{''.join(str(x) for x in mapping)}"

    ids = {}
    for split in ("train", "test"):
        for pid, pairs, variants in groups:
            for v, (tid, mapping) in enumerate(variants):
                if pairs[split]:
                    ids.setdefault(name(pid, v, tid, mapping), start + len(ids))
    arrays = {}
    for split in ("train", "test"):
        a = {"inputs": [], "labels": [], "puzzle_identifiers": [], "puzzle_indices": [0], "group_indices": [0]}
        for pid, pairs, variants in groups:
            if not pairs[split]:
                continue
            for v, (tid, mapping) in enumerate(variants):
                kept = rs.randint(0, len(pairs[split]))
                for i, (inp, out) in enumerate(pairs[split]):
                    inp, out = dihedral_transform(mapping[inp], tid), dihedral_transform(mapping[out], tid)
                    r = c = 0
                    if split == "train" and i != kept:
                        r = rs.randint(0, 30 - max(inp.shape[0], out.shape[0]) + 1)
                        c = rs.randint(0, 30 - max(inp.shape[1], out.shape[1]) + 1)
                    a["inputs"].append(padded_canvas(inp, r, c))
                    a["labels"].append(padded_canvas(out, r, c))
                a["puzzle_indices"].append(len(a["inputs"]))
                a["puzzle_identifiers"].append(ids[name(pid, v, tid, mapping)])
            a["group_indices"].append(len(a["puzzle_identifiers"]))
        arrays[split] = {k: np.stack(v) if k in ("inputs", "labels") else np.array(v, np.int32) for k, v in a.items()}
    names = ["<blank>"] * (start + len(ids))
    for n, i in ids.items():
        names[i] = n
    return arrays, names, test_puzzles


def assert_build_equals_expected(out, expected):
    arrays, names, test_puzzles = expected
    assert json.loads((out / "identifiers.json").read_text()) == names
    assert json.loads((out / "test_puzzles.json").read_text()) == test_puzzles
    for split, fields in arrays.items():
        meta = json.loads((out / split / "dataset.json").read_text())
        assert list(meta) == [
            "pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len", "num_puzzle_identifiers",
            "total_groups", "mean_puzzle_examples", "total_puzzles", "sets",
        ]  # fmt: skip
        num_puzzles = len(fields["puzzle_identifiers"])
        assert meta == {
            "pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 12, "seq_len": 900,
            "num_puzzle_identifiers": len(names), "total_groups": len(fields["group_indices"]) - 1,
            "mean_puzzle_examples": len(fields["inputs"]) / num_puzzles, "total_puzzles": num_puzzles, "sets": ["all"],
        }  # fmt: skip
        for f in FIELDS:
            got = np.load(out / split / f"all__{f}.npy")
            assert got.dtype == fields[f].dtype and np.array_equal(got, fields[f]), (split, f)


def test_full_real_files_match_the_rule(kaggle, tmp_path):
    """ARC-AGI-1 + ConceptARC, every puzzle, 2 augmentations: every array and JSON file as the rule says."""
    args = (["training", "evaluation", "concept"], {"evaluation"}, 7, 2)
    out = build(kaggle / "arc-agi", tmp_path / "out", "--subsets", *args[0], "--test-set-name", "evaluation",
                "--seed", 7, "--num-aug", 2)  # fmt: skip
    assert_build_equals_expected(out, expected_build(kaggle, *args))


def test_small_subset_many_augmentations_match_the_rule(kaggle, tmp_path):
    """Puzzles with few colours or symmetries, where duplicates are rejected and augmentation runs short."""
    picks = {"training": ["007bbfb7", "00d62c1b", "a3df8b1e", "4522001f"], "evaluation": ["12997ef3", "00576224"]}
    src = tmp_path / "src"
    prize_files(kaggle, src, picks)
    for f in src.iterdir():  # expected_build reads the ARC Prize file names
        f.rename(src / f.name.replace("arc_", "arc-agi_"))
    out = build(src / "arc-agi", tmp_path / "out", "--subsets", "training", "evaluation", "--test-set-name",
                "evaluation", "--num-aug", 80)  # fmt: skip
    expected = expected_build(src, ["training", "evaluation"], {"evaluation"}, 42, 80)
    assert_build_equals_expected(out, expected)
    sizes = np.diff(np.load(out / "train" / "all__group_indices.npy"))
    assert sizes.min() < 81 and sizes.max() == 81  # some puzzle has fewer distinct variants than asked


def test_leakage_warning_arc_agi_2_training_with_arc_agi_1_evaluation(kaggle, tmp_path, capsys):
    build(kaggle / "arc-agi", tmp_path / "out", "--subsets", "training2", "evaluation", "--test-set-name",
          "evaluation", "--num-aug", 0)  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert "376 of 400 test tasks also appear in the train split" in warnings[0]
    # ARC-AGI-1 itself: evaluation task 070dd51e's test pair is a pair of training task 40853293
    build(kaggle / "arc-agi", tmp_path / "out1", "--subsets", "training", "evaluation", "--test-set-name",
          "evaluation", "--num-aug", 0)  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "1 of 400 test tasks" in warnings[0] and ": 070dd51e;" in warnings[0]


def test_leakage_warning_counts_tasks_by_name(tmp_path):
    """A task listed by two test subsets is one task, and its own demonstrations are no leak: only 'c', whose test
    pair is a training pair of 'a', leaks, out of 2 test tasks."""
    src = tmp_path / "src"
    write_subset(src, "training", {"a": {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]}},
                 {"a": [[[4]]]})  # fmt: skip
    b = {"train": [{"input": [[5]], "output": [[6]]}], "test": [{"input": [[7]]}]}
    c = {"train": [{"input": [[8]], "output": [[9]]}], "test": [{"input": [[1]]}]}
    write_subset(src, "evaluation", {"b": b, "c": c}, {"b": [[[8]]], "c": [[[2]]]})
    write_subset(src, "evaluation2", {"b": b}, {"b": [[[8]]]})
    result = run_builder("--input-file-prefix", src / "p", "--output-dir", tmp_path / "out", "--num-aug", "0",
                         "--subsets", "training", "evaluation", "evaluation2", "--test-set-name", "evaluation",
                         "--test-set-name2", "evaluation2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "1 of 2 test tasks also appear in the train split" in warnings[0]
    assert ": c;" in warnings[0]


def test_missing_solutions_fill_dummy_outputs(kaggle, tmp_path, capsys):
    prefix = prize_files(kaggle, tmp_path / "src", {"training": ["007bbfb7"], "evaluation": ["12997ef3"]},
                         without_solutions=("evaluation",))  # fmt: skip
    out = build(prefix, tmp_path / "out", "--subsets", "training", "evaluation", "--test-set-name", "evaluation",
                "--num-aug", 1)  # fmt: skip
    assert "arc_evaluation_solutions.json not found" in capsys.readouterr().err
    test_puzzles = json.loads((out / "test_puzzles.json").read_text())
    assert [p["output"] for p in test_puzzles["12997ef3"]["test"]] == [[[0]], [[0]]]
    labels = np.load(out / "test" / "all__labels.npy")
    assert np.array_equal(labels[0].reshape(30, 30)[:2, :2], [[2, 1], [1, 0]])  # colour 0 -> 2, then EOS


# ----------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 2, through the real command line
# ----------------------------------------------------------------------------------------------


def run_builder(*argv, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dataset.build_arc_dataset", *map(str, argv)],
        cwd=cwd, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def write_subset(folder, subset, challenges, solutions=None):
    folder.mkdir(parents=True, exist_ok=True)
    text = challenges if isinstance(challenges, str) else json.dumps(challenges)
    (folder / f"p_{subset}_challenges.json").write_text(text)
    if solutions is not None:
        (folder / f"p_{subset}_solutions.json").write_text(json.dumps(solutions))


GOOD = {"a": {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]}}


@pytest.mark.parametrize(
    "evaluation,solutions,flags,message",
    [
        ("{broken", None, (), "p_evaluation_challenges.json: malformed JSON"),
        ({}, None, (), "p_evaluation_challenges.json: no puzzles"),
        (
            {"b": {"train": [{"input": [[0] * 31], "output": [[0]]}], "test": [{"input": [[0]]}]}},
            {"b": [[[1]]]},
            (),
            "p_evaluation_challenges.json: puzzle 'b': field 'train[0].input': grid 1x31 exceeds 30x30",
        ),
        (
            {"b": {"train": [{"input": [[0]], "output": [[0]]}], "test": [{"input": [[0]]}]}},
            {"b": [[[12]]]},
            (),
            "p_evaluation_solutions.json: puzzle 'b': field 'test[0].output': colour 12 at row 0, column 0 outside 0-9",
        ),
        (
            {"b": {"train": [{"input": [[0]], "output": [[0]]}], "test": []}},
            {"b": []},
            (),
            "puzzle 'b': empty 'test' list in test subset 'evaluation'",
        ),
        (
            {"b": {"train": [], "test": [{"input": [[0]]}]}},
            {"b": [[[0]]]},
            (),
            "puzzle 'b': no demonstration pairs in test subset 'evaluation'",
        ),
        (
            {"b": {"train": [], "test": [{"input": [[0]]}]}},
            {},
            (),
            "p_evaluation_solutions.json: no list of output grids for puzzle 'b'",
        ),
        (
            {"b": {"train": [{"input": [[0]], "output": [[0]]}], "test": [{"input": [[0]]}]}},
            {"b": [[[0]], [[1]]]},
            (),
            "p_evaluation_solutions.json: puzzle 'b' has 2 solutions for 1 test inputs",
        ),
        ({"b": {"train": [], "tests": []}}, None, (), "puzzle 'b': expected an object with exactly the lists"),
        (GOOD, None, ("--test-set-name", "eval"), "--test-set-name: 'eval' is not among --subsets"),
        (GOOD, None, ("--subsets", "training", "evaluation", "concept"), "p_concept_challenges.json: challenges file"),
        (GOOD, None, ("--subsets", "training", "training", "evaluation"), "--subsets: training listed more than once"),
        (GOOD, None, ("--dataset-dirs", "x"), "--dataset-dirs and --num-workers belong to folder mode"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, evaluation, solutions, flags, message):
    src = tmp_path / "src"
    write_subset(src, "training", GOOD, {"a": [[[4]]]})
    write_subset(src, "evaluation", evaluation, solutions)
    argv = ["--input-file-prefix", src / "p", "--output-dir", tmp_path / "out", "--num-aug", "1"]
    argv += ["--subsets", "training", "evaluation", "--test-set-name", "evaluation"]
    result = run_builder(*argv, *flags)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], result.stderr


def test_flags_of_the_other_mode_are_errors(tmp_path):
    result = run_builder("--subsets", "training", "--test-set-name", "training", "--output-dir", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --subsets, --test-set-name: only with --input-file-prefix (ARC Prize mode)"
    result = run_builder("--input-file-prefix", tmp_path / "p", "--output-dir", tmp_path / "o")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --subsets: required")
