"""Puzzle dataset loader (dataset/common.py's format): group-balanced training batches, in-order test batches.

Design choices:
- `dataset.json` of the split is read in the constructor (the launcher needs `.metadata`
  before iterating); every array is opened lazily on the first `__iter__`, i.e. inside the
  DataLoader worker. `inputs`/`labels` are memory-mapped (`mmap_mode="r"`): only the rows of
  a batch are ever read. The small index arrays are loaded into memory and validated against
  `dataset.json` (lengths, monotone offsets, seq_len) when opened. The constructor opens and
  checks them once too, in the caller's process, so a malformed or empty split is one clear
  error before any worker starts; it also range-checks the token ids of every row of every set
  (against `vocab_size`, `dataset.common.validate_token_ids`), one vectorised pass over the memory
  maps, so a bad id stops the run before its first step, not when (or if) its row is sampled.
  It also checks that `total_groups` and `mean_puzzle_examples`, from which the launcher derives the
  number of steps, agree with the arrays. The worker's own open repeats the cheap checks only.
- Training sampling follows the reference exactly, except that the choice of a puzzle's
  examples also uses the Philox generator (the reference draws it from NumPy's global RNG,
  which is not seeded from the config), so one `(seed, iteration)` fixes every batch and a
  run can resume mid-iteration: `set_position(iters, batches_done)` replays the sampling of
  the skipped batches (index arithmetic only, no reading of inputs/labels).
- A global batch is built identically on every rank; rank r keeps the contiguous slice
  `[r * local, (r + 1) * local)`, so the replicas together see exactly the global batch.
- Several datasets (TRM's `dataset_paths`) load as one: the set `S` of the i-th dataset is the set
  `S` for i = 0 and `S{i}` after (TRM's names), listed in that order in `metadata.sets` and iterated
  in it, each with its own Philox stream, as TRM does. They must agree on vocabulary, sequence length,
  pad / ignore / blank ids and set names; groups, puzzles and identifiers add up, and the mean puzzle
  size is weighted by puzzles. `identifier_offsets` (one per dataset; the launcher chooses them, see
  training/build.py) are added to each dataset's non-blank identifiers, so datasets each numbered from 1
  keep apart in the puzzle-embedding table.
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from pydantic import BaseModel
from torch.utils.data import IterableDataset, get_worker_info

from dataset.common import (
    EXAMPLE_FIELDS,
    FIELDS,
    PuzzleDatasetMetadata,
    load_metadata,
    load_npy,
    split_paths,
    validate_split_arrays,
    validate_split_totals,
    validate_token_ids,
)
from models.losses import IGNORE_LABEL_ID


class PuzzleDatasetConfig(BaseModel):
    seed: int
    dataset_path: Optional[str] = None  # the reference's single dataset ...
    dataset_paths: list[str] = []  # ... or TRM's list, loaded as one
    identifier_offsets: Optional[list[int]] = None  # per dataset of `dataset_paths`; None: all 0 (TRM)
    global_batch_size: int
    test_set_mode: bool
    epochs_per_iter: int  # training epochs packed into one iteration (one `__iter__`)
    rank: int
    num_replicas: int

    def paths(self) -> list[str]:
        if (self.dataset_path is None) == (not self.dataset_paths):
            raise ValueError("PuzzleDatasetConfig: give dataset_path or dataset_paths (a non-empty list), not both")
        return list(self.dataset_paths) if self.dataset_paths else [self.dataset_path]  # type: ignore[list-item]


# How tokens and padding are encoded: every split one model reads must agree on these.
ENCODING_FIELDS = ("pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len")
SHARED_FIELDS = (*ENCODING_FIELDS, "sets")  # and datasets loaded together on their set names


def check_fields_agree(
    meta: PuzzleDatasetMetadata,
    split_dir: Path,
    reference: PuzzleDatasetMetadata,
    reference_dir: Path,
    fields,
    why: str,
) -> None:
    """One ValueError line naming both dataset.json files and the first of `fields` on which they differ."""
    for field in fields:
        if getattr(meta, field) != getattr(reference, field):
            raise ValueError(
                f"{Path(split_dir) / 'dataset.json'}: field '{field}' is {getattr(meta, field)!r}, but "
                f"{Path(reference_dir) / 'dataset.json'} has {getattr(reference, field)!r}: {why}"
            )


def merge_metadata(metas: list[PuzzleDatasetMetadata], puzzle_counts: list[int], where: list[Path]):
    """One metadata for several datasets (TRM's merge); a single dataset's is returned unchanged."""
    if len(metas) == 1:
        return metas[0]
    first = metas[0]
    for meta, path in zip(metas[1:], where[1:]):
        check_fields_agree(meta, path, first, where[0], SHARED_FIELDS, "datasets trained together must agree")
    puzzles = [m.total_puzzles if m.total_puzzles is not None else n for m, n in zip(metas, puzzle_counts)]
    return first.model_copy(
        update={
            "num_puzzle_identifiers": sum(m.num_puzzle_identifiers for m in metas),
            "total_groups": sum(m.total_groups for m in metas),
            "total_puzzles": sum(puzzles),
            "mean_puzzle_examples": sum(m.mean_puzzle_examples * n for m, n in zip(metas, puzzles))
            / max(1, sum(puzzles)),
            "sets": [set_name + (str(i) if i else "") for set_name in first.sets for i in range(len(metas))],
        }
    )


def sample_global_batch(
    rng: np.random.Generator,
    group_order: np.ndarray,
    puzzle_indices: np.ndarray,
    group_indices: np.ndarray,
    start: int,
    global_batch_size: int,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Fill one global batch by walking `group_order` from `start`.

    For each group: one of its puzzles uniformly, then `min(puzzle size, room left)` of that
    puzzle's examples without replacement. Returns (next start, example ids, puzzle ids); the
    batch is short only when the order runs out.
    """
    examples, puzzles = [], []
    size = 0
    while start < group_order.size and size < global_batch_size:
        group = group_order[start]
        start += 1
        puzzle = rng.integers(group_indices[group], group_indices[group + 1])
        first = puzzle_indices[puzzle]
        puzzle_size = int(puzzle_indices[puzzle + 1] - first)
        take = min(puzzle_size, global_batch_size - size)
        examples.append(first + rng.choice(puzzle_size, take, replace=False))
        puzzles.append(np.full(take, puzzle, dtype=np.int64))
        size += take
    if not examples:
        return start, np.zeros(0, np.int64), np.zeros(0, np.int64)
    return start, np.concatenate(examples), np.concatenate(puzzles)


class PuzzleDataset(IterableDataset):
    def __init__(self, config: PuzzleDatasetConfig, split: str = "train"):
        super().__init__()
        self.config = config
        self.split = split
        if config.num_replicas <= 0 or not 0 <= config.rank < config.num_replicas:
            raise ValueError(f"rank {config.rank} / num_replicas {config.num_replicas}: invalid replica layout")
        if config.global_batch_size <= 0 or config.global_batch_size % config.num_replicas != 0:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} must be a positive multiple of "
                f"num_replicas {config.num_replicas}"
            )
        if config.epochs_per_iter <= 0:
            raise ValueError(f"epochs_per_iter must be positive, got {config.epochs_per_iter}")
        self.local_batch_size = config.global_batch_size // config.num_replicas
        paths = config.paths()
        offsets = config.identifier_offsets if config.identifier_offsets is not None else [0] * len(paths)
        if len(offsets) != len(paths) or any(o < 0 for o in offsets):
            raise ValueError(f"identifier_offsets {offsets}: expected {len(paths)} offsets >= 0, one per dataset")
        self.split_dirs = [Path(p) / split for p in paths]
        self.split_dir = self.split_dirs[0]
        self.source_metadata = [load_metadata(d) for d in self.split_dirs]
        # Loaded set name -> (dataset index, its set name, identifier offset), in iteration order (TRM's).
        self.set_sources = {
            set_name + (str(i) if i else ""): (i, set_name, offsets[i])
            for set_name in self.source_metadata[0].sets
            for i in range(len(paths))
        }
        for split_dir, meta in zip(self.split_dirs, self.source_metadata):
            for set_name in meta.sets:
                for path in split_paths(split_dir, set_name).values():
                    if not path.is_file():
                        raise FileNotFoundError(f"{path}: array file listed by {split_dir / 'dataset.json'} is missing")
        opened = [self._open_source(i) for i in range(len(paths))]
        for split_dir, meta, sets in zip(self.split_dirs, self.source_metadata, opened):
            sizes = {name: arrays["inputs"].shape[0] for name, arrays in sets.items()}
            if sum(sizes.values()) == 0:
                raise ValueError(f"{split_dir}: the {split} split has no examples (sets {', '.join(sizes)})")
            validate_split_totals(split_dir, meta, sets)
            for set_name, arrays in sets.items():
                validate_token_ids(split_dir, set_name, meta, arrays)
        counts = [sum(a["puzzle_identifiers"].size for a in sets.values()) for sets in opened]
        self.metadata: PuzzleDatasetMetadata = merge_metadata(self.source_metadata, counts, self.split_dirs)
        # Shifted identifiers (a test dataset shifted as in training) must fit the identifier count.
        reach = max(o + m.num_puzzle_identifiers for o, m in zip(offsets, self.source_metadata))
        if reach > self.metadata.num_puzzle_identifiers:
            self.metadata = self.metadata.model_copy(update={"num_puzzle_identifiers": reach})
        del opened  # unmap: the worker opens its own
        self._data: dict[str, dict[str, np.ndarray]] | None = None
        self._iters = 0  # train iterations started so far, counted per set (the Philox seed offset)
        self._skip_batches = 0

    @property
    def iters(self) -> int:
        return self._iters

    def set_position(self, iters: int, batches_done: int) -> None:
        """Make the next `__iter__` continue an interrupted run (train mode only).

        `iters`: iterations completed before the interrupted one (the next uses Philox seed
        `seed + (iters + 1)` for a single-set dataset); `batches_done`: batches of that
        iteration already consumed, which are skipped without reading inputs/labels.
        """
        if iters < 0 or batches_done < 0:
            raise ValueError(f"set_position: iters ({iters}) and batches_done ({batches_done}) must be >= 0")
        self._iters = iters * len(self.set_sources)
        self._skip_batches = batches_done

    def _lazy_load(self) -> None:
        if self._data is None:
            self._data = self._open_arrays()

    def _open_source(self, index: int) -> dict[str, dict[str, np.ndarray]]:
        """Every set of one dataset, validated against its own dataset.json (identifiers not yet offset)."""
        split_dir, meta = self.split_dirs[index], self.source_metadata[index]
        data = {}
        for set_name in meta.sets:
            arrays = {}
            for field, path in split_paths(split_dir, set_name).items():
                arrays[field] = load_npy(path, mmap=field in EXAMPLE_FIELDS)
            validate_split_arrays(split_dir, set_name, meta, arrays)
            data[set_name] = {field: arrays[field] for field in FIELDS}
        return data

    def _open_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        sources = [self._open_source(i) for i in range(len(self.split_dirs))]
        data = {}
        blank = self.metadata.blank_identifier_id
        for name, (index, set_name, offset) in self.set_sources.items():
            arrays = dict(sources[index][set_name])
            if offset:  # index arrays are in memory: shift the non-blank identifiers of this dataset
                ids = arrays["puzzle_identifiers"]
                arrays["puzzle_identifiers"] = np.where(ids == blank, ids, ids + offset).astype(ids.dtype)
            data[name] = arrays
        return data

    def _collate(self, inputs: np.ndarray, labels: np.ndarray, identifiers: np.ndarray) -> dict[str, torch.Tensor]:
        batch = {
            "inputs": inputs.astype(np.int32),
            "labels": labels.astype(np.int32),
            "puzzle_identifiers": identifiers.astype(np.int32),
        }
        if self.metadata.ignore_label_id is not None:
            batch["labels"][batch["labels"] == self.metadata.ignore_label_id] = IGNORE_LABEL_ID
        missing = self.local_batch_size - batch["puzzle_identifiers"].shape[0]
        if missing > 0:
            pad_values = {
                "inputs": self.metadata.pad_id,
                "labels": IGNORE_LABEL_ID,
                "puzzle_identifiers": self.metadata.blank_identifier_id,
            }
            batch = {
                k: np.pad(v, ((0, missing),) + ((0, 0),) * (v.ndim - 1), constant_values=pad_values[k])
                for k, v in batch.items()
            }
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def _iter_train(self):
        cfg = self.config
        skip, self._skip_batches = self._skip_batches, 0
        for set_name, data in self._data.items():
            self._iters += 1
            rng = np.random.Generator(np.random.Philox(seed=cfg.seed + self._iters))
            num_groups = data["group_indices"].size - 1
            group_order = np.concatenate([rng.permutation(num_groups) for _ in range(cfg.epochs_per_iter)])
            start = 0
            while start < group_order.size:
                start, examples, puzzles = sample_global_batch(
                    rng, group_order, data["puzzle_indices"], data["group_indices"], start, cfg.global_batch_size
                )
                global_effective_batch_size = puzzles.size
                if global_effective_batch_size < cfg.global_batch_size:
                    break  # drop last
                if skip > 0:
                    skip -= 1
                    continue
                lo, hi = cfg.rank * self.local_batch_size, (cfg.rank + 1) * self.local_batch_size
                examples, puzzles = examples[lo:hi], puzzles[lo:hi]
                # Sorted, unique row ids read a memory map faster; restore the sampled order after.
                rows, inverse = np.unique(examples, return_inverse=True)
                inputs, labels = data["inputs"][rows], data["labels"][rows]
                batch = self._collate(inputs[inverse], labels[inverse], data["puzzle_identifiers"][puzzles])
                yield set_name, batch, global_effective_batch_size

    def _iter_test(self):
        cfg = self.config
        for set_name, data in self._data.items():
            total = data["inputs"].shape[0]
            offsets = data["puzzle_indices"]
            for start in range(0, total, cfg.global_batch_size):
                end = min(total, start + cfg.global_batch_size)
                lo = min(start + cfg.rank * self.local_batch_size, end)
                hi = min(start + (cfg.rank + 1) * self.local_batch_size, end)
                # Puzzle of example i: the last puzzle whose first example is <= i.
                puzzles = np.searchsorted(offsets, np.arange(lo, hi), side="right") - 1
                inputs, labels = data["inputs"][lo:hi], data["labels"][lo:hi]
                batch = self._collate(inputs, labels, data["puzzle_identifiers"][puzzles])
                yield set_name, batch, end - start

    def __iter__(self):
        worker = get_worker_info()
        if worker is not None and worker.num_workers != 1:
            raise ValueError(f"PuzzleDataset supports one DataLoader worker, got num_workers={worker.num_workers}")
        self._lazy_load()
        if self.config.test_set_mode:
            yield from self._iter_test()
        else:
            yield from self._iter_train()
