"""Code the tests share (test files import from here, never from each other): the repository root, a tiny
synthetic puzzle dataset on disk, a tiny composed config, a free port, a run's metric records, the tiny HRM
and TRM models with their batches, the full-size architectures as config/arch/*.yaml defines them, and where the
Triton kernel tests run."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dataset.common import PuzzleDatasetMetadata, write_identifiers, write_split
from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
from models.losses import IGNORE_LABEL_ID
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from models.triton_common import HAS_TRITON
from training.config import PretrainConfig, compose_config
from utils.logging_utils import WALL_TIME_KEY

REPO = Path(__file__).resolve().parent.parent

# The Triton kernel tests run on CUDA when present, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
# set before Python starts), which also checks fp32 inputs; otherwise they skip.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_CUDA = torch.cuda.is_available()
KERNEL = pytest.mark.skipif(
    not HAS_TRITON or not (ON_CUDA or INTERPRET),
    reason="the Triton kernels need Triton plus a CUDA device, or TRITON_INTERPRET=1 for the CPU interpreter",
)
KERNEL_DEVICE = torch.device("cuda" if ON_CUDA and not INTERPRET else "cpu")
KERNEL_DTYPES = [torch.bfloat16, torch.float16] + ([torch.float32] if INTERPRET else [])
SEQ_LEN = 8
VOCAB = 6  # PAD 0, symbols 1..5


def _task(inputs: np.ndarray) -> np.ndarray:
    """Reverse the sequence: learnable, and every position depends on another one."""
    return inputs[:, ::-1].copy()


def make_tiny_dataset(root: Path, *, num_groups: int = 6, aug_per_group: int = 2, num_test: int = 5, seed: int = 0):
    """A dataset in the on-disk format: groups of one-example puzzles, each with its own identifier."""
    rng = np.random.default_rng(seed)
    names = ["<blank>"]

    def split(num_puzzles_per_group: int, groups: int, prefix: str):
        inputs = rng.integers(1, VOCAB, size=(groups * num_puzzles_per_group, SEQ_LEN), dtype=np.uint8)
        identifiers = []
        for g in range(groups):
            for a in range(num_puzzles_per_group):
                names.append(f"{prefix}{g}_a{a}")
                identifiers.append(len(names) - 1)
        n = inputs.shape[0]
        return {
            "inputs": inputs,
            "labels": _task(inputs),
            "puzzle_identifiers": np.array(identifiers, dtype=np.int32),
            "puzzle_indices": np.arange(n + 1, dtype=np.int32),
            "group_indices": np.arange(0, n + 1, num_puzzles_per_group, dtype=np.int32),
        }

    train = split(1 + aug_per_group, num_groups, "g")
    test = split(1, num_test, "test")
    for name, arrays, groups in (("train", train, num_groups), ("test", test, num_test)):
        meta = PuzzleDatasetMetadata(
            pad_id=0,
            ignore_label_id=0,
            blank_identifier_id=0,
            vocab_size=VOCAB,
            seq_len=SEQ_LEN,
            num_puzzle_identifiers=len(names),  # both splits share the train split's identifier space
            total_groups=groups,
            mean_puzzle_examples=1.0,
            total_puzzles=len(arrays["puzzle_identifiers"]),
            sets=["all"],
        )
        write_split(root / name, meta, {"all": arrays})
    write_identifiers(root, names)
    return root


TINY_ARCH = [
    "arch=hrm_tiny",
    "arch.hidden_size=32",
    "arch.num_heads=2",
    "arch.halt_max_steps=3",
    "arch.H_cycles=2",
    "arch.L_cycles=1",
]


def tiny_overrides(data_path: Path, checkpoint_path: Path, *overrides: str) -> list[str]:
    """The command-line overrides of a tiny CPU run (6 steps with the tiny dataset), then `overrides`."""
    base = [
        *TINY_ARCH,
        f"data_path={data_path}",
        f"checkpoint_path={checkpoint_path}",
        "project_name=test",
        "run_name=tiny",
        "global_batch_size=4",
        "epochs=4",
        "eval_interval=2",
        "lr=1e-3",
        "puzzle_emb_lr=1e-2",
        "lr_warmup_steps=2",
        "use_wandb=false",
        "device=cpu",
    ]
    return [*base, *overrides]


def tiny_config(data_path: Path, checkpoint_path: Path, *overrides: str) -> PretrainConfig:
    return compose_config(tiny_overrides(data_path, checkpoint_path, *overrides))


def metric_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl without their wall time, which differs from run to run (each record must
    have one, never less than the previous record's)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    times = [record.pop(WALL_TIME_KEY) for record in records]
    assert times == sorted(times), f"{path}: wall times go back"
    return records


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT and rendezvous endpoints)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arch_config(name: str, **keys) -> dict:
    """The model config of config/arch/`name`.yaml (interpolations resolved), without its `name` and `loss`,
    plus `keys` (the dataset's shape and what the launcher adds)."""
    arch = OmegaConf.to_container(OmegaConf.load(REPO / "config" / "arch" / f"{name}.yaml"), resolve=True)
    return {k: v for k, v in arch.items() if k not in ("name", "loss")} | keys


# ---------------------------------------------------------------- tiny HRM and TRM models


def hrm_tiny_config(**overrides) -> dict:
    cfg = dict(
        batch_size=4,
        seq_len=6,
        vocab_size=7,
        num_puzzle_identifiers=5,
        puzzle_emb_ndim=16,
        H_cycles=2,
        L_cycles=2,
        H_layers=1,
        L_layers=1,
        hidden_size=16,
        num_heads=2,
        expansion=2,
        pos_encodings="rope",
        halt_max_steps=4,
        halt_exploration_prob=0.0,
        forward_dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def hrm_make_batch(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, s = cfg["batch_size"], cfg["seq_len"]
    return dict(
        inputs=torch.randint(0, cfg["vocab_size"], (b, s), generator=g, dtype=torch.int32),
        labels=torch.randint(0, cfg["vocab_size"], (b, s), generator=g, dtype=torch.int32),
        puzzle_identifiers=torch.randint(0, cfg["num_puzzle_identifiers"], (b,), generator=g, dtype=torch.int32),
    )


def hrm_build(cfg: dict, seed: int = 0) -> HierarchicalReasoningModel_ACTV1:
    torch.manual_seed(seed)
    return HierarchicalReasoningModel_ACTV1(cfg)


# TRM: two prefix rows, one label-free start in row 0


def trm_tiny_config(**overrides) -> dict:
    cfg = dict(
        batch_size=4,
        seq_len=6,
        vocab_size=7,
        num_puzzle_identifiers=5,
        puzzle_emb_ndim=16,
        H_cycles=2,
        L_cycles=2,
        H_layers=0,
        L_layers=2,
        hidden_size=16,
        num_heads=2,
        expansion=2,
        pos_encodings="rope",
        halt_max_steps=4,
        halt_exploration_prob=0.0,
        forward_dtype="float32",
        puzzle_emb_len=2,
    )
    cfg.update(overrides)
    return cfg


def trm_make_batch(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, s = cfg["batch_size"], cfg["seq_len"]
    labels = torch.randint(0, cfg["vocab_size"], (b, s), generator=g, dtype=torch.int32)
    labels[0, :2] = IGNORE_LABEL_ID
    return dict(
        inputs=torch.randint(0, cfg["vocab_size"], (b, s), generator=g, dtype=torch.int32),
        labels=labels,
        puzzle_identifiers=torch.randint(0, cfg["num_puzzle_identifiers"], (b,), generator=g, dtype=torch.int32),
    )


def trm_build(cfg: dict, seed: int = 0) -> TinyRecursiveReasoningModel_ACTV1:
    torch.manual_seed(seed)
    return TinyRecursiveReasoningModel_ACTV1(cfg)


def randomise(model, seed: int = 1) -> None:
    """Non-trivial Q head and puzzle table (their init is zero), so Q, halting and the prefix matter."""
    g = torch.Generator().manual_seed(seed)
    inner = model.inner
    with torch.no_grad():
        inner.q_head.weight.copy_(torch.randn(inner.q_head.weight.shape, generator=g) * 0.5)
        inner.q_head.bias.copy_(torch.tensor([0.1, -0.2]))
        if hasattr(inner, "puzzle_emb"):
            inner.puzzle_emb.weights.copy_(torch.randn(inner.puzzle_emb.weights.shape, generator=g))


def set_q_bias(model, bias: tuple[float, float]) -> None:
    with torch.no_grad():
        model.inner.q_head.weight.zero_()
        model.inner.q_head.bias.copy_(torch.tensor(bias))


def run_steps(model, batch, n):
    carry = model.initial_carry(batch)
    history = []
    for _ in range(n):
        carry, out = model(carry, batch)
        history.append((carry, out))
    return history


# ---------------------------------------------------------------- a 2-rank torchrun training run

# Each rank runs the real command-line entry point; `train` is wrapped only to dump that rank's final weights.
TWO_RANK_DRIVER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {repo!r})
    import pretrain

    original_train = pretrain.train

    def train_and_dump(config, info, logger=None):
        state = original_train(config, info, logger)
        torch.save(state.model.state_dict(), f"{out}/rank{{info.rank}}.pt")
        torch.save({{"step": state.step, "config": config.model_dump()}}, f"{out}/meta{{info.rank}}.pt")
        return state

    pretrain.train = train_and_dump
    pretrain.main()
    """
)


def run_two_rank_training(tmp_path, overrides: list[str]) -> tuple[dict, dict, dict, dict]:
    """`pretrain.py OVERRIDES` under torchrun with 2 gloo ranks; returns (rank0, rank1) final state dicts and
    (meta0, meta1) = each rank's final step and config."""
    out = tmp_path / "out"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(TWO_RANK_DRIVER.format(repo=str(REPO), out=str(out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd + overrides, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    meta0, meta1 = (torch.load(out / f"meta{r}.pt", weights_only=False) for r in (0, 1))
    return rank0, rank1, meta0, meta1
