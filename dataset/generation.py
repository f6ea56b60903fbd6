"""Shared driver of the offline puzzle generators: seeding, process pool, CSV output.

Design choices:
- Puzzle `i` of split `s` is generated from its own seed, `SeedSequence([seed, s, i])`, by
  rejection sampling inside that stream, so a file is a pure function of `--seed` and the
  counts: identical for any `--num-workers` and any scheduling of the pool.
- Workers return finished rows in index order (`Pool.imap` with a chunk size), and the parent
  streams them to the CSV, so memory stays flat for any number of puzzles.
- Output layout is the hub files' (`sapientinc/sudoku-extreme`, `maze-30x30-hard-1k`): header line
  `source,question,answer,rating`, then one row per puzzle, so generated and downloaded sources
  are read the same way (the builders take the columns by position in any case).
"""

import csv
import multiprocessing as mp
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

CSV_HEADER = ("source", "question", "answer", "rating")
CSV_FILES = ("train.csv", "test.csv")  # everything a generator writes into its output folder
SPLIT_CODES = {"train": 0, "test": 1}


def puzzle_rng(seed: int, split: str, index: int) -> random.Random:
    """Independent, reproducible stream for one puzzle."""
    state = np.random.SeedSequence([seed, SPLIT_CODES[split], index]).generate_state(2, dtype=np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


def _one(make: Callable[[random.Random], tuple[str, str, int]], seed: int, split: str, index: int):
    q, a, rating = make(puzzle_rng(seed, split, index))
    return q, a, rating


def write_generated_csv(
    path: Path,
    make: Callable[[random.Random], tuple[str, str, int]],
    count: int,
    seed: int,
    split: str,
    num_workers: int,
    source: str,
    pool: "mp.pool.Pool | None" = None,
) -> None:
    """Generate `count` puzzles with `make(rng) -> (q, a, rating)` and write them to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    job = partial(_one, make, seed, split)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        if pool is None or num_workers <= 1:
            rows = map(job, range(count))
        else:
            rows = pool.imap(job, range(count), chunksize=max(1, min(16, count // (4 * num_workers))))
        for q, a, rating in tqdm(rows, total=count, desc=f"{path.name}", unit="puzzle"):
            writer.writerow((source, q, a, rating))


def generate_splits(output_dir: str, make, num_train: int, num_test: int, seed: int, num_workers: int, source: str):
    """Write `train.csv` and `test.csv` into `output_dir` using one shared process pool."""
    if num_train < 1 or num_test < 1:  # a split without rows is not a source the builders accept
        raise ValueError(f"--num-train/--num-test must be >= 1, got {num_train}/{num_test}")
    if num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {num_workers}")
    out = Path(output_dir)
    pool = mp.Pool(num_workers) if num_workers > 1 else None
    try:
        for split, count in (("train", num_train), ("test", num_test)):
            write_generated_csv(out / f"{split}.csv", make, count, seed, split, num_workers, source, pool)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
