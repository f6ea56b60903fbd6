"""evaluate.py: reproduces training's evaluation from a checkpoint, accepts compiled-module keys, refuses
mismatched checkpoints in one line, runs under torchrun, and hands ARC datasets to the scorer; the probe that
finds an evaluation's outputs and metrics beforehand, a read-only run folder (exit 4 before the evaluation),
metrics printed before a save that fails."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import pretrain
from tests.helpers import REPO, TINY_ARCH, make_tiny_dataset, tiny_config
from training import evaluation
from training.config import compose_config
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
    from evaluators.arc_scoring import score_prediction_files
    from tests.arc_data import prize_files

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


@pytest.mark.multiprocess
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


ARCHS = {
    "hrm": TINY_ARCH,
    "trm": ["arch=trm_tiny", "arch.hidden_size=32", "arch.num_heads=2", "arch.halt_max_steps=3"],
    "hrm_3level": ["arch=hrm_3level", "arch.hidden_size=32", "arch.num_heads=4", "arch.planner_layers=1",
                   "arch.decomposer_layers=1", "arch.executor_layers=1", "arch.window_size=3",
                   "arch.num_global_tokens=2", "arch.forward_dtype=float32"],
}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_probe_finds_what_an_evaluation_saves_and_reports(trained, tmp_path, arch):
    """The outputs `probe_eval_outputs` finds before any work are exactly those a real evaluation can save, and the
    head's eval-mode `metric_names` (less the divisor `count`) exactly the metrics it reports, for each model; the
    probe leaves the RNG state and the head's mode as they were."""
    from training.build import create_dataloader, create_model
    from training.train_state import EvalState

    data, _, _ = trained
    config = compose_config([*ARCHS[arch], f"data_path={data}", f"checkpoint_path={tmp_path}", "global_batch_size=4",
                             "epochs=1", "eval_interval=1", "device=cpu"])  # fmt: skip
    train_dataset, _ = create_dataloader(config, "train", CPU, test_set_mode=False, epochs=1)
    eval_dataset, eval_loader = create_dataloader(config, "test", CPU, test_set_mode=True, epochs=1)
    head, _ = create_model(config, train_dataset.metadata, CPU)
    rng = torch.get_rng_state()
    outputs = evaluation.probe_eval_outputs(head, eval_dataset.metadata, CPU.device)
    metrics = set(head.metric_names(training=False)) - {"count"}
    assert head.training and torch.equal(rng, torch.get_rng_state())
    assert {"inputs", "labels", "puzzle_identifiers", "logits", "q_halt_logits"} <= outputs
    head.eval()
    state = EvalState(model=head, forward=head)
    config = config.model_copy(update={"eval_save_outputs": sorted(outputs)})
    results = evaluation.evaluate(config, state, eval_loader, eval_dataset.metadata, CPU)
    assert set(results["all"]) == metrics
    assert set(torch.load(tmp_path / "step_0_all_preds.0", weights_only=True)) == outputs


def copy_run(ckpt, root):
    """The run's step_6 and all_config.yaml in `root`/run."""
    run = root / "run"
    run.mkdir()
    for name in ("step_6", "all_config.yaml"):
        shutil.copy(ckpt / name, run / name)
    return run


def read_only(folder: Path, argv: list[str]) -> list[str]:
    """`argv` run where `folder` cannot be written: its permissions for a normal user; for root, whom permissions do
    not stop, a read-only bind mount of it in a private mount namespace (`unshare`, as the container allows)."""
    os.chmod(folder, 0o555)
    if os.geteuid() != 0:
        return argv
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without a mount namespace: nothing makes a folder read-only")
    remount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", remount, str(folder), *argv]


def test_unwritable_run_folder_stops_before_the_evaluation(trained, tmp_path):
    """A read-only run folder: exit 4 with one line naming it, before the evaluation runs."""
    _, ckpt, _ = trained
    run = copy_run(ckpt, tmp_path)
    argv = [sys.executable, str(REPO / "evaluate.py"), f"checkpoint={run / 'step_6'}", "device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(
            read_only(run, argv), cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
        )
    finally:
        os.chmod(run, 0o755)
    assert result.returncode == 4, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] in (
        f"error: cannot write evaluation outputs to {run}: {reason}"
        for reason in ("Permission denied", "Read-only file system")
    ), result.stderr
    assert "evaluating" not in result.stderr and result.stdout == ""
    assert sorted(os.listdir(run)) == ["all_config.yaml", "step_6"]


def test_metrics_are_printed_before_a_failing_save(trained, tmp_path):
    """When saving the outputs fails after the evaluation (here a folder where the file goes), the metrics are
    already printed; the run ends with status 4."""
    _, ckpt, logged = trained
    run = copy_run(ckpt, tmp_path)
    (run / "step_6_all_preds.0").mkdir()
    result = cli(f"checkpoint={run / 'step_6'}", "device=cpu", cwd=tmp_path)
    assert result.returncode == 4, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot write checkpoint to {run}: ")
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("all/"))
    assert printed.keys() == logged[6].keys()
    for key, value in logged[6].items():
        assert float(printed[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
