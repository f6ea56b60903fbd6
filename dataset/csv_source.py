"""Reading `source,q,a,rating` CSV files (Sudoku, Maze) into compact token arrays.

Design choices:
- `--source-repo` is a local folder when such a directory exists, otherwise a Hugging Face
  dataset id fetched with `hf_hub_download` (the reference's only option).
- Rows are streamed: the q/a strings of each row are appended to two `bytearray`s (one byte
  per cell, no Python object per cell) and translated to tokens with a 256-entry lookup table
  in one vectorised pass. Peak memory is about 3 bytes per cell of the file
  (peak) and 2 bytes per cell once read.
- Errors name the file and the 1-based line number (the header is line 1).
"""

import csv
from array import array
from collections.abc import Callable
from pathlib import Path

import numpy as np

INVALID = 255
CHUNK_ROWS = 1 << 16  # rows per vectorised step: bounds the size of temporaries


def resolve_source(source_repo: str, filename: str) -> Path:
    """Local `<folder>/<filename>` if `source_repo` is a directory, else download from the hub."""
    folder = Path(source_repo)
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (expected train.csv and test.csv in {folder})")
        return path
    if source_repo.startswith((".", "/", "~")) or source_repo.count("/") != 1:
        raise FileNotFoundError(f"{source_repo}: no such folder, and not a hub dataset id of the form owner/name")
    from huggingface_hub import hf_hub_download  # only needed for hub sources

    return Path(hf_hub_download(source_repo, filename, repo_type="dataset"))


def lookup_table(mapping: dict[str, int]) -> np.ndarray:
    table = np.full(256, INVALID, dtype=np.uint8)
    for ch, value in mapping.items():
        table[ord(ch)] = value
    return table


def read_grid_csv(
    path: Path,
    q_table: np.ndarray,
    a_table: np.ndarray,
    keep: Callable[[str], bool] | None = None,
    cells: int | None = None,
) -> tuple[np.ndarray, np.ndarray, array]:
    """Read `path` into (q, a) uint8 arrays `[N, cells]` of table values, plus each row's line.

    `keep(rating)` filters rows (called only when given); `cells` fixes the row length,
    otherwise the first data row sets it. Raises ValueError naming the file and line.
    """
    q_buf, a_buf = bytearray(), bytearray()
    lines = array("i")  # CSV line of every kept row, for error messages after the vectorised checks
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["source", "q", "a"]:
            raise ValueError(f"{path}: line 1: expected header 'source,q,a,rating', got {header}")
        for row in reader:
            line = reader.line_num
            if len(row) != 4:
                raise ValueError(f"{path}: line {line}: expected 4 fields (source,q,a,rating), got {len(row)}")
            _, q, a, rating = row
            if keep is not None:
                try:
                    if not keep(rating):
                        continue
                except ValueError:
                    raise ValueError(f"{path}: line {line}: field 'rating': not a number: {rating!r}") from None
            if cells is None:
                cells = len(q)
            if len(q) != cells or len(a) != cells:
                raise ValueError(
                    f"{path}: line {line}: field '{'q' if len(q) != cells else 'a'}' has "
                    f"{len(q) if len(q) != cells else len(a)} characters, expected {cells}"
                )
            try:
                q_buf += q.encode("ascii")
                a_buf += a.encode("ascii")
            except UnicodeEncodeError:
                raise ValueError(f"{path}: line {line}: non-ASCII character in q/a") from None
            lines.append(line)
    n = len(lines)
    cells = cells or 0
    # Translate in place, in chunks: the bytearrays become the token arrays, no second copy.
    q_arr = np.frombuffer(q_buf, dtype=np.uint8).reshape(n, cells)
    a_arr = np.frombuffer(a_buf, dtype=np.uint8).reshape(n, cells)
    for name, arr, table in (("q", q_arr, q_table), ("a", a_arr, a_table)):
        for lo in range(0, n, CHUNK_ROWS):
            block = arr[lo : lo + CHUNK_ROWS]
            block[...] = table[block]
            bad = np.flatnonzero((block == INVALID).any(axis=1))
            if bad.size:
                row = lo + int(bad[0])
                col = int(np.argmax(arr[row] == INVALID))
                raise ValueError(f"{path}: line {lines[row]}: field '{name}': invalid character at position {col}")
    return q_arr, a_arr, lines


def first_row_where(predicate: Callable[[np.ndarray, np.ndarray], np.ndarray], q: np.ndarray, a: np.ndarray) -> int:
    """Index of the first row where `predicate(q_block, a_block)` (per row, bool) holds, or -1;
    evaluated in chunks so the temporaries stay small."""
    for lo in range(0, q.shape[0], CHUNK_ROWS):
        hit = np.flatnonzero(predicate(q[lo : lo + CHUNK_ROWS], a[lo : lo + CHUNK_ROWS]))
        if hit.size:
            return lo + int(hit[0])
    return -1


def subsample_rows(num_rows: int, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """Row ids to keep: all, or `size` distinct rows chosen at random (kept in file order)."""
    if size is not None and size <= 0:
        raise ValueError(f"--subsample-size must be positive, got {size}")
    if size is None or size >= num_rows:
        return np.arange(num_rows)
    return np.sort(rng.choice(num_rows, size=size, replace=False))
