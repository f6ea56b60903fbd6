"""Table of bad inputs, each run through the real command line (pretrain.py, evaluate.py, the builders).

Every row must end with exit status 2 and exactly one `error:` line, the last line of stderr, naming
what is wrong and where (file, field, line or config key), and no traceback. Rows: malformed or ill-typed
`dataset.json`, mismatched arrays, token ids outside the vocabulary, wrong dtypes, empty splits, bad ARC
JSON, bad CSV rows, unknown or ill-typed overrides and flags, and checkpoints of another architecture
(evaluate.py and resume). The subprocesses of all rows run a few at a time in one module fixture.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

import pretrain
from tests.test_pretrain_helpers import REPO, TINY_ARCH, make_tiny_dataset, tiny_config

pytestmark = pytest.mark.slow

PRETRAIN_BASE = [
    *TINY_ARCH,
    "project_name=test",
    "run_name=bad",
    "global_batch_size=4",
    "epochs=4",
    "eval_interval=2",
    "use_wandb=false",
    "device=cpu",
]
GOOD_CSV_ROW = "src," + "." * 81 + "," + "123456789" * 9 + ",0"  # an all-blank puzzle with some answer


@dataclass
class World:
    good_data: Path  # never modified; rows copy it first
    run_dir: Path  # a finished tiny run: step_3, train_state_step_000003.pt, all_config.yaml


@dataclass
class Case:
    id: str
    make: Callable[[Path, World], list[str]]  # builds the bad input in its own folder, returns the command
    expect: tuple[str, ...]  # substrings of the error line: what is wrong and where


# ------------------------------------------------------------------ commands


def pretrain_cmd(data, root, *extra):
    return [str(REPO / "pretrain.py"), *PRETRAIN_BASE, f"data_path={data}", f"checkpoint_path={root / 'ckpt'}", *extra]


def evaluate_cmd(checkpoint, *extra):
    return [str(REPO / "evaluate.py"), f"checkpoint={checkpoint}", "device=cpu", *extra]


def copy_data(root, world):
    return Path(shutil.copytree(world.good_data, root / "data"))


def with_data(edit: Callable[[Path], None], *extra: str):
    """A pretrain row on a copy of the good dataset changed by `edit(data)`."""

    def make(root, world):
        data = copy_data(root, world)
        edit(data)
        return pretrain_cmd(data, root, *extra)

    return make


def edit_array(split, field, change):
    def edit(data):
        path = data / split / f"all__{field}.npy"
        np.save(path, change(np.load(path)))

    return edit


def edit_json(split, change):
    def edit(data):
        path = data / split / "dataset.json"
        path.write_text(change(path.read_text()))

    return edit


def set_token(value, row=3, col=2):
    def change(a):
        a = a.copy()
        a[row, col] = value
        return a

    return change


def empty_split(split):
    def edit(data):
        for field, value in {
            "inputs": np.zeros((0, 8), np.uint8),
            "labels": np.zeros((0, 8), np.uint8),
            "puzzle_identifiers": np.zeros(0, np.int32),
            "puzzle_indices": np.zeros(1, np.int32),
            "group_indices": np.zeros(1, np.int32),
        }.items():
            np.save(data / split / f"all__{field}.npy", value)

    return edit


def with_overrides(*extra):
    return lambda root, world: pretrain_cmd(world.good_data, root, *extra)


def resume_other_arch(root, world):
    state = world.run_dir / "train_state_step_000003.pt"
    return pretrain_cmd(world.good_data, root, f"resume={state}", "arch.hidden_size=64")


def resume_corrupt(root, world):
    (root / "ckpt").mkdir()
    (root / "ckpt" / "train_state_step_000009.pt").write_bytes(b"\x80\x02 not a zip archive")
    return pretrain_cmd(world.good_data, root, "resume=auto")


def eval_copy(change_config: Callable[[dict], None] | None = None, weights: bytes | None = None):
    """evaluate.py on a copy of the finished run, with its all_config.yaml or weights file changed."""

    def make(root, world):
        run = root / "run"
        run.mkdir()
        shutil.copy(world.run_dir / "step_3", run / "step_3")
        config = yaml.safe_load((world.run_dir / "all_config.yaml").read_text())
        if change_config is not None:
            change_config(config)
        (run / "all_config.yaml").write_text(yaml.safe_dump(config))
        if weights is not None:
            (run / "step_3").write_bytes(weights)
        return evaluate_cmd(run / "step_3")

    return make


def arch_change(key, value):
    def change(config):
        config["arch"][key] = value

    return change


def eval_bad_yaml(root, world):
    run = root / "run"
    run.mkdir()
    shutil.copy(world.run_dir / "step_3", run / "step_3")
    (run / "all_config.yaml").write_text("arch: [unclosed\n")
    return evaluate_cmd(run / "step_3")


def arc(puzzle_text: str):
    def make(root, world):
        sub = root / "arc" / "training"
        sub.mkdir(parents=True)
        good = {"train": [{"input": [[1, 2]], "output": [[2, 1]]}], "test": [{"input": [[3]], "output": [[3]]}]}
        (sub / "a_good.json").write_text(json.dumps(good))
        (sub / "p.json").write_text(puzzle_text)
        return [str(REPO / "dataset/build_arc_dataset.py"), "--dataset-dirs", str(root / "arc"), "--output-dir",
                str(root / "out"), "--num-aug", "2"]  # fmt: skip

    return make


def csv_builder(builder, train_lines, *flags, test_lines=(GOOD_CSV_ROW,)):
    def make(root, world):
        src = root / "src"
        src.mkdir()
        (src / "train.csv").write_text("\n".join(train_lines) + "\n")
        (src / "test.csv").write_text("\n".join(["source,q,a,rating", *test_lines]) + "\n")
        return [str(REPO / f"dataset/{builder}"), "--source-repo", str(src), "--output-dir", str(root / "out"), *flags]

    return make


HEADER = "source,q,a,rating"

CASES = [
    # dataset.json
    Case("dataset_json_malformed", with_data(edit_json("train", lambda t: t[:-5])), ("train/dataset.json", "malformed JSON")),
    Case("dataset_json_ill_typed", with_data(edit_json("train", lambda t: t.replace('"vocab_size": 6', '"vocab_size": "six"'))),
         ("train/dataset.json", "field 'vocab_size'")),
    # arrays
    Case("labels_fewer_rows", with_data(edit_array("train", "labels", lambda a: a[:-1])),
         ("train/all__labels.npy", "17 rows but all__inputs.npy has 18")),
    Case("group_offsets_short", with_data(edit_array("train", "group_indices", lambda a: a[:-1])),
         ("train/all__group_indices.npy", "last offset 15 != number of puzzles 18")),
    # Token ids are checked in every batch read; rows 3-5 are all of group 1's puzzles, so epoch 0 reads one.
    Case("token_id_too_large_train_inputs", with_data(edit_array("train", "inputs", set_token(6, row=slice(3, 6)))),
         ("train/all__inputs.npy: row ", ", position 2: token id 6 outside [0, vocab_size=6)")),
    Case("token_id_too_large_test_labels", with_data(edit_array("test", "labels", set_token(9, row=1, col=5))),
         ("test/all__labels.npy", "row 1, position 5: token id 9 outside [0, vocab_size=6)")),
    Case("float_inputs", with_data(edit_array("train", "inputs", lambda a: a.astype(np.float32))),
         ("train/all__inputs.npy", "dtype float32 is not an integer type")),
    Case("float_puzzle_indices", with_data(edit_array("test", "puzzle_indices", lambda a: a.astype(np.float64))),
         ("test/all__puzzle_indices.npy", "expected a 1-D integer array")),
    Case("empty_train_split", with_data(empty_split("train")), ("/train:", "the train split has no examples")),
    Case("empty_test_split", with_data(empty_split("test")), ("/test:", "the test split has no examples")),
    Case("missing_data_path", lambda root, world: pretrain_cmd(root / "nowhere", root), ("nowhere/train", "split folder not found")),
    # overrides
    Case("unknown_override", with_overrides("learning_rate=0.1"), ("'learning_rate'",)),
    Case("ill_typed_override", with_overrides("global_batch_size=many"), ("config key 'global_batch_size'", "'many'")),
    Case("ill_typed_arch_override", with_overrides("arch.hidden_size=wide"), ("hidden_size", "valid integer")),
    Case("bad_value_override", with_overrides("eval_interval=3"), ("config key 'eval_interval'", "divisible")),
    Case("bad_choice_override", with_overrides("nonfinite=ignore"), ("config key 'nonfinite'", "'ignore'")),
    Case("misspelled_arch_key", with_overrides("+arch.L_cylces=3"),
         ("HierarchicalReasoningModel_ACTV1 config: unknown key 'arch.L_cylces'",)),
    Case("model_rule_broken", with_overrides("arch.num_heads=3"),
         ("error: HierarchicalReasoningModel_ACTV1 config: hidden_size (32) must be divisible by num_heads (3)",)),
    Case("override_parse_error", with_overrides("lr==1"), ("override 'lr==1'", "extraneous input '='")),
    Case("override_bad_interpolation", with_overrides("lr=${nope}"), ("Interpolation key 'nope'", "(key 'lr')")),
    # 6 groups x 2 epochs per iteration = 12 examples: a batch of 16 is never filled, no step would run.
    Case("batch_larger_than_iteration", with_overrides("global_batch_size=16"),
         ("config key 'global_batch_size': 16", "eval_interval=2 epochs x 6 groups x 1 examples = 12", "no step")),
    # checkpoints: resume
    Case("resume_other_architecture", resume_other_arch,
         ("train_state_step_000003.pt", "model.inner", "has shape", "[64]")),
    Case("resume_corrupt_state", resume_corrupt, ("train_state_step_000009.pt", "not a readable train state")),
    Case("resume_missing_state", with_overrides("resume=/no/such/state.pt"), ("config key 'resume'", "/no/such/state.pt")),
    # checkpoints: evaluate.py
    Case("eval_other_width", eval_copy(arch_change("hidden_size", 64)), ("run/step_3", "has shape", "[64]")),
    Case("eval_other_depth", eval_copy(arch_change("H_layers", 2)), ("run/step_3", "H_level.layers.1", "missing")),
    Case("eval_not_a_checkpoint", eval_copy(weights=b"hello"), ("run/step_3", "not a readable torch checkpoint")),
    Case("eval_bad_all_config", eval_bad_yaml, ("run/all_config.yaml", "invalid YAML")),
    Case("eval_missing_checkpoint", lambda root, world: evaluate_cmd(root / "step_9"), ("checkpoint not found", "step_9")),
    Case("eval_unknown_override", lambda root, world: evaluate_cmd(world.run_dir / "step_3", "batch=1"), ("'batch'",)),
    # ARC JSON
    Case("arc_malformed_json", arc('{"train": ['), ("training/p.json", "malformed JSON")),
    Case("arc_colour_out_of_range", arc(json.dumps({"train": [{"input": [[1, 12]], "output": [[1]]}], "test": []})),
         ("training/p.json", "field 'train[0].input'", "colour 12")),
    Case("arc_missing_test_list", arc(json.dumps({"train": []})), ("training/p.json", "'train' and 'test'")),
    Case("arc_ragged_grid", arc(json.dumps({"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": []})),
         ("training/p.json", "field 'train[0].input'", "unequal")),
    # CSV rows
    Case("csv_missing_field", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW, "src,...,0"]),
         ("src/train.csv", "line 3", "expected 4 fields")),
    Case("csv_bad_character", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW.replace(".", "x", 1)]),
         ("src/train.csv", "line 2", "field 'q'", "invalid character at position 0")),
    Case("csv_short_row", csv_builder("build_sudoku_dataset.py", [HEADER, "src," + "." * 80 + "," + "1" * 81 + ",0"]),
         ("src/train.csv", "line 2", "field 'q'", "80 characters, expected 81")),
    Case("csv_rating_not_a_number",
         csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW[:-1] + "hard"], "--min-difficulty", "1"),
         ("src/train.csv", "line 2", "field 'rating'")),
    Case("csv_bad_header", csv_builder("build_maze_dataset.py", ["source,question,answer,rating", "s,#S,#G,0"]),
         ("src/train.csv", "line 1", "expected header")),
    # builder flags
    Case("builder_unknown_flag", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], "--num-augs", "3"),
         ("unrecognized arguments: --num-augs",)),
    Case("builder_ill_typed_flag", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], "--num-aug", "x"),
         ("argument --num-aug", "invalid int value: 'x'")),
]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    good = make_tiny_dataset(base / "good")
    run_dir = base / "run"
    pretrain.run(tiny_config(good, run_dir, "epochs=2"))  # 3 steps, one evaluation: step_3 and its train state
    assert (run_dir / "step_3").is_file() and (run_dir / "train_state_step_000003.pt").is_file()
    world = World(good_data=good, run_dir=run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run_case(case):
        root = base / case.id
        root.mkdir()
        cmd = [sys.executable, *case.make(root, world)]
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=180)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip([c.id for c in CASES], pool.map(run_case, CASES)))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_error(results, case):
    result = results[case.id]
    stderr = result.stderr
    assert result.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    for needle in case.expect:
        assert needle in errors[0], (needle, errors[0])
