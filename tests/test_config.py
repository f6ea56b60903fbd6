"""Hydra composition of every reference README command line, typed validation, one-line errors, LR schedule."""

import math
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from pretrain import (
    PretrainConfig,
    compute_total_steps,
    config_from_dict,
    config_from_hydra,
    cosine_schedule_with_warmup_lr_lambda,
    derive_names,
)
from tests.helpers import REPO

CONFIG_DIR = str(REPO / "config")


def compose_cli(command_line: str) -> PretrainConfig:
    """Take the overrides of a README command line exactly as written and compose them."""
    words = command_line.split()
    overrides = words[words.index("pretrain.py") + 1 :]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return config_from_hydra(compose(config_name="cfg_pretrain", overrides=overrides))


# The training command lines of the reference README, verbatim.
ARC1 = "OMP_NUM_THREADS=8 torchrun --nproc-per-node 8 pretrain.py"
ARC2 = "OMP_NUM_THREADS=8 torchrun --nproc-per-node 8 pretrain.py data_path=data/arc-2-aug-1000"
SUDOKU = (
    "OMP_NUM_THREADS=8 torchrun --nproc-per-node 8 pretrain.py data_path=data/sudoku-extreme-1k-aug-1000 "
    "epochs=20000 eval_interval=2000 lr=1e-4 puzzle_emb_lr=1e-4 weight_decay=1.0 puzzle_emb_weight_decay=1.0"
)
SUDOKU_DEMO = (
    "OMP_NUM_THREADS=8 python pretrain.py data_path=data/sudoku-extreme-1k-aug-1000 epochs=20000 eval_interval=2000 "
    "global_batch_size=384 lr=7e-5 puzzle_emb_lr=7e-5 weight_decay=1.0 puzzle_emb_weight_decay=1.0"
)
MAZE = (
    "OMP_NUM_THREADS=8 torchrun --nproc-per-node 8 pretrain.py data_path=data/maze-30x30-hard-1k "
    "epochs=20000 eval_interval=2000 lr=1e-4 puzzle_emb_lr=1e-4 weight_decay=1.0 puzzle_emb_weight_decay=1.0"
)
SUDOKU_FULL = (
    "OMP_NUM_THREADS=8 torchrun --nproc-per-node 8 pretrain.py data_path=data/sudoku-hard-full epochs=100 "
    "eval_interval=10 lr_min_ratio=0.1 global_batch_size=2304 lr=3e-4 puzzle_emb_lr=3e-4 weight_decay=0.1 "
    "puzzle_emb_weight_decay=0.1 arch.loss.loss_type=softmax_cross_entropy arch.L_cycles=8 arch.halt_max_steps=8 "
    "arch.pos_encodings=learned"
)


def test_defaults_match_reference():
    c = compose_cli(ARC1)
    assert c.data_path == "data/arc-aug-1000"
    assert (c.global_batch_size, c.epochs, c.eval_interval, c.checkpoint_every_eval) == (768, 100000, 10000, True)
    assert (c.lr, c.lr_min_ratio, c.lr_warmup_steps, c.beta1, c.beta2) == (1e-4, 1.0, 2000, 0.9, 0.95)
    assert (c.weight_decay, c.puzzle_emb_weight_decay, c.puzzle_emb_lr) == (0.1, 0.1, 1e-2)
    assert (c.project_name, c.run_name, c.checkpoint_path, c.seed, c.eval_save_outputs) == (None, None, None, 0, [])
    assert c.arch.name == "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1"
    assert c.arch.loss.name == "losses@ACTLossHead"
    assert c.arch.loss.model_extra == {"loss_type": "stablemax_cross_entropy"}
    assert c.arch.model_extra == {
        "halt_exploration_prob": 0.1,
        "halt_max_steps": 16,
        "H_cycles": 2,
        "L_cycles": 2,
        "H_layers": 4,
        "L_layers": 4,
        "hidden_size": 512,
        "num_heads": 8,
        "expansion": 4,
        "puzzle_emb_ndim": 512,
        "pos_encodings": "rope",
    }
    # Additions are off or automatic.
    assert (c.use_wandb, c.compile, c.device, c.resume, c.checkpoint_interval_steps, c.stop_at_step) == (
        True,
        None,
        "auto",
        None,
        None,
        None,
    )


def test_reference_command_lines():
    assert compose_cli(ARC2).data_path == "data/arc-2-aug-1000"
    for line in (SUDOKU, MAZE):
        c = compose_cli(line)
        assert (c.epochs, c.eval_interval, c.lr, c.puzzle_emb_lr, c.weight_decay, c.puzzle_emb_weight_decay) == (
            20000,
            2000,
            1e-4,
            1e-4,
            1.0,
            1.0,
        )
    assert compose_cli(MAZE).data_path == "data/maze-30x30-hard-1k"
    demo = compose_cli(SUDOKU_DEMO)
    assert (demo.global_batch_size, demo.lr, demo.puzzle_emb_lr) == (384, 7e-5, 7e-5)
    full = compose_cli(SUDOKU_FULL)
    assert (full.epochs, full.eval_interval, full.lr_min_ratio, full.global_batch_size, full.lr) == (
        100,
        10,
        0.1,
        2304,
        3e-4,
    )
    assert full.arch.loss.model_extra["loss_type"] == "softmax_cross_entropy"
    extra = full.arch.model_extra
    assert (extra["L_cycles"], extra["halt_max_steps"], extra["pos_encodings"]) == (8, 8, "learned")
    assert extra["H_cycles"] == 2  # untouched keys keep the arch defaults


def test_puzzle_emb_ndim_follows_hidden_size_and_tiny_arch():
    c = compose_cli("python pretrain.py arch.hidden_size=256")
    assert c.arch.model_extra["puzzle_emb_ndim"] == 256
    tiny = compose_cli("python pretrain.py arch=hrm_tiny")
    assert tiny.arch.model_extra["forward_dtype"] == "float32"
    assert tiny.arch.model_extra["puzzle_emb_ndim"] == tiny.arch.model_extra["hidden_size"]


def test_validation_errors_name_the_key():
    base = compose_cli(ARC1).model_dump()
    with pytest.raises(ValueError, match=r"^unknown config key 'foo'$"):
        config_from_dict({**base, "foo": 1})
    with pytest.raises(ValueError, match=r"^config key 'epochs': Input should be a valid integer"):
        config_from_dict({**base, "epochs": "many"})
    with pytest.raises(ValueError, match=r"^config key 'arch.loss.name' is required"):
        config_from_dict({**base, "arch": {"name": "x", "loss": {}}})
    with pytest.raises(ValueError, match=r"^config key 'eval_interval': epochs \(10\) must be divisible"):
        config_from_dict({**base, "epochs": 10, "eval_interval": 3})
    with pytest.raises(ValueError, match=r"^config key 'global_batch_size': must be >= 1"):
        config_from_dict({**base, "global_batch_size": 0})
    # Extra keys under arch are allowed: they go to the model.
    assert config_from_dict({**base, "arch": {**base["arch"], "new_knob": 3}}).arch.model_extra["new_knob"] == 3


@pytest.mark.parametrize(
    "key, bad, good, message",
    [
        ("lr", (-1e-4, math.nan, math.inf), (0.0, 3.0), "must be a finite number >= 0"),
        ("puzzle_emb_lr", (-0.01, math.inf), (0.0,), "must be a finite number >= 0"),
        ("weight_decay", (-0.1, math.nan), (0.0, 1.0), "must be a finite number >= 0"),
        ("puzzle_emb_weight_decay", (-1.0,), (0.0,), "must be a finite number >= 0"),
        ("lr_min_ratio", (-0.1, 1.01, math.nan), (0.0, 1.0), r"must be in \[0, 1\]"),
        ("beta1", (-0.1, 1.0), (0.0, 0.999), r"must be in \[0, 1\)"),
        ("beta2", (1.5, math.nan), (0.0, 0.95), r"must be in \[0, 1\)"),
        ("dist_timeout_s", (0.0, -5.0, math.inf), (0.5,), "must be a finite number > 0"),
    ],
)
def test_optimizer_and_timeout_ranges(key, bad, good, message):
    """Rates and decays may be 0 (that part keeps its weights), never negative or non-finite."""
    base = compose_cli(ARC1).model_dump()
    for value in bad:
        with pytest.raises(ValueError, match=rf"^config key '{key}': {message}, got {value}$"):
            config_from_dict({**base, key: value})
    for value in good:
        assert getattr(config_from_dict({**base, key: value}), key) == value


@pytest.mark.parametrize(
    "override, message",
    [
        ("foo=1", "error: Could not override 'foo': Key 'foo' is not in struct"),
        ("+foo=1", "error: unknown config key 'foo'"),
        ("epochs=abc", "error: config key 'epochs': Input should be a valid integer"),
        ("checkpoint_every_eval=maybe", "error: config key 'checkpoint_every_eval': Input should be a valid boolean"),
    ],
)
def test_command_line_errors_are_one_line_exit_2(override, message, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "pretrain.py"), override],
        cwd=tmp_path,  # also checks that Hydra writes nothing in the working directory
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_names_derived_like_reference():
    c = derive_names(compose_cli(SUDOKU), "HierarchicalReasoningModel_ACTV1", slug=lambda: "brave-owl")
    assert c.project_name == "Sudoku-extreme-1k-aug-1000 ACT-torch"
    assert c.run_name == "HierarchicalReasoningModel_ACTV1 brave-owl"
    assert c.checkpoint_path == os.path.join("checkpoints", c.project_name, c.run_name)
    given = derive_names(compose_cli("python pretrain.py +project_name=P +run_name=R +checkpoint_path=/x"), "M")
    assert (given.project_name, given.run_name, given.checkpoint_path) == ("P", "R", "/x")


def naive_lr(step, base, warmup, total, min_ratio):
    if step < warmup:
        return base * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))))


def test_lr_schedule_endpoints_and_formula():
    kw = dict(base_lr=1e-4, num_warmup_steps=100, num_training_steps=1100, min_ratio=0.1)
    assert cosine_schedule_with_warmup_lr_lambda(0, **kw) == 0.0
    assert cosine_schedule_with_warmup_lr_lambda(50, **kw) == pytest.approx(0.5e-4)
    assert cosine_schedule_with_warmup_lr_lambda(100, **kw) == pytest.approx(1e-4)  # peak right after warmup
    assert cosine_schedule_with_warmup_lr_lambda(600, **kw) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))  # half way
    assert cosine_schedule_with_warmup_lr_lambda(1100, **kw) == pytest.approx(1e-5)  # floor at the end
    for step in range(0, 1300, 37):
        assert cosine_schedule_with_warmup_lr_lambda(step, **kw) == pytest.approx(naive_lr(step, 1e-4, 100, 1100, 0.1))
    # The reference default min_ratio 1.0 is a constant lr after warmup.
    flat = dict(base_lr=2.0, num_warmup_steps=10, num_training_steps=50, min_ratio=1.0)
    assert [cosine_schedule_with_warmup_lr_lambda(s, **flat) for s in (10, 30, 50)] == [2.0, 2.0, 2.0]
    # No warmup: full lr from step 0.
    assert cosine_schedule_with_warmup_lr_lambda(0, base_lr=1.0, num_warmup_steps=0, num_training_steps=10) == 1.0


def test_total_steps_formula():
    c = compose_cli(SUDOKU)  # epochs 20000, global batch 768
    # 1000 groups of 1001 one-example puzzles each (1 original + 1000 augmentations, mean examples 1).
    assert compute_total_steps(c, total_groups=1000, mean_puzzle_examples=1.0) == int(20000 * 1000 / 768)
    assert compute_total_steps(c, total_groups=7, mean_puzzle_examples=2.5) == int(20000 * 7 * 2.5 / 768)


def test_model_config_takes_launcher_values_over_arch_keys():
    """An arch yaml may carry keys the launcher sets itself (e.g. `causal`): the launcher's value wins."""
    from types import SimpleNamespace

    from training.build import model_config_dict

    config = compose_cli("pretrain.py global_batch_size=8 +arch.causal=true +arch.seq_len=5")
    metadata = SimpleNamespace(vocab_size=11, seq_len=81, num_puzzle_identifiers=3)
    values = model_config_dict(config, metadata, world_size=2)
    assert values["causal"] is False and values["seq_len"] == 81
    assert values["batch_size"] == 4 and values["hidden_size"] == config.arch.model_extra["hidden_size"]
