"""Table of bad inputs, each run through the real command line (pretrain.py, evaluate.py, the builders,
evaluators.arc_scoring).

Every row must end with exit status 2 and exactly one `error:` line, the last line of stderr, naming
what is wrong and where (file, field, line or config key), and no traceback. Rows: malformed, ill-typed or
inconsistent `dataset.json`, missing, unreadable or mismatched arrays, token ids outside the vocabulary
(found when the split is opened, before any step), wrong dtypes, empty splits, bad ARC JSON, bad or empty
CSV sources, bad output folders, unknown or ill-typed overrides and flags, out-of-range optimizer keys,
requests only an evaluation would have met (output names, keep_best metrics, evaluator options, a test split
encoded otherwise than the train split: all before the first step), unreadable checkpoints and checkpoints of
another architecture (evaluate.py and resume), resumes the saved state cannot continue (another batch size or
dataset, a damaged state, a state of another run: the run folder left as it was), a fresh start in a folder
holding another run, ARC scoring of predictions that match nothing. Some rows also check what must not have
happened (no training step, no partial output). The subprocesses of all rows run a few at a time in one
module fixture.
"""

import io
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
import torch
import yaml

import pretrain
from tests.helpers import REPO, TINY_ARCH, make_tiny_dataset, tiny_config

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
GOOD_MAZE_ROW = "src,S  G,So G,0"  # a 2x2 maze


@dataclass
class World:
    good_data: Path  # never modified; rows copy it first
    run_dir: Path  # a finished tiny run: step_3, train_state_step_000003.pt, all_config.yaml


@dataclass
class Case:
    id: str
    make: Callable[[Path, World], list[str]]  # builds the bad input in its own folder, returns the command
    expect: tuple[str, ...]  # substrings of the error line: what is wrong and where
    after: Callable[[Path], None] | None = None  # further checks on the row's folder once the command ended
    env: dict[str, str] | None = None  # extra environment variables


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


def edit_bytes(split, field, change):
    def edit(data):
        path = data / split / f"all__{field}.npy"
        path.write_bytes(change(path.read_bytes()))

    return edit


def not_utf8_json(split):
    def edit(data):
        path = data / split / "dataset.json"
        path.write_bytes(path.read_bytes().replace(b'"pad_id"', b'"pad_id\xff"'))

    return edit


def edit_meta(split, **values):
    return edit_json(split, lambda text: json.dumps({**json.loads(text), **values}))


def remove(split, name):
    return lambda data: (data / split / name).unlink()


def npz_bytes(_):
    buffer = io.BytesIO()
    np.savez(buffer, a=np.arange(3))
    return buffer.getvalue()


def no_training_step(root):
    """The run stopped before its first step: no weights or train state were written."""
    ckpt = root / "ckpt"
    assert not (ckpt.is_dir() and [p.name for p in ckpt.iterdir() if "step_" in p.name])


def no_output(root):
    """A failed build leaves nothing under its output folder's name, nor a staging folder beside it."""
    assert not (root / "out").exists() and not [p.name for p in root.iterdir() if p.name.startswith(".out.")]


def with_overrides(*extra):
    return lambda root, world: pretrain_cmd(world.good_data, root, *extra)


def resume_other_arch(root, world):
    state = world.run_dir / "train_state_step_000003.pt"
    return pretrain_cmd(world.good_data, root, f"resume={state}", "arch.hidden_size=64")


def resume_corrupt(content: bytes):
    def make(root, world):
        (root / "ckpt").mkdir()
        (root / "ckpt" / "train_state_step_000009.pt").write_bytes(content)
        return pretrain_cmd(world.good_data, root, "resume=auto")

    return make


def used_folder(*extra: str, edit: Callable[[Path], None] | None = None):
    """pretrain.py in a copy of the finished run's folder (`edit` changes the copy first); the copy as it was is kept
    beside it, for `folder_untouched`."""

    def make(root, world):
        shutil.copytree(world.run_dir, root / "ckpt")
        if edit is not None:
            edit(root / "ckpt")
        shutil.copytree(root / "ckpt", root / "before")
        return pretrain_cmd(world.good_data, root, *extra)

    return make


def folder_untouched(root):
    """Refused before anything was written: the run folder holds the same files with the same bytes (the lock file
    aside, which holds the pid of the process that last took it)."""

    def files(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}

    assert files(root / "ckpt") == files(root / "before")


def edit_train_state(change: Callable[[dict], None]):
    def edit(folder):
        path = folder / "train_state_step_000003.pt"
        payload = torch.load(path, weights_only=False)
        change(payload)
        torch.save(payload, path)

    return edit


def eval_copy(
    change_config: Callable[[dict], None] | None = None, weights: bytes | Callable | None = None, extra: tuple = ()
):
    """evaluate.py on a copy of the finished run, with its all_config.yaml or weights file changed
    (`weights`: the new bytes, or a function of the weights file's path that rewrites it), and `extra` overrides."""

    def make(root, world):
        run = root / "run"
        run.mkdir()
        shutil.copy(world.run_dir / "step_3", run / "step_3")
        config = yaml.safe_load((world.run_dir / "all_config.yaml").read_text())
        if change_config is not None:
            change_config(config)
        (run / "all_config.yaml").write_text(yaml.safe_dump(config))
        if callable(weights):
            weights(run / "step_3")
        elif weights is not None:
            (run / "step_3").write_bytes(weights)
        return evaluate_cmd(run / "step_3", *extra)

    return make


def only_the_run_files(root):
    """evaluate.py wrote nothing beside the checkpoint (no saved outputs, no evaluator folder)."""
    assert sorted(os.listdir(root / "run")) == ["all_config.yaml", "step_3"]


def other_test_seq_len(root, world):
    """A second dataset whose test split has 10 tokens per example where the training dataset has 8."""
    other = Path(shutil.copytree(world.good_data, root / "other"))
    for field in ("inputs", "labels"):
        path = other / "test" / f"all__{field}.npy"
        np.save(path, np.pad(np.load(path), ((0, 0), (0, 2))))
    edit_meta("test", seq_len=10)(other)
    return pretrain_cmd(world.good_data, root, f"data_paths=[{world.good_data}]", f"data_paths_test=[{other}]")


def non_ascii_data_path(root, world):
    return [str(REPO / "pretrain.py"), *PRETRAIN_BASE, f"data_path={root / 'données'}"]


def arc_scoring(predictions: dict[str, torch.Tensor] | None, data: Callable[[Path, World], Path] | None = None):
    """`python -m evaluators.arc_scoring` on a saved-outputs file holding `predictions` (None: no --predictions) and
    the dataset `data(root, world)` returns (default: a one-task ARC dataset of identifiers and test_puzzles.json)."""

    def one_task(root, world):
        arc_data = root / "arc"
        arc_data.mkdir()
        (arc_data / "identifiers.json").write_text(json.dumps(["<blank>", "p1"]))
        task = {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[1, 2]], "output": [[2, 1]]}]}
        (arc_data / "test_puzzles.json").write_text(json.dumps({"p1": task}))
        return arc_data

    def make(root, world):
        argv = ["-m", "evaluators.arc_scoring", "--data-path", str((data or one_task)(root, world))]
        if predictions is not None:
            torch.save(predictions, root / "step_1_all_preds.0")
            argv += ["--predictions", str(root / "step_1_all_preds.0")]
        return argv

    return make


def arc_rows(n: int, seq_len: int = 900) -> dict[str, torch.Tensor]:
    """`n` saved rows predicting PAD everywhere for puzzle identifier 1, on canvases holding the grid [[3]]."""
    inputs = torch.zeros(n, seq_len, dtype=torch.int32)
    inputs[:, 0] = 5  # colour 3
    return {
        "inputs": inputs,
        "preds": torch.zeros(n, seq_len, dtype=torch.int32),
        "puzzle_identifiers": torch.ones(n, dtype=torch.int32),
        "q_halt_logits": torch.zeros(n),
    }


def truncate_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def torch_save(obj):
    return lambda path: torch.save(obj, path)


def replace_by_folder(path):
    path.unlink()
    path.mkdir()


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


HEADER = "source,question,answer,rating"  # the hub files' header line


def csv_builder(builder, train_lines, *flags, test_lines=(HEADER, GOOD_CSV_ROW), prepare=None):
    """A builder run on train.csv/test.csv made of the given lines (str, or bytes written as they are);
    `prepare(root)` may set up more (an existing output folder) before the command."""

    def make(root, world):
        src = root / "src"
        src.mkdir()
        for name, lines in (("train.csv", train_lines), ("test.csv", test_lines)):
            (src / name).write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
        if prepare is not None:
            prepare(root)
        return [str(REPO / f"dataset/{builder}"), "--source-repo", str(src), "--output-dir", str(root / "out"), *flags]

    return make


def maze_builder(train_lines, *flags, test_lines=(HEADER, GOOD_MAZE_ROW)):
    return csv_builder("build_maze_dataset.py", train_lines, *flags, test_lines=test_lines)


def output_is_a_file(root):
    (root / "out").write_text("a file")


def output_holds_other_files(root):
    (root / "out").mkdir()
    (root / "out" / "notes.txt").write_text("mine")


def untouched(name, content):
    def check(root):
        assert (root / "out" / name).read_text() == content and os.listdir(root / "out") == [name]

    return check


def generator(*flags):
    def make(root, world):
        return [str(REPO / "dataset/generate_sudoku.py"), "--output-dir", str(root / "out"), *flags]

    return make


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
    # Token ids of every row are checked when a split is opened, before the first step: the first row of
    # the bad ones is named, whichever batches training would have drawn.
    Case("token_id_too_large_train_inputs", with_data(edit_array("train", "inputs", set_token(6, row=slice(3, 6)))),
         ("train/all__inputs.npy: row 3, position 2: token id 6 outside [0, vocab_size=6)",), no_training_step),
    Case("token_id_too_large_test_labels", with_data(edit_array("test", "labels", set_token(9, row=1, col=5))),
         ("test/all__labels.npy", "row 1, position 5: token id 9 outside [0, vocab_size=6)"), no_training_step),
    Case("token_id_in_last_train_row", with_data(edit_array("train", "labels", set_token(7, row=17, col=7))),
         ("train/all__labels.npy", "row 17, position 7: token id 7 outside"), no_training_step),
    Case("token_id_negative", with_data(edit_array("train", "inputs", lambda a: set_token(-3)(a.astype(np.int8)))),
         ("train/all__inputs.npy", "row 3, position 2: token id -3 outside"), no_training_step),
    Case("float_inputs", with_data(edit_array("train", "inputs", lambda a: a.astype(np.float32))),
         ("train/all__inputs.npy", "dtype float32 is not an integer type")),
    Case("float_puzzle_indices", with_data(edit_array("test", "puzzle_indices", lambda a: a.astype(np.float64))),
         ("test/all__puzzle_indices.npy", "expected a 1-D integer array")),
    Case("group_indices_2d", with_data(edit_array("train", "group_indices", lambda a: a[None])),
         ("train/all__group_indices.npy", "expected a 1-D integer array")),
    Case("group_indices_not_increasing", with_data(edit_array("train", "group_indices", lambda a: a[[0, 2, 1, 3, 4, 5, 6]])),
         ("train/all__group_indices.npy", "offsets not strictly increasing at position 2")),
    Case("puzzle_identifier_out_of_range", with_data(edit_array("test", "puzzle_identifiers", lambda a: a * 100)),
         ("test/all__puzzle_identifiers.npy", "identifier outside [0, num_puzzle_identifiers=")),
    Case("puzzle_identifiers_one_short", with_data(edit_array("train", "puzzle_identifiers", lambda a: a[:-1])),
         ("train/all__group_indices.npy", "last offset 18 != number of puzzles 17")),
    Case("inputs_file_missing", with_data(remove("train", "all__inputs.npy")),
         ("train/all__inputs.npy", "array file listed by", "is missing")),
    Case("inputs_file_empty", with_data(edit_bytes("train", "inputs", lambda b: b"")),
         ("train/all__inputs.npy", "cannot read .npy file (No data left in file)")),
    Case("labels_file_truncated", with_data(edit_bytes("test", "labels", lambda b: b[:-9])),
         ("test/all__labels.npy", "cannot read .npy file (mmap length is greater than file size)")),
    Case("npz_under_npy_name", with_data(edit_bytes("train", "puzzle_indices", npz_bytes)),
         ("train/all__puzzle_indices.npy", "not a .npy array file (found a NpzFile)")),
    Case("empty_train_split", with_data(empty_split("train")), ("/train:", "the train split has no examples")),
    Case("empty_test_split", with_data(empty_split("test")), ("/test:", "the test split has no examples")),
    Case("missing_data_path", lambda root, world: pretrain_cmd(root / "nowhere", root), ("nowhere/train", "split folder not found")),
    Case("dataset_json_not_an_object", with_data(edit_json("train", lambda t: "[1, 2]")), ("train/dataset.json: expected a JSON object of metadata fields",)),
    Case("dataset_json_not_utf8", with_data(not_utf8_json("test")),
         ("test/dataset.json", "malformed JSON")),
    Case("pad_id_out_of_range", with_data(edit_meta("test", pad_id=6)),
         ("test/dataset.json", "field 'pad_id' must be in [0, vocab_size=6), got 6")),
    Case("sets_listed_twice", with_data(edit_meta("train", sets=["all", "all"])),
         ("train/dataset.json", "field 'sets' lists 'all' more than once")),
    Case("set_without_files", with_data(edit_meta("train", sets=["all", "extra"])),
         ("train/extra__inputs.npy", "array file listed by", "dataset.json is missing")),
    Case("total_groups_wrong", with_data(edit_meta("train", total_groups=1000)),
         ("train/dataset.json", "field 'total_groups' is 1000, but the group_indices arrays hold 6")),
    Case("mean_puzzle_examples_wrong", with_data(edit_meta("test", mean_puzzle_examples=3.5)),
         ("test/dataset.json", "field 'mean_puzzle_examples' is 3.5, but the arrays hold 5 examples in 5 puzzles")),
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
    Case("negative_lr", with_overrides("lr=-1"), ("config key 'lr': must be a finite number >= 0, got -1.0",),
         no_training_step),
    Case("lr_min_ratio_above_one", with_overrides("lr_min_ratio=1.5"), ("config key 'lr_min_ratio': must be in [0, 1]",)),
    Case("unquoted_non_ascii_path", non_ascii_data_path,
         ("override 'data_path=", "données': character 'é' is not allowed in an unquoted value", "quote the value")),
    Case("misspelled_loss_option", with_overrides("+arch.loss.los_type=x"),
         ("config key 'arch.loss': unknown option 'los_type' (it takes loss_type)",), no_training_step),
    # Checked before the first step, not after the first evaluation:
    Case("eval_save_outputs_unknown", with_overrides("eval_save_outputs=[logits,logitz]"),
         ("config key 'eval_save_outputs': 'logitz' is not an output", "inputs, labels, logits, preds"), no_training_step),
    Case("keep_best_unknown_metric", with_overrides("keep_best=all/exact_acc"),
         ("config key 'keep_best': 'all/exact_acc' is not an eval metric", "all/exact_accuracy, all/lm_loss"),
         no_training_step),
    Case("evaluator_option_wrong_type", with_overrides("evaluators=[{name: arc@ARC, pass_Ks: [two]}]"),
         ("config key 'evaluators': arc@ARC: option 'pass_Ks' (item 0)", "valid integer", "'two'"), no_training_step),
    Case("evaluator_unknown_option", with_overrides("evaluators=[{name: arc@ARC, passKs: [1]}]"),
         ("config key 'evaluators': arc@ARC: unknown option 'passKs'", "pass_Ks"), no_training_step),
    Case("test_split_other_vocab", with_data(edit_meta("test", vocab_size=7)),
         ("test/dataset.json: field 'vocab_size' is 7, but", "train/dataset.json has 6", "encoded as the training split"),
         no_training_step),
    Case("data_paths_test_other_seq_len", other_test_seq_len,
         ("other/test/dataset.json: field 'seq_len' is 10, but", "good/train/dataset.json has 8"), no_training_step),
    # 6 groups x 2 epochs per iteration = 12 examples: a batch of 16 is never filled, no step would run.
    Case("batch_larger_than_iteration", with_overrides("global_batch_size=16"),
         ("config key 'global_batch_size': 16", "eval_interval=2 epochs x 6 groups x 1 examples = 12", "no step")),
    # checkpoints: resume
    Case("resume_other_architecture", resume_other_arch,
         ("train_state_step_000003.pt", "model.inner", "has shape", "[64]")),
    Case("resume_corrupt_state", resume_corrupt(b"\x80\x02 not a zip archive"),
         ("train_state_step_000009.pt", "not a readable train state")),
    Case("resume_empty_state", resume_corrupt(b""), ("train_state_step_000009.pt", "not a readable train state")),
    Case("resume_missing_state", with_overrides("resume=/no/such/state.pt"), ("config key 'resume'", "/no/such/state.pt")),
    Case("resume_other_global_batch_size", used_folder("resume=auto", "global_batch_size=2"),
         ("train_state_step_000003.pt", "global_batch_size=4", "resumed with 2"), after=folder_untouched),
    Case("resume_state_without_ranks", used_folder("resume=auto", edit=edit_train_state(lambda p: p.pop("ranks"))),
         ("train_state_step_000003.pt", "field 'ranks' missing", "no good train state"), after=folder_untouched),
    Case("resume_state_of_another_run",
         used_folder("resume=auto", edit=lambda f: (f / "run_id.txt").write_text("0123456789ab\n")),
         ("train_state_step_000003.pt", "is a train state of run", "holds run 0123456789ab"), after=folder_untouched),
    Case("resume_other_dataset",
         used_folder("resume=auto", edit=edit_train_state(lambda p: p["dataset"].update(total_groups=7))),
         ("train_state_step_000003.pt", "other training data", "total_groups=7 then, 6 now"), after=folder_untouched),
    # run folder
    Case("fresh_start_in_used_folder", used_folder(),
         ("checkpoint_path=", "holds another run", "train_state_step_000003.pt", "resume=auto", "overwrite=true"),
         after=folder_untouched),
    Case("overwrite_with_resume_auto", used_folder("resume=auto", "overwrite=true"),
         ("config key 'overwrite'", "resume=auto"), after=folder_untouched),
    # checkpoints: evaluate.py
    Case("eval_other_width", eval_copy(arch_change("hidden_size", 64)), ("run/step_3", "has shape", "[64]")),
    Case("eval_other_depth", eval_copy(arch_change("H_layers", 2)), ("run/step_3", "H_level.layers.1", "missing")),
    Case("eval_not_a_checkpoint", eval_copy(weights=b"hello"), ("run/step_3", "not a readable torch checkpoint")),
    Case("eval_empty_checkpoint", eval_copy(weights=b""), ("run/step_3: not a readable torch checkpoint (empty file)",)),
    Case("eval_truncated_checkpoint", eval_copy(weights=truncate_half),
         ("run/step_3: not a readable torch checkpoint (RuntimeError: PytorchStreamReader failed reading zip archive",)),
    Case("eval_checkpoint_of_a_list", eval_copy(weights=torch_save([1, 2])),
         ("run/step_3: expected a state dict, found list",)),
    Case("eval_checkpoint_of_numbers", eval_copy(weights=torch_save({"model.inner.w": 1})),
         ("run/step_3: expected a state dict of tensors, found key 'model.inner.w' holding int",)),
    Case("eval_checkpoint_is_a_folder", eval_copy(weights=replace_by_folder), ("run/step_3",)),
    Case("eval_bad_all_config", eval_bad_yaml, ("run/all_config.yaml", "invalid YAML")),
    Case("eval_missing_checkpoint", lambda root, world: evaluate_cmd(root / "step_9"), ("checkpoint not found", "step_9")),
    Case("eval_unknown_override", lambda root, world: evaluate_cmd(world.run_dir / "step_3", "batch=1"), ("'batch'",)),
    Case("eval_save_outputs_typo", eval_copy(extra=("save_outputs=[logitz]",)),
         ("config key 'save_outputs': 'logitz' is not an output", "logits"), only_the_run_files),
    # ARC scoring of saved outputs
    Case("arc_scoring_without_predictions", arc_scoring(None),
         ("the following arguments are required: --predictions",)),
    Case("arc_scoring_no_rows", arc_scoring(arc_rows(0)),
         ("no prediction of", "step_1_all_preds.0 is of a test input of", "(0 rows besides padding")),
    Case("arc_scoring_rows_of_other_inputs", arc_scoring(arc_rows(3)), ("no prediction of", "(3 rows besides padding")),
    Case("arc_scoring_not_arc", arc_scoring(arc_rows(2, seq_len=8), data=lambda root, world: world.good_data),
         ("good: not an ARC dataset",)),
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
    Case("csv_empty_file", csv_builder("build_sudoku_dataset.py", []), ("src/train.csv", "empty file"), no_output),
    Case("csv_header_only", maze_builder([HEADER]), ("src/train.csv", "no data rows after the header line"), no_output),
    Case("csv_header_only_test", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], test_lines=[HEADER]),
         ("src/test.csv", "no data rows after the header line"), no_output),
    Case("csv_filter_keeps_nothing", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], "--min-difficulty", "5"),
         ("src/train.csv", "no row has rating >= 5"), no_output),
    Case("maze_non_square_first_row", maze_builder([HEADER, "s,S  G#,So G#,0", GOOD_MAZE_ROW]),
         ("src/train.csv", "line 2", "field 'q' has 5 characters, not a square grid"), no_output),
    Case("maze_test_grid_other_size", maze_builder([HEADER, GOOD_MAZE_ROW], test_lines=[HEADER, "s,S  ##### G,So ##### G,0"]),
         ("src/test.csv", "line 2", "field 'q' has 10 characters, expected 4"), no_output),
    Case("maze_wrong_field_count", maze_builder([HEADER, GOOD_MAZE_ROW, "s,S  G,0"]),
         ("src/train.csv", "line 3", "expected 4 fields (source,question,answer,rating), got 3"), no_output),
    Case("csv_not_utf8", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW.encode().replace(b".", b"\xff", 1)]),
         ("src/train.csv", "line 2", "field 'q': non-ASCII character at position 0"), no_output),
    Case("csv_field_over_limit", maze_builder([HEADER, "s," + "#" * 140_000 + ",x,0"]),
         ("src/train.csv", "line 2", "malformed CSV (field larger than field limit"), no_output),
    Case("hub_source_unreachable", lambda root, world: [str(REPO / "dataset/build_maze_dataset.py"), "--source-repo",
         "nobody/no-such-dataset", "--output-dir", str(root / "out")],
         ("nobody/no-such-dataset", "cannot download train.csv from the Hugging Face hub"), no_output, {"HF_HUB_OFFLINE": "1"}),
    # output folders
    Case("output_dir_is_a_file", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], prepare=output_is_a_file),
         ("/out: exists and is not a folder",)),
    Case("output_dir_holds_other_files", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], prepare=output_holds_other_files),
         ("/out: holds 'notes.txt'", "refusing to replace the folder"), untouched("notes.txt", "mine")),
    # builder and generator flags
    Case("builder_unknown_flag", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], "--num-augs", "3"),
         ("unrecognized arguments: --num-augs",)),
    Case("builder_ill_typed_flag", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], "--num-aug", "x"),
         ("argument --num-aug", "invalid int value: 'x'")),
    Case("builder_negative_num_aug", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], "--num-aug", "-1"),
         ("--num-aug must be >= 0, got -1",), no_output),
    Case("builder_negative_seed", maze_builder([HEADER, GOOD_MAZE_ROW], "--seed", "-1"),
         ("--seed: Input should be greater than or equal to 0",), no_output),
    Case("builder_zero_subsample", maze_builder([HEADER, GOOD_MAZE_ROW], "--subsample-size", "0"),
         ("--subsample-size must be positive, got 0",), no_output),
    Case("generator_empty_split", generator("--num-train", "2", "--num-test", "0"),
         ("--num-train/--num-test must be >= 1, got 2/0",), no_output),
    Case("generator_unsupported_size", generator("--size", "5"), ("--size must be one of 4, 6, 9, got 5",), no_output),
    Case("builder_unsupported_size", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], "--size", "8"),
         ("--size must be one of 4, 6, 9, got 8",), no_output),
    Case("builder_size_does_not_fit_rows", csv_builder("build_sudoku_dataset.py", [HEADER, GOOD_CSV_ROW], "--size", "6"),
         ("src/train.csv", "line 2", "field 'q' has 81 characters, expected 36"), no_output),
    Case("builder_digit_above_size", csv_builder("build_sudoku_dataset.py",
         [HEADER, "src," + "." * 35 + "7," + "1" * 36 + ",0"], "--size", "6"),
         ("src/train.csv", "line 2", "field 'q'", "invalid character at position 35"), no_output),
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
        return subprocess.run(
            cmd, cwd=root, capture_output=True, text=True, env={**env, **(case.env or {})}, timeout=180
        )

    with ThreadPoolExecutor(max_workers=3) as pool:
        return base, dict(zip([c.id for c in CASES], pool.map(run_case, CASES)))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_error(results, case):
    base, by_id = results
    result = by_id[case.id]
    stderr = result.stderr
    assert result.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    for needle in case.expect:
        assert needle in errors[0], (needle, errors[0])
    if case.after is not None:
        case.after(base / case.id)


def test_hub_header_is_accepted(tmp_path):
    """The header line of the hub files (`source,question,answer,rating`) is a header like any other."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("train.csv", "test.csv"):
        (src / name).write_bytes(b"\xef\xbb\xbf" + f"{HEADER}\r\n{GOOD_MAZE_ROW}\r\n".encode())
    cmd = [sys.executable, str(REPO / "dataset/build_maze_dataset.py"), "--source-repo", str(src), "--output-dir",
           str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.load(tmp_path / "out" / "train" / "all__inputs.npy").tolist() == [[3, 2, 2, 4]]  # S, open, open, G
