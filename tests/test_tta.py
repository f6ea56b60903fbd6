"""Test-time augmentation for Sudoku and Maze (training/tta.py, evaluate.py `tta=... tta_views=N`).

The views are checked against the builders' own output (a maze group holds the 8 dihedral transforms, in id
order; a Sudoku view is `apply_augmentations` of the builder's draws, and keeps a solution a solution), undone
exactly, voted by ARC's rule, and counted as the loss head counts; then evaluate.py runs them from the command
line on a trained tiny Sudoku model, and refuses views that do not fit the dataset in one line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import pretrain
from dataset.build_maze_dataset import MazeBuildConfig
from dataset.build_maze_dataset import main as build_maze
from dataset.build_sudoku_dataset import SudokuBuildConfig, apply_augmentations, random_augmentations
from dataset.build_sudoku_dataset import main as build_sudoku
from dataset.cli import run_cli
from dataset.common import load_metadata
from dataset.generate_maze import make_maze
from dataset.generate_sudoku import make_sudoku
from dataset.generation import puzzle_rng
from tests.helpers import REPO, make_tiny_dataset, tiny_config
from training.build import create_dataloader
from training.train_state import EvalState
from training.tta import Views, make_views, tta_accuracy, vote
from utils.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def write_csvs(folder: Path, rows: dict[str, list[tuple[str, str, int]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        lines = ["source,q,a,rating"] + [f'x,"{q}","{a}",{r}' for q, a, r in split_rows]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def sudoku6(tmp_path_factory):
    """A 6x6 Sudoku dataset from the builder: 24 training puzzles with one augmentation each, 8 test puzzles."""
    root = tmp_path_factory.mktemp("sudoku6")
    rows = {
        s: [make_sudoku(puzzle_rng(3, s, i), min_rating=0, size=6) for i in range(n)]
        for s, n in (("train", 24), ("test", 8))
    }
    src = write_csvs(root / "src", rows)
    data = root / "data"
    flags = ["--source-repo", str(src), "--output-dir", str(data), "--size", "6", "--num-aug", "1"]
    assert run_cli(build_sudoku, SudokuBuildConfig, flags) == 0
    return data


def sudoku_ok(board: np.ndarray) -> bool:
    """Every row, column and 2x3 box of a 6x6 solution holds 1..6."""
    boxes = board.reshape(3, 2, 2, 3).transpose(0, 2, 1, 3).reshape(6, 6)
    return all(sorted(line) == list(range(1, 7)) for lines in (board, board.T, boxes) for line in lines)


def test_sudoku_views_are_the_builders_augmentations_and_undo_exactly(sudoku6):
    meta = load_metadata(sudoku6 / "test")
    views = make_views("sudoku", 6, meta, seed=5)
    inputs = torch.from_numpy(np.load(sudoku6 / "test" / "all__inputs.npy").astype(np.int32))
    labels = torch.from_numpy(np.load(sudoku6 / "test" / "all__labels.npy").astype(np.int32))
    assert torch.equal(views.apply(0, inputs), inputs)  # view 0: the puzzle itself
    aug = random_augmentations(np.random.default_rng(5), 5, 6)  # the draws the views use, in order
    for v in range(1, 6):
        one = {k: a[v - 1 : v].repeat(len(inputs), axis=0) for k, a in aug.items()}
        for tokens in (inputs, labels):
            expected = apply_augmentations(tokens.numpy().reshape(-1, 6, 6) - 1, one).reshape(len(tokens), -1) + 1
            assert np.array_equal(views.apply(v, tokens).numpy(), expected)
            assert torch.equal(views.undo(v, views.apply(v, tokens)), tokens)
        shown_q, shown_a = views.apply(v, inputs).numpy(), views.apply(v, labels).numpy()
        assert all(sudoku_ok(a.reshape(6, 6) - 1) for a in shown_a)
        givens = shown_q > 1
        assert np.array_equal(shown_q[givens], shown_a[givens])  # the givens stay those of the solution
    padded = torch.full((2, 36), -100, dtype=torch.int32)  # ignored labels stay ignored
    assert torch.equal(views.apply(3, padded), padded)


def test_maze_views_are_the_dihedral_group_of_the_augmenting_builder(tmp_path):
    mazes = [make_maze(puzzle_rng(4, "train", i), size=6, min_path_length=6, loops=1) for i in range(3)]
    src = write_csvs(tmp_path / "src", {"train": mazes, "test": mazes[:1]})
    data = tmp_path / "data"
    assert run_cli(build_maze, MazeBuildConfig, ["--source-repo", str(src), "--output-dir", str(data), "--aug"]) == 0
    views = make_views("maze", 8, load_metadata(data / "train"), seed=0)
    for field in ("inputs", "labels"):
        rows = torch.from_numpy(np.load(data / "train" / f"all__{field}.npy").astype(np.int32)).reshape(3, 8, 36)
        for v in range(8):  # group g holds the dihedral transforms 0..7 of maze g
            assert torch.equal(views.apply(v, rows[:, 0]), rows[:, v])
            assert torch.equal(views.undo(v, rows[:, v]), rows[:, 0])


def test_views_that_do_not_fit_the_dataset_are_refused(sudoku6, tmp_path):
    sudoku = load_metadata(sudoku6 / "test")
    maze = sudoku.model_copy(update={"seq_len": 900, "vocab_size": 6})
    arc = sudoku.model_copy(update={"seq_len": 900, "vocab_size": 12})
    with pytest.raises(ValueError, match=r"'tta': sudoku views need a Sudoku dataset .* seq_len 900 and vocab_size 12"):
        make_views("sudoku", 8, arc, 0)
    with pytest.raises(ValueError, match=r"'tta': maze views need a Maze dataset .* seq_len 36 and vocab_size 8"):
        make_views("maze", 8, sudoku, 0)
    with pytest.raises(ValueError, match=r"'tta_views': a maze has 8 views \(its dihedral group\), got 9"):
        make_views("maze", 9, maze, 0)
    with pytest.raises(ValueError, match=r"'tta_views': at least 2 views"):
        make_views("sudoku", 1, sudoku, 0)


def test_vote_takes_the_most_frequent_answer_then_the_most_confident():
    a, b, c = [1, 2, 3], [1, 3, 2], [3, 3, 3]
    answers = torch.tensor([[a, a, c], [b, b, c], [b, c, c]])  # [views, rows, cells]
    confidence = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.1, 0.5, 0.5]])
    # Row 0: b twice beats a once, however confident. Row 1: one vote each, b the most confident. Row 2: c.
    assert vote(answers, confidence).tolist() == [b, b, c]
    tie = torch.tensor([[a], [b]])
    assert vote(tie, np.array([[0.5], [0.5]])).tolist() == [a]  # a full tie: the first seen


@pytest.mark.slow
def test_identity_views_count_as_the_loss_head_does(tmp_path):
    """With every view the identity, the voted answer is the plain one: TTA metrics equal the plain metrics."""
    data = make_tiny_dataset(tmp_path / "data", num_test=7)  # 7 test rows: one batch padded with blank rows
    pretrain.run(tiny_config(data, tmp_path / "ckpt", "evaluators=[]"))
    cfg = evaluate.EvalConfig(checkpoint=str(tmp_path / "ckpt" / "step_6"), device="cpu", save_outputs=[])
    plain = evaluate.evaluate_checkpoint(cfg, CPU)["metrics"]["all"]
    config = evaluate.build_config(cfg, None)
    dataset, loader = create_dataloader(config, "test", CPU, test_set_mode=True, epochs=1)
    head = pretrain.create_model(config, dataset.metadata, CPU)[0]
    head.load_state_dict(torch.load(tmp_path / "ckpt" / "step_6", weights_only=True))
    head.eval()
    state = EvalState(model=head, forward=head)
    identity = Views(torch.arange(8).repeat(3, 1), torch.arange(6).repeat(3, 1))
    voted = tta_accuracy(config, state, loader, dataset.metadata, CPU, identity)["all"]
    assert 0 < plain["accuracy"] < 1
    assert voted["tta_accuracy"] == pytest.approx(plain["accuracy"], abs=1e-6)
    assert voted["tta_exact_accuracy"] == pytest.approx(plain["exact_accuracy"], abs=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_evaluate_votes_sudoku_views_from_the_command_line(sudoku6, tmp_path):
    run = tmp_path / "run"
    pretrain.run(tiny_config(sudoku6, run, "evaluators=[]", "epochs=2", "eval_interval=2", "global_batch_size=8"))
    (checkpoint,) = run.glob("step_*")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def cli(*args, launcher=()):
        cmd = [sys.executable, *launcher, str(REPO / "evaluate.py"), f"checkpoint={checkpoint}", "device=cpu", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)

    result = cli("tta=sudoku", "tta_views=4", "save_outputs=[]")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("all/"))
    assert 0 <= float(printed["all/tta_exact_accuracy"]) <= 1 and 0 < float(printed["all/tta_accuracy"]) <= 1
    results = json.loads((run / "eval_results.json").read_text())
    assert results["overrides"] == {"device": "cpu", "save_outputs": [], "tta": "sudoku", "tta_views": 4}
    assert results["metrics"]["all/tta_accuracy"] == pytest.approx(float(printed["all/tta_accuracy"]), rel=1e-5)
    # Two ranks, each voting on its half of every batch: the same sums.
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    result = cli("tta=sudoku", "tta_views=4", "save_outputs=[]", f"output_dir={tmp_path / 'two'}", launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())["metrics"]
    for key in ("all/tta_exact_accuracy", "all/tta_accuracy", "all/exact_accuracy"):
        assert two[key] == pytest.approx(results["metrics"][key], abs=1e-6), key
    # Views that do not fit: one line, before any evaluation.
    (run / "eval_results.json").unlink()
    result = cli("tta=maze")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: config key 'tta': maze views need a Maze dataset")
    assert not (run / "eval_results.json").exists() and not list(run.glob("*_all_preds.*"))
