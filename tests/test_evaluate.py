"""evaluate.py: reproduces training's evaluation from a checkpoint, accepts compiled-module keys, refuses
mismatched checkpoints in one line, runs under torchrun, and hands ARC datasets to the scorer."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
import pretrain
from tests.test_pretrain_helpers import REPO, make_tiny_dataset, tiny_config
from utils import evaluation
from utils.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SAVE = "eval_save_outputs=[inputs,labels,puzzle_identifiers,logits,q_halt_logits]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_tiny_dataset(root / "data")
    ckpt = root / "ckpt"
    pretrain.run(tiny_config(data, ckpt, SAVE))
    logged = {}
    for line in (ckpt / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "all/accuracy" in record:
            logged[record["step"]] = {k: v for k, v in record.items() if k.startswith("all/")}
    return data, ckpt, logged


def run_eval(checkpoint, **overrides):
    cfg = evaluate.EvalConfig(checkpoint=str(checkpoint), device="cpu", **overrides)
    return evaluate.evaluate_checkpoint(cfg, CPU)


def test_matches_training_evaluation(trained):
    _, ckpt, logged = trained
    for step in (3, 6):
        result = run_eval(ckpt / f"step_{step}")
        flat = evaluation.flatten_eval_metrics(result["metrics"])
        assert flat.keys() == logged[step].keys()
        for key, value in logged[step].items():
            assert flat[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    # Saved outputs: one row per test example (5) padded to whole local batches of 4.
    saved = torch.load(ckpt / "step_6_all_preds.0", weights_only=True)
    assert set(saved) == set(evaluate.DEFAULT_SAVE_OUTPUTS)
    assert saved["logits"].shape == (8, 8, 6) and saved["inputs"].shape == (8, 8)
    assert (saved["puzzle_identifiers"][:5] != 0).all() and (
        saved["puzzle_identifiers"][5:] == 0
    ).all()  # padding: blank


def test_reference_style_compiled_keys_and_train_state(trained, tmp_path):
    _, ckpt, logged = trained
    weights = torch.load(ckpt / "step_6", weights_only=True)
    shutil.copy(ckpt / "all_config.yaml", tmp_path / "all_config.yaml")
    torch.save({f"_orig_mod.{k}": v for k, v in weights.items()}, tmp_path / "step_6")
    flat = evaluation.flatten_eval_metrics(run_eval(tmp_path / "step_6", save_outputs=[])["metrics"])
    assert flat["all/accuracy"] == pytest.approx(logged[6]["all/accuracy"])
    # A train-state file carries its own step and config.
    flat = evaluation.flatten_eval_metrics(run_eval(ckpt / "train_state_step_000006.pt", save_outputs=[])["metrics"])
    assert flat["all/lm_loss"] == pytest.approx(logged[6]["all/lm_loss"], rel=1e-6)


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_mismatched_checkpoint_is_one_line_error(trained, tmp_path):
    _, ckpt, _ = trained
    text = (ckpt / "all_config.yaml").read_text().replace("hidden_size: 32", "hidden_size: 64")
    (tmp_path / "all_config.yaml").write_text(text.replace("puzzle_emb_ndim: 32", "puzzle_emb_ndim: 64"))
    shutil.copy(ckpt / "step_6", tmp_path / "step_6")
    result = cli(f"checkpoint={tmp_path / 'step_6'}", "device=cpu", cwd=tmp_path)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "in the checkpoint but" in err and "model.inner." in err
    with pytest.raises(FileNotFoundError, match="^checkpoint not found: "):
        run_eval(tmp_path / "nope")


def test_arc_checkpoint_scored_as_the_arc_prize_does(raw_data_dir, tmp_path):
    """evaluate.py on an ARC run: the ARC evaluator's pass@K and submission.json equal the file-based scorer's
    on the outputs the same evaluation saved (official rule: partial credit per test input)."""
    from dataset.build_arc_dataset import ArcBuildConfig
    from dataset.build_arc_dataset import main as build_main
    from dataset.cli import run_cli
    from tests.test_build_arc_prize import prize_files
    from utils.arc_scoring import score_prediction_files

    kaggle = raw_data_dir / "kaggle-combined"
    picks = {
        subset: sorted(json.loads((kaggle / f"arc-agi_{subset}_challenges.json").read_text()))[:3]
        for subset in ("training", "evaluation")
    }
    prefix = prize_files(kaggle, tmp_path / "src", picks)
    data = tmp_path / "arc"
    flags = ["--input-file-prefix", prefix, "--output-dir", str(data), "--subsets", "training", "evaluation"]
    assert run_cli(build_main, ArcBuildConfig, [*flags, "--test-set-name", "evaluation", "--num-aug", "2"]) == 0
    run = tmp_path / "run"
    pretrain.run(tiny_config(data, run, "epochs=1", "eval_interval=1", "global_batch_size=8", "evaluators=[]"))
    (checkpoint,) = run.glob("step_*")
    keys = "[inputs,labels,puzzle_identifiers,preds,q_halt_logits]"
    result = cli(f"checkpoint={checkpoint}", "device=cpu", f"save_outputs={keys}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("ARC/"))
    assert sorted(printed) == sorted(f"ARC/pass@{k}" for k in (1, 2, 5, 10, 100, 1000))
    step = checkpoint.name.split("_")[1]
    expected = score_prediction_files([str(run / f"step_{step}_all_preds.0")], str(data))
    for key, value in expected.metrics().items():
        assert float(printed[key]) == pytest.approx(value, abs=1e-6), key
    submission = json.loads((run / f"evaluator_ARC_step_{step}" / "submission.json").read_text())
    tasks = json.loads((data / "test_puzzles.json").read_text())
    assert sorted(submission) == sorted(tasks)
    for task, attempts in submission.items():
        assert len(attempts) == len(tasks[task]["test"])
        assert all(set(a) == {"attempt_1", "attempt_2"} for a in attempts)


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(trained, tmp_path):
    _, ckpt, logged = trained
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt, run_dir, ignore=shutil.ignore_patterns("*_all_preds.*"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*cmd, str(REPO / "evaluate.py"), f"checkpoint={run_dir / 'step_6'}", "device=cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(": ") for line in result.stdout.strip().splitlines() if line.startswith("all/"))
    for key, value in logged[6].items():
        assert float(printed[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # Each rank saved its own slice; together they hold every test example once.
    parts = [torch.load(run_dir / f"step_6_all_preds.{r}", weights_only=True) for r in (0, 1)]
    single = torch.load(ckpt / "step_6_all_preds.0", weights_only=True)["puzzle_identifiers"]
    ids = torch.cat([p["puzzle_identifiers"] for p in parts])
    assert sorted(ids[ids != 0].tolist()) == sorted(single[single != 0].tolist())
    assert len(set(single[single != 0].tolist())) == 5
