"""A run's pieces built from its config: data loaders and the model (loss head around the ACT model).

Shared by both launchers: pretrain.py builds them to train, evaluate.py to evaluate a checkpoint with
exactly the loaders and model its run trained.

Design choices:
- The model is created on its device and then broadcast from rank 0, so every rank starts identical;
  `vocab_size`, `seq_len` and `num_puzzle_identifiers` come from the train split's metadata, the
  per-rank batch from `global_batch_size / world_size` (and `grad_accum_steps`).
- `torch.compile` is on for CUDA unless disabled (the reference's env `DISABLE_COMPILE` too), off on CPU.
- Loaders use one worker with prefetching and, on CUDA, pinned memory (SPEC §8); the worker's seed
  comes from a private generator, so building a loader never draws from the global RNG (a resumed
  run's ACT exploration noise would drift otherwise).
"""

import inspect
import os
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from utils.config import PretrainConfig
from utils.distributed import DistInfo, broadcast_module_state


def create_dataloader(config: PretrainConfig, split: str, info: DistInfo, *, test_set_mode: bool, epochs: int):
    """(dataset, loader) for one split; the dataset is returned too, for its metadata and `set_position`."""
    from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig

    dataset = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=config.seed,
            dataset_path=config.data_path,
            global_batch_size=config.global_batch_size,
            test_set_mode=test_set_mode,
            epochs_per_iter=epochs,
            rank=info.rank,
            num_replicas=info.world_size,
        ),
        split=split,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=1,
        prefetch_factor=8,
        pin_memory=info.device.type == "cuda",
        persistent_workers=True,
        generator=torch.Generator(),
    )
    return dataset, loader


def use_compile(config: PretrainConfig, device: torch.device) -> bool:
    if "DISABLE_COMPILE" in os.environ:
        return False
    return config.compile if config.compile is not None else device.type == "cuda"


def model_config_dict(config: PretrainConfig, metadata: Any, world_size: int) -> dict[str, Any]:
    if config.global_batch_size % world_size != 0:
        raise ValueError(
            f"config key 'global_batch_size': {config.global_batch_size} is not divisible by the world size {world_size}"
        )
    local_batch_size = config.global_batch_size // world_size
    if local_batch_size % config.grad_accum_steps != 0:
        raise ValueError(
            f"config key 'grad_accum_steps': the per-rank batch {local_batch_size} is not divisible by {config.grad_accum_steps}"
        )
    # The launcher's values win over same-named arch keys (an arch yaml may carry `causal` for other uses).
    return {
        **(config.arch.model_extra or {}),
        "batch_size": local_batch_size // config.grad_accum_steps,  # the model sees one micro-batch at a time
        "vocab_size": metadata.vocab_size,
        "seq_len": metadata.seq_len,
        "num_puzzle_identifiers": metadata.num_puzzle_identifiers,
        "causal": False,  # puzzles are read as a whole
    }


def create_model(config: PretrainConfig, metadata: Any, info: DistInfo) -> tuple[nn.Module, list[str]]:
    """The loss head wrapping the model, identical on every rank; also returns the source files to archive."""
    from utils.functions import load_model_class

    model_cls = load_model_class(config.arch.name)
    loss_head_cls = load_model_class(config.arch.loss.name)
    with torch.device(info.device):
        model = model_cls(model_config_dict(config, metadata, info.world_size))
        head = loss_head_cls(model, **(config.arch.loss.model_extra or {}))
    broadcast_module_state(head)
    sources = [inspect.getsourcefile(model_cls) or "", inspect.getsourcefile(loss_head_cls) or ""]
    return head, sources


def print_backends(info: DistInfo) -> None:
    from models.layers import ATTENTION_BACKEND
    from utils.optimizers import ADAM_ATAN2_BACKEND

    if info.is_main:
        print(
            f"device {info.device} x{info.world_size}, attention {ATTENTION_BACKEND}, AdamATan2 {ADAM_ATAN2_BACKEND}",
            file=sys.stderr,
        )
