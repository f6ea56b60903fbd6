"""evaluate.py beyond the reference, for HRM and TRM checkpoints:

- more ACT steps than in training (`arch.halt_max_steps=N`, with fixed or learned halting), and accuracy after
  each ACT step (`step_accuracy=true`);
- the model fed blank or shuffled puzzle identifiers (`puzzle_identifiers=blank|shuffled`), scoring unchanged.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
import pretrain
from tests.helpers import REPO, make_tiny_dataset, tiny_config
from training.evaluation import flatten_eval_metrics, identifier_feed
from utils.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
ARCHS = {
    "hrm": [],  # tiny_config's HRM (halt_max_steps 3)
    "trm": ["arch=trm_tiny", "arch.hidden_size=32", "arch.num_heads=2", "arch.halt_max_steps=3"],
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"eval_{request.param}")
    data = make_tiny_dataset(root / "data")
    # As in ARC, the test puzzles carry identifiers that training saw (here: the first 5 training puzzles').
    train_ids = np.load(data / "train" / "all__puzzle_identifiers.npy")
    np.save(data / "test" / "all__puzzle_identifiers.npy", train_ids[:5])
    ckpt = root / "ckpt"
    # A higher puzzle-embedding lr so that the identifiers matter to the trained model.
    pretrain.run(tiny_config(data, ckpt, *ARCHS[request.param], "epochs=8", "eval_interval=8", "puzzle_emb_lr=0.1"))
    (checkpoint,) = ckpt.glob("step_*[0-9]")
    return SimpleNamespace(kind=request.param, data=data, ckpt=ckpt, checkpoint=checkpoint)


def evaluate_with(checkpoint, **overrides):
    overrides.setdefault("save_outputs", [])
    cfg = evaluate.EvalConfig(checkpoint=str(checkpoint), device="cpu", **overrides)
    return evaluate.evaluate_checkpoint(cfg, CPU)


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_more_act_steps_than_in_training_from_the_command_line(run, tmp_path):
    result = cli(
        f"checkpoint={run.checkpoint}", "device=cpu", "arch.halt_max_steps=7", "step_accuracy=true", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("all/"))
    assert float(printed["all/steps"]) == 7.0  # every test sequence ran the 7 steps asked for (trained with 3)
    rows = [line.split() for line in result.stdout.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(1, 8))
    step = run.checkpoint.name.split("_")[1]
    saved = json.loads((run.ckpt / f"step_{step}_step_accuracy.json").read_text())
    assert saved["steps"] == list(range(1, 8)) and saved["count"] == 5
    # The last step's accuracies are the evaluation's own (its outputs are taken after the last step).
    assert saved["accuracy"][-1] == pytest.approx(float(printed["all/accuracy"]), abs=1e-5)
    assert saved["exact_accuracy"][-1] == pytest.approx(float(printed["all/exact_accuracy"]), abs=1e-5)


def test_step_accuracy_at_the_trained_step_count_matches_the_plain_evaluation(run):
    plain = flatten_eval_metrics(evaluate_with(run.checkpoint)["metrics"])
    per_step = evaluate_with(run.checkpoint, step_accuracy=True)["step_accuracy"]
    assert per_step["steps"] == [1, 2, 3]
    assert per_step["accuracy"][-1] == pytest.approx(plain["all/accuracy"], abs=1e-6)


def test_learned_halting_with_more_steps(run):
    fixed = flatten_eval_metrics(evaluate_with(run.checkpoint, arch={"halt_max_steps": 6})["metrics"])
    learned = flatten_eval_metrics(
        evaluate_with(run.checkpoint, arch={"halt_max_steps": 6}, eval_halting="learned")["metrics"]
    )
    assert fixed["all/steps"] == 6.0
    assert 1.0 <= learned["all/steps"] <= 6.0  # each row stops at its own q decision, at most at the limit


def test_nested_loss_override_from_the_command_line(run, tmp_path):
    """`arch.loss.loss_type=...` merges into the run's loss config (it replaced the whole section before)."""
    result = cli(
        f"checkpoint={run.checkpoint}", "device=cpu", "save_outputs=[]", "arch.loss.loss_type=softmax_cross_entropy",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = {k: float(v) for k, v in (line.split(": ") for line in result.stdout.splitlines() if ": " in line)}
    softmax = flatten_eval_metrics(
        evaluate_with(run.checkpoint, arch={"loss": {"loss_type": "softmax_cross_entropy"}})["metrics"]
    )
    stablemax = flatten_eval_metrics(evaluate_with(run.checkpoint)["metrics"])
    assert printed == pytest.approx(softmax, rel=1e-5)
    assert printed["all/lm_loss"] != pytest.approx(stablemax["all/lm_loss"], rel=1e-3)  # the loss did change
    assert printed["all/accuracy"] == pytest.approx(stablemax["all/accuracy"])  # the predictions did not


def test_unknown_or_bad_arch_override_is_one_line_error(run, tmp_path):
    for override, needle in (
        ("arch.halt_max_step=9", "unknown key 'arch.halt_max_step'"),
        ("arch.halt_max_steps=0", "halt_max_steps"),
        ("arch.loss.los_type=x", "config key 'arch.loss': unknown option 'los_type' (it takes loss_type)"),
        ("arch.loss=3", "config key 'arch.loss': Input should be a valid dictionary"),
    ):
        result = cli(f"checkpoint={run.checkpoint}", "device=cpu", override, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and needle in lines[-1], lines[-1]
        assert "Traceback" not in result.stderr


def test_blank_and_shuffled_identifiers_change_what_the_model_sees_not_the_scoring(run):
    keys = ["inputs", "labels", "puzzle_identifiers", "logits"]
    outputs = {}
    for mode in ("as_is", "blank", "shuffled"):
        evaluate_with(run.checkpoint, puzzle_identifiers=mode, save_outputs=keys)
        step = run.checkpoint.name.split("_")[1]
        outputs[mode] = torch.load(run.ckpt / f"step_{step}_all_preds.0", weights_only=True)
    for mode in ("blank", "shuffled"):
        # Saved identifiers stay the true ones; the logits differ: the model leaned on its puzzle embedding.
        assert torch.equal(outputs[mode]["puzzle_identifiers"], outputs["as_is"]["puzzle_identifiers"])
        assert not torch.equal(outputs[mode]["logits"], outputs["as_is"]["logits"])


def test_identifier_feed_rules():
    meta = SimpleNamespace(blank_identifier_id=0, num_puzzle_identifiers=50)
    ids = torch.tensor([0, 1, 2, 49, 7, 7], dtype=torch.int32)
    assert identifier_feed("as_is", meta, 0) is None
    assert identifier_feed("blank", meta, 0)(ids).tolist() == [0] * 6
    shuffled = identifier_feed("shuffled", meta, 0)
    table = shuffled(torch.arange(50, dtype=torch.int32))
    assert table[0] == 0 and sorted(table.tolist()) == list(range(50))  # a bijection keeping the blank id
    assert (table[1:] != torch.arange(1, 50)).float().mean() > 0.8  # most puzzles get another's row
    assert torch.equal(shuffled(ids), table[ids.long()]) and shuffled(ids).dtype == torch.int32
    assert torch.equal(identifier_feed("shuffled", meta, 0)(ids), shuffled(ids))  # fixed by the seed
