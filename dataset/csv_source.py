"""Reading the Sudoku/Maze source CSVs (`source,question,answer,rating`) into compact token arrays.

Design choices:
- `--source-repo` is a local folder when such a directory exists, otherwise a Hugging Face
  dataset id fetched with `hf_hub_download` (the reference's only option).
- Layout as the reference reads it: line 1 is a header and is skipped whatever it says
  (the hub files say `source,question,answer,rating`, the offline generators the same), and every
  further row has four fields taken by position: source, puzzle, solution, rating. So the arrays,
  and every output byte, do not depend on the header's names. The file is read as UTF-8 with an
  optional byte-order mark; CRLF and LF line ends both work (the csv module splits records), and
  blank lines are skipped. Bytes that are not UTF-8 are kept as escapes (`surrogateescape`) so
  that they fail the ASCII check of the one field that holds them, with its line, instead of a
  decoding error somewhere in the file's buffer.
- Rows are streamed: the puzzle/solution strings of each row are appended to two `bytearray`s
  (one byte per cell, no Python object per cell) and translated to tokens with a 256-entry lookup
  table in one vectorised pass. Peak memory is about 3 bytes per cell of the file (peak) and 2
  bytes per cell once read.
- Errors name the file and the 1-based line number (the header is line 1; a record spanning
  several lines through a quoted newline is named by its first line). A file without a data row
  is an error (it would build an empty split); a first line that reads like a data row is only a
  warning, since the reference skips it too.
"""

import csv
import math
import sys
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

    try:
        return Path(hf_hub_download(source_repo, filename, repo_type="dataset"))
    except Exception as e:  # the hub client raises its own HTTP, offline and not-found types
        reason = next(iter(str(e).strip().splitlines()), "") or type(e).__name__
        raise ValueError(f"{source_repo}: cannot download {filename} from the Hugging Face hub ({reason})") from None


def lookup_table(mapping: dict[str, int]) -> np.ndarray:
    table = np.full(256, INVALID, dtype=np.uint8)
    for ch, value in mapping.items():
        table[ord(ch)] = value
    return table


def _is_square(cells: int) -> bool:
    return cells > 0 and math.isqrt(cells) ** 2 == cells


def _looks_like_data(row: list[str], q_table: np.ndarray, a_table: np.ndarray, cells: int) -> bool:
    """Whether a header row would have been a valid data row (then the file probably has no header)."""
    if len(row) != 4 or len(row[1]) != cells or len(row[2]) != cells or not (row[1] + row[2]).isascii():
        return False
    q, a = np.frombuffer(row[1].encode(), np.uint8), np.frombuffer(row[2].encode(), np.uint8)
    return bool((q_table[q] != INVALID).all() and (a_table[a] != INVALID).all())


def read_grid_csv(
    path: Path,
    q_table: np.ndarray,
    a_table: np.ndarray,
    keep: Callable[[str], bool] | None = None,
    cells: int | None = None,
    square: bool = False,
) -> tuple[np.ndarray, np.ndarray, array]:
    """Read `path` into (q, a) uint8 arrays `[N, cells]` of table values, plus each row's line.

    `keep(rating)` filters rows (called only when given); `cells` fixes the row length,
    otherwise the first data row sets it (and with `square`, it must be a square number).
    Raises ValueError naming the file and line; the result may be empty only through `keep`.
    """
    q_buf, a_buf = bytearray(), bytearray()
    lines = array("i")  # CSV line of every kept row, for error messages after the vectorised checks
    data_rows = 0
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(
                    f"{path}: empty file (expected a header line, then rows source,question,answer,rating)"
                )
            end = reader.line_num
            for row in reader:
                line, end = end + 1, reader.line_num  # first line of this record
                if not row:
                    continue  # a blank line
                data_rows += 1
                if len(row) != 4:
                    raise ValueError(
                        f"{path}: line {line}: expected 4 fields (source,question,answer,rating), got {len(row)}"
                    )
                _, q, a, rating = row
                if keep is not None:
                    try:
                        if not keep(rating):
                            continue
                    except ValueError:
                        raise ValueError(f"{path}: line {line}: field 'rating': not a number: {rating!r}") from None
                if cells is None:
                    cells = len(q)
                    if square and not _is_square(cells):
                        raise ValueError(f"{path}: line {line}: field 'q' has {cells} characters, not a square grid")
                for name, value in (("q", q), ("a", a)):
                    if len(value) != cells:
                        raise ValueError(
                            f"{path}: line {line}: field '{name}' has {len(value)} characters, expected {cells}"
                        )
                    if not value.isascii():
                        col = next(i for i, ch in enumerate(value) if not ch.isascii())
                        raise ValueError(f"{path}: line {line}: field '{name}': non-ASCII character at position {col}")
                q_buf += q.encode("ascii")
                a_buf += a.encode("ascii")
                lines.append(line)
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise ValueError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    if data_rows == 0:
        raise ValueError(f"{path}: no data rows after the header line")
    n = len(lines)
    cells = cells or 0
    if n and _looks_like_data(header, q_table, a_table, cells):
        print(
            f"warning: {path}: line 1 reads like a data row, but line 1 is always skipped as the header",
            file=sys.stderr,
        )
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
