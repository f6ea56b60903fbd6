"""Build the Maze dataset (the reference's format) from `train.csv`/`test.csv` (hub id or local folder).

    python dataset/build_maze_dataset.py --output-dir data/maze-30x30-hard-1k [--aug]

Design choices:
- Tokens: PAD 0 and the charset `# SGo` (wall, open, start, goal, path) as 1..5; the grid side
  is taken from the first row (it must be square) and `seq_len` is its number of cells.
- `--aug` adds the 8 dihedral transforms of every train maze (the identity first) as one
  group; the test split is never augmented. Each example is its own puzzle, identifier 0.
- Same streaming path as the Sudoku builder: compact uint8 arrays, output streamed
  in chunks (`NpyWriter`); `--subsample-size` draws from `--seed`.
"""

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python dataset/build_maze_dataset.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset.cli import run_cli  # noqa: E402
from dataset.common import (  # noqa: E402
    BLANK_IDENTIFIER_NAME,
    INDEX_DTYPE,
    TOKEN_DTYPE,
    NpyWriter,
    PuzzleDatasetMetadata,
    dihedral_transform,
    split_paths,
    write_identifiers,
    write_split,
)
from dataset.csv_source import lookup_table, read_grid_csv, resolve_source, subsample_rows  # noqa: E402

CHARSET = "# SGo"
SET_NAME = "all"
CHUNK_ROWS = 1 << 14
TABLE = lookup_table({ch: i + 1 for i, ch in enumerate(CHARSET)})


class MazeBuildConfig(BaseModel):
    """Build the Maze dataset from source CSVs."""

    source_repo: str = Field(
        "sapientinc/maze-30x30-hard-1k", description="hub dataset id, or a folder with train.csv/test.csv"
    )
    output_dir: str = Field("data/maze-30x30-hard-1k", description="output dataset folder")
    subsample_size: int | None = Field(None, description="keep this many random train mazes")
    aug: bool = Field(False, description="add the 8 dihedral transforms of every train maze")
    seed: int = Field(0, ge=0, description="seed for the subsample")


def build_split(split_dir: Path, q: np.ndarray, a: np.ndarray, side: int, aug: bool) -> int:
    n, cells = q.shape
    per_group = 8 if aug else 1
    total = n * per_group
    if total >= np.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"{split_dir}: {total} examples exceed the int32 index range")
    split_dir.mkdir(parents=True, exist_ok=True)
    paths = split_paths(split_dir, SET_NAME)
    out = {field: NpyWriter(paths[field], TOKEN_DTYPE, (total, cells)) for field in ("inputs", "labels")}
    step = max(1, CHUNK_ROWS // per_group)
    for lo in tqdm(range(0, n, step), desc=split_dir.name, unit="chunk"):
        hi = min(n, lo + step)
        for field, src in (("inputs", q), ("labels", a)):
            grids = src[lo:hi].reshape(hi - lo, side, side)  # [mazes, side, side]
            variants = np.stack(
                [dihedral_transform(grids, t) for t in range(per_group)], axis=1
            )  # [mazes, aug, side, side]
            out[field].write(variants.reshape(-1, cells))
    arrays = {
        **{field: writer.close() for field, writer in out.items()},
        "puzzle_identifiers": np.zeros(total, dtype=INDEX_DTYPE),
        "puzzle_indices": np.arange(total + 1, dtype=INDEX_DTYPE),
        "group_indices": np.arange(0, total + 1, per_group, dtype=INDEX_DTYPE),
    }
    meta = PuzzleDatasetMetadata(
        pad_id=0,
        ignore_label_id=0,
        blank_identifier_id=0,
        vocab_size=len(CHARSET) + 1,
        seq_len=cells,
        num_puzzle_identifiers=1,
        total_groups=n,
        mean_puzzle_examples=1.0,
        total_puzzles=total,
        sets=[SET_NAME],
    )
    write_split(split_dir, meta, {SET_NAME: arrays})
    return n


def main(config: MazeBuildConfig) -> None:
    """Build the Maze dataset (train/, test/, identifiers.json) from train.csv/test.csv of a hub id or local folder."""
    rng = np.random.default_rng(config.seed)
    cells = None
    for split in ("train", "test"):
        csv_path = resolve_source(config.source_repo, f"{split}.csv")
        # The first train row sets the grid (its own line is named if it is not square); test rows must match it.
        q, a, _ = read_grid_csv(csv_path, TABLE, TABLE, cells=cells, square=True)
        cells = q.shape[1]
        side = math.isqrt(cells)
        if split == "train":
            rows = subsample_rows(q.shape[0], config.subsample_size, rng)
            if rows.size < q.shape[0]:  # copy only when actually subsampling
                q, a = q[rows], a[rows]
        groups = build_split(Path(config.output_dir) / split, q, a, side, config.aug and split == "train")
        print(f"{split}: {groups} mazes from {csv_path}")
    write_identifiers(Path(config.output_dir), [BLANK_IDENTIFIER_NAME])


def command_line() -> int:
    """`python dataset/build_maze_dataset.py ...` and `hrm-build-maze ...`: flags, one-line errors, the exit status."""
    return run_cli(main, MazeBuildConfig)


if __name__ == "__main__":
    sys.exit(command_line())
