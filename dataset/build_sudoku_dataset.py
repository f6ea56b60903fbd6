"""Build the Sudoku dataset (the reference's format) from `train.csv`/`test.csv` (hub id or local folder).

    python dataset/build_sudoku_dataset.py --output-dir data/sudoku-extreme-1k-aug-1000 --subsample-size 1000 --num-aug 1000
    python dataset/build_sudoku_dataset.py --source-repo data/sudoku6-gen --output-dir data/sudoku6-aug-7 --size 6 --num-aug 7

Design choices:
- Tokens: PAD 0, blank 1, digit d -> d + 1; one group per source puzzle (original first, then
  its `--num-aug` augmentations), each a one-example puzzle with identifier 0.
- An augmentation relabels digits 1..9 (blank fixed), optionally transposes, and permutes the
  three bands, the rows within each band, the three stacks and the columns within each stack;
  puzzle and solution get the same transform, so validity and uniqueness are preserved.
- `--size 6` or `--size 4` reads the generator's smaller grids (boxes of 2x3 or 2x2 cells, digits
  1..size). The same symmetries apply with the box shape's bands and stacks (6x6: three bands of
  two rows, two stacks of three columns), except the transpose where boxes are not square: it
  would turn 2x3 boxes into 3x2 ones. For size 9 the random draws are unchanged, so are the files.
- Streaming: the CSV becomes two compact uint8 arrays (`dataset.csv_source`), and the output
  arrays are streamed to the .npy files in chunks (`NpyWriter`), vectorised over all the
  augmentations of a chunk, so a million-row file never holds a Python object per cell.
- Randomness (subsample, augmentations) comes from `--seed` (the reference uses NumPy's
  unseeded global RNG here, so its output differs run to run).
"""

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python dataset/build_sudoku_dataset.py`: make the repo root importable
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
    split_paths,
    write_identifiers,
    write_split,
)
from dataset.csv_source import first_row_where, lookup_table, read_grid_csv, resolve_source, subsample_rows  # noqa: E402
from dataset.generate_sudoku import BOX_SHAPES  # noqa: E402  # grid side -> box shape: one table for both

SET_NAME = "all"
CHUNK_ROWS = 1 << 16  # output rows per vectorised chunk


def digit_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables of the puzzle (blank `.` or `0`, digits 1..size) and solution (digits only) characters."""
    digits = {str(d): d for d in range(1, size + 1)}
    return lookup_table({".": 0, "0": 0, **digits}), lookup_table(digits)


class SudokuBuildConfig(BaseModel):
    """Build the Sudoku dataset from source CSVs."""

    source_repo: str = Field(
        "sapientinc/sudoku-extreme", description="hub dataset id, or a folder with train.csv/test.csv"
    )
    output_dir: str = Field("data/sudoku-extreme-full", description="output dataset folder")
    subsample_size: int | None = Field(None, description="keep this many random train puzzles")
    min_difficulty: int | None = Field(None, description="keep only puzzles with rating >= this")
    num_aug: int = Field(0, description="augmented copies per train puzzle")
    size: int = Field(9, description="grid side of the source puzzles: 9, 6 (2x3 boxes) or 4 (2x2 boxes)")
    seed: int = Field(0, ge=0, description="seed for the subsample and the augmentations")


def random_augmentations(rng: np.random.Generator, count: int, size: int = 9) -> dict[str, np.ndarray]:
    """`count` random Sudoku symmetries: digit map [count, size + 1] (0 fixed), transpose flags,
    row and column permutations [count, size] (band/row-in-band and stack/column-in-stack)."""
    box_rows, box_cols = BOX_SHAPES[size]
    digit_map = np.zeros((count, size + 1), dtype=np.uint8)
    digit_map[:, 1:] = rng.permuted(np.tile(np.arange(1, size + 1, dtype=np.uint8), (count, 1)), axis=1)

    def line_perm(block: int):  # `block` lines per band (rows) or stack (columns)
        groups = size // block
        blocks = rng.permuted(np.tile(np.arange(groups), (count, 1)), axis=1)  # [count, groups]
        within = rng.permuted(np.tile(np.arange(block), (count, groups, 1)), axis=2)  # [count, groups, block]
        return (blocks[:, :, None] * block + within).reshape(count, size)  # [count, size]

    # Only square boxes survive a transpose; drawn first, as it always was for 9x9.
    transpose = rng.random(count) < 0.5 if box_rows == box_cols else np.zeros(count, dtype=bool)
    return {"digit_map": digit_map, "transpose": transpose, "rows": line_perm(box_rows), "cols": line_perm(box_cols)}


def move_cells(boards: np.ndarray, aug: dict[str, np.ndarray]) -> np.ndarray:
    """The cell moves of augmentation k (transpose, rows, columns) applied to `boards[k]` ([K, n, n]), values kept."""
    count, size = boards.shape[:2]
    k = np.arange(count)
    boards = np.where(aug["transpose"][:, None, None], boards.transpose(0, 2, 1), boards)
    boards = boards[k[:, None], aug["rows"]]  # new row i = old row rows[i]
    return boards[k[:, None, None], np.arange(size)[None, :, None], aug["cols"][:, None, :]]


def apply_augmentations(boards: np.ndarray, aug: dict[str, np.ndarray]) -> np.ndarray:
    """Apply augmentation k to `boards[k]` ([K, n, n] values 0..n); returns [K, n, n]."""
    count, size = boards.shape[:2]
    moved = move_cells(boards, aug).reshape(count, -1)
    return np.take_along_axis(aug["digit_map"], moved, axis=1).reshape(count, size, size)


def build_split(split_dir: Path, q: np.ndarray, a: np.ndarray, num_aug: int, rng: np.random.Generator) -> int:
    """Write one split's arrays (q, a: [N, size * size]); returns the number of groups."""
    n, cells = q.shape
    size = math.isqrt(cells)
    per_group = 1 + num_aug
    total = n * per_group
    if total >= np.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"{split_dir}: {total} examples exceed the int32 index range")
    split_dir.mkdir(parents=True, exist_ok=True)
    paths = split_paths(split_dir, SET_NAME)
    out = {field: NpyWriter(paths[field], TOKEN_DTYPE, (total, cells)) for field in ("inputs", "labels")}
    puzzles_per_chunk = max(1, CHUNK_ROWS // per_group)
    for lo in tqdm(range(0, n, puzzles_per_chunk), desc=split_dir.name, unit="chunk"):
        hi = min(n, lo + puzzles_per_chunk)
        pq = q[lo:hi].reshape(-1, size, size)
        pa = a[lo:hi].reshape(-1, size, size)
        block_q = np.empty((hi - lo, per_group, size, size), dtype=np.uint8)  # [puzzles, 1 + aug, size, size]
        block_a = np.empty_like(block_q)
        block_q[:, 0], block_a[:, 0] = pq, pa
        if num_aug:
            aug = random_augmentations(rng, (hi - lo) * num_aug, size)
            rep_q = np.repeat(pq, num_aug, axis=0)  # [puzzles * aug, size, size], puzzle-major
            rep_a = np.repeat(pa, num_aug, axis=0)
            block_q[:, 1:] = apply_augmentations(rep_q, aug).reshape(hi - lo, num_aug, size, size)
            block_a[:, 1:] = apply_augmentations(rep_a, aug).reshape(hi - lo, num_aug, size, size)
        out["inputs"].write(block_q.reshape(-1, cells) + 1)
        out["labels"].write(block_a.reshape(-1, cells) + 1)
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
        vocab_size=size + 2,  # PAD, blank, digits
        seq_len=cells,
        num_puzzle_identifiers=1,
        total_groups=n,
        mean_puzzle_examples=1.0,
        total_puzzles=total,
        sets=[SET_NAME],
    )
    write_split(split_dir, meta, {SET_NAME: arrays})
    return n


def main(config: SudokuBuildConfig) -> None:
    """Build the Sudoku dataset (train/, test/, identifiers.json) from train.csv/test.csv of a hub id or local folder."""
    if config.num_aug < 0:
        raise ValueError(f"--num-aug must be >= 0, got {config.num_aug}")
    if config.size not in BOX_SHAPES:
        raise ValueError(f"--size must be one of {', '.join(map(str, BOX_SHAPES))}, got {config.size}")
    q_table, a_table = digit_tables(config.size)
    rng = np.random.default_rng(config.seed)
    keep = None if config.min_difficulty is None else (lambda rating: int(rating) >= config.min_difficulty)
    for split in ("train", "test"):
        csv_path = resolve_source(config.source_repo, f"{split}.csv")
        q, a, lines = read_grid_csv(csv_path, q_table, a_table, keep=keep, cells=config.size**2)
        if q.shape[0] == 0:
            raise ValueError(f"{csv_path}: no row has rating >= {config.min_difficulty} (--min-difficulty)")
        clash = first_row_where(lambda qb, ab: ((qb != 0) & (qb != ab)).any(axis=1), q, a)
        if clash >= 0:
            raise ValueError(f"{csv_path}: line {lines[clash]}: field 'a' contradicts a given of field 'q'")
        if split == "train":
            rows = subsample_rows(q.shape[0], config.subsample_size, rng)
            if rows.size < q.shape[0]:  # copy only when actually subsampling
                q, a = q[rows], a[rows]
        groups = build_split(Path(config.output_dir) / split, q, a, config.num_aug if split == "train" else 0, rng)
        print(f"{split}: {groups} puzzles from {csv_path}")
    write_identifiers(Path(config.output_dir), [BLANK_IDENTIFIER_NAME])


def command_line() -> int:
    """`python dataset/build_sudoku_dataset.py ...` and `hrm-build-sudoku ...`: flags, one-line errors, the exit status."""
    return run_cli(main, SudokuBuildConfig)


if __name__ == "__main__":
    sys.exit(command_line())
