"""Shared by the launcher tests: a tiny synthetic puzzle dataset on disk, a tiny composed config, a free port,
a run's metric records."""

import json
import socket
from pathlib import Path

import numpy as np

from dataset.common import PuzzleDatasetMetadata, write_identifiers, write_split
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from utils.config import PretrainConfig, compose_config
from utils.logging_utils import WALL_TIME_KEY

REPO = Path(__file__).resolve().parent.parent
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


def tiny_config(data_path: Path, checkpoint_path: Path, *overrides: str) -> PretrainConfig:
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
    return compose_config([*base, *overrides])


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


def test_tiny_dataset_loads(tmp_path):
    make_tiny_dataset(tmp_path)
    ds = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=0,
            dataset_path=str(tmp_path),
            global_batch_size=4,
            test_set_mode=False,
            epochs_per_iter=1,
            rank=0,
            num_replicas=1,
        )
    )
    batches = list(ds)
    assert len(batches) == 6 // 4  # one group per batch slot, last partial batch dropped
    _, batch, size = batches[0]
    assert size == 4
    np.testing.assert_array_equal(batch["labels"].numpy(), batch["inputs"].numpy()[:, ::-1])
