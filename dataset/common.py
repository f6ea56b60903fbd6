"""Shared pieces of the puzzle datasets: metadata schema, on-disk layout, dihedral transforms.

Design choices:
- `PuzzleDatasetMetadata` has the reference's fields plus TRM's `total_puzzles` (in TRM's key
  order), so `dataset.json` files move between the reference, TRM and this library both ways.
- Array files follow the reference: `inputs`/`labels` are written as uint8 (every vocabulary
  here is < 256 tokens; the loader casts to int32, so any integer dtype loads identically),
  the three index arrays as int32.
- Writers go through `write_split`, which validates what it writes with the same checks the
  loader applies when reading (`validate_split_arrays`, `validate_token_ids`), so a builder
  cannot emit a dataset the loader would reject.
- Token ids are checked on every row of the file (`check_token_ids`), in blocks of 16 MiB: a
  min/max per block, no temporaries unless a block fails, so the scan costs one read of the
  data and a bad id anywhere is found before training starts, not when (or if) its row is first
  sampled. Measured on a 1M-row Sudoku-shaped split (2 x 81 MB, uint8): 0.01-0.02 s from the
  page cache, 0.1-0.3 s from disk; the mapped pages are file-backed and unmapped after the scan.
"""

import json
import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ValidationError

from utils.cli import validation_error_line

# Per-set array names, in the order they are written; `inputs`/`labels` are per example.
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
EXAMPLE_FIELDS = ("inputs", "labels")
INDEX_DTYPE = np.int32
TOKEN_DTYPE = np.uint8
BLANK_IDENTIFIER_NAME = "<blank>"
TOKEN_CHECK_BYTES = 1 << 24  # bytes per block of the full token-id scan: small temporaries, few numpy calls

# Dihedral group of the square, ids as in the reference: 0 identity, 1-3 rotations by 90/180/270
# degrees counter-clockwise (np.rot90), 4 flip left-right, 5 flip up-down, 6 transpose,
# 7 anti-transpose. Every element but the two odd rotations is its own inverse.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


class PuzzleDatasetMetadata(BaseModel):
    pad_id: int
    ignore_label_id: int | None
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    # TRM's field (its loader requires it, the reference's ignores it): puzzles in the split. Optional on
    # read, so the reference's dataset.json files load; every builder here writes it.
    total_puzzles: int | None = None
    sets: list[str]


def dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """Apply dihedral transform `tid` (0..7) to the last two axes of `arr`."""
    if tid == 0:
        return arr
    if tid == 1:
        return np.rot90(arr, k=1, axes=(-2, -1))
    if tid == 2:
        return np.rot90(arr, k=2, axes=(-2, -1))
    if tid == 3:
        return np.rot90(arr, k=3, axes=(-2, -1))
    if tid == 4:
        return np.flip(arr, axis=-1)
    if tid == 5:
        return np.flip(arr, axis=-2)
    if tid == 6:
        return np.swapaxes(arr, -2, -1)
    if tid == 7:
        return np.flip(np.rot90(arr, k=1, axes=(-2, -1)), axis=-1)
    raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")


def inverse_dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """Undo `dihedral_transform(., tid)`."""
    if not 0 <= tid < 8:
        raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")
    return dihedral_transform(arr, DIHEDRAL_INVERSE[tid])


def split_paths(split_dir: Path, set_name: str) -> dict[str, Path]:
    return {field: Path(split_dir) / f"{set_name}__{field}.npy" for field in FIELDS}


def read_json(path: str | Path, what: str):
    """A JSON file's value; a missing, unreadable or malformed file is one line naming it (`what`: its kind)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_bytes())  # bytes: json detects UTF-8/16/32 itself
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None


def load_metadata(split_dir: Path) -> PuzzleDatasetMetadata:
    """Read and type-check `<split_dir>/dataset.json`; errors name the file and field."""
    path = Path(split_dir) / "dataset.json"
    if not Path(split_dir).is_dir():
        raise FileNotFoundError(f"{split_dir}: split folder not found")
    raw = read_json(path, "dataset.json")
    try:
        meta = PuzzleDatasetMetadata.model_validate(raw)
    except ValidationError as e:  # the first offending field; a list or a number has none
        named = "{field}: {msg}"
        line = validation_error_line(
            e, lambda loc: f"field '{'.'.join(loc)}'", prefix=f"{path}: ", unknown=named, required=named,
            invalid=named, own=None, whole="expected a JSON object of metadata fields ({msg})",
        )  # fmt: skip
        raise ValueError(line) from None
    for name in ("vocab_size", "seq_len", "num_puzzle_identifiers"):
        if getattr(meta, name) <= 0:
            raise ValueError(f"{path}: field '{name}' must be positive, got {getattr(meta, name)}")
    if not 0 <= meta.pad_id < meta.vocab_size:  # padding rows of a short batch are fed to the embedding
        raise ValueError(f"{path}: field 'pad_id' must be in [0, vocab_size={meta.vocab_size}), got {meta.pad_id}")
    if not meta.sets:
        raise ValueError(f"{path}: field 'sets' is empty")
    if len(set(meta.sets)) != len(meta.sets):
        twice = next(name for name in meta.sets if meta.sets.count(name) > 1)
        raise ValueError(f"{path}: field 'sets' lists {twice!r} more than once")
    if not 0 <= meta.blank_identifier_id < meta.num_puzzle_identifiers:
        raise ValueError(f"{path}: field 'blank_identifier_id' must be in [0, num_puzzle_identifiers)")
    return meta


def load_npy(path: Path, mmap: bool) -> np.ndarray:
    """`np.load` of one array file (memory-mapped if `mmap`); anything unreadable is a ValueError naming it."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        reason = next(iter(str(e).strip().split(". ")), "") or type(e).__name__
        raise ValueError(f"{path}: cannot read .npy file ({reason.rstrip('.')})") from None
    if not isinstance(arr, np.ndarray):  # np.load also opens .npz archives
        raise ValueError(f"{path}: not a .npy array file (found a {type(arr).__name__})")
    return arr


def validate_split_arrays(split_dir: Path, set_name: str, meta: PuzzleDatasetMetadata, arrays: dict) -> None:
    """Check one set's arrays against each other and the metadata.

    `arrays` maps field -> array (memory-mapped inputs/labels are fine: only shapes and the
    small index arrays are inspected). Raises ValueError naming the offending file.
    """
    paths = split_paths(split_dir, set_name)
    for field in EXAMPLE_FIELDS:
        arr = arrays[field]
        if arr.ndim != 2 or arr.shape[1] != meta.seq_len:
            raise ValueError(
                f"{paths[field]}: shape {tuple(arr.shape)} does not match [N, seq_len={meta.seq_len}] of dataset.json"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{paths[field]}: dtype {arr.dtype} is not an integer type")
    if arrays["labels"].shape[0] != arrays["inputs"].shape[0]:
        raise ValueError(
            f"{paths['labels']}: {arrays['labels'].shape[0]} rows but {paths['inputs'].name} has {arrays['inputs'].shape[0]}"
        )
    for field in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
        if arrays[field].ndim != 1 or not np.issubdtype(arrays[field].dtype, np.integer):
            raise ValueError(
                f"{paths[field]}: expected a 1-D integer array, got {arrays[field].dtype}{arrays[field].shape}"
            )
    for field, total, what in (
        ("puzzle_indices", arrays["inputs"].shape[0], "examples"),
        ("group_indices", arrays["puzzle_identifiers"].shape[0], "puzzles"),
    ):
        idx = arrays[field]
        if idx.size < 1 or idx[0] != 0:
            raise ValueError(f"{paths[field]}: must start at 0")
        if idx[-1] != total:
            raise ValueError(f"{paths[field]}: last offset {int(idx[-1])} != number of {what} {total}")
        if idx.size > 1 and np.any(np.diff(idx) <= 0):
            bad = int(np.argmax(np.diff(idx) <= 0))
            raise ValueError(f"{paths[field]}: offsets not strictly increasing at position {bad + 1}")
    if arrays["puzzle_indices"].size - 1 != arrays["puzzle_identifiers"].size:
        raise ValueError(
            f"{paths['puzzle_indices']}: {arrays['puzzle_indices'].size - 1} puzzles but "
            f"{paths['puzzle_identifiers'].name} has {arrays['puzzle_identifiers'].size}"
        )
    ids = arrays["puzzle_identifiers"]
    if ids.size and (ids.min() < 0 or ids.max() >= meta.num_puzzle_identifiers):
        raise ValueError(
            f"{paths['puzzle_identifiers']}: identifier outside [0, num_puzzle_identifiers={meta.num_puzzle_identifiers})"
        )


def _token_id_error(path: Path, arr: np.ndarray, row: int, col: int, vocab: int) -> ValueError:
    return ValueError(
        f"{path}: row {row}, position {col}: token id {int(arr[row, col])} outside [0, vocab_size={vocab}) of dataset.json"
    )


def check_token_ids(path: Path, arr: np.ndarray, vocab: int, allowed: int | None = None) -> None:
    """Every value of `arr` (`[N, seq_len]`, typically a memmap) lies in [0, vocab), or equals `allowed`.

    Vectorised over blocks of about TOKEN_CHECK_BYTES, so a file of any size is read once with a flat,
    small footprint. Per block a min/max decides; only a block that fails it is searched element-wise
    (for the first offending row, and to let `allowed` through when it lies outside the range).
    """
    rows = max(1, TOKEN_CHECK_BYTES // max(1, arr.shape[1] * arr.dtype.itemsize))
    signed = np.issubdtype(arr.dtype, np.signedinteger)
    for lo in range(0, arr.shape[0], rows):
        block = np.asarray(arr[lo : lo + rows])
        if block.size == 0 or ((not signed or block.min() >= 0) and block.max() < vocab):
            continue
        bad = (block < 0) | (block >= vocab)
        if allowed is not None:
            bad &= block != allowed
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise _token_id_error(path, arr, lo + int(row), int(col), vocab)


def validate_token_ids(split_dir: Path, set_name: str, meta: PuzzleDatasetMetadata, arrays: dict) -> None:
    """Token ids of every row of `inputs` and `labels` lie in [0, vocab_size) (labels: or ignore_label_id)."""
    paths = split_paths(split_dir, set_name)
    check_token_ids(paths["inputs"], arrays["inputs"], meta.vocab_size)
    check_token_ids(paths["labels"], arrays["labels"], meta.vocab_size, allowed=meta.ignore_label_id)


def validate_split_totals(split_dir: Path, meta: PuzzleDatasetMetadata, sets: dict[str, dict]) -> None:
    """`total_groups` and `mean_puzzle_examples` of dataset.json describe the arrays of all its sets.

    The launcher derives the number of training steps from these two fields (as the reference does),
    so a stale or hand-edited value would silently change the run's length.
    """
    path = Path(split_dir) / "dataset.json"
    groups = sum(arrays["group_indices"].size - 1 for arrays in sets.values())
    puzzles = sum(arrays["puzzle_identifiers"].size for arrays in sets.values())
    examples = sum(arrays["inputs"].shape[0] for arrays in sets.values())
    if meta.total_groups != groups:
        raise ValueError(
            f"{path}: field 'total_groups' is {meta.total_groups}, but the group_indices arrays hold {groups}"
        )
    mean = examples / max(1, puzzles)
    if not math.isclose(meta.mean_puzzle_examples, mean, rel_tol=1e-6):
        raise ValueError(
            f"{path}: field 'mean_puzzle_examples' is {meta.mean_puzzle_examples}, but the arrays hold "
            f"{examples} examples in {puzzles} puzzles ({mean:.6g})"
        )


def write_split(split_dir: Path, meta: PuzzleDatasetMetadata, sets: dict[str, dict[str, np.ndarray]]) -> None:
    """Write `dataset.json` and every set's arrays (already final dtypes) into `split_dir`.

    Arrays that were streamed to their final path already (`NpyWriter`) may be passed as the
    memmaps it returns: they are validated but not rewritten.
    """
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    for set_name, arrays in sets.items():
        validate_split_arrays(split_dir, set_name, meta, arrays)
        validate_token_ids(split_dir, set_name, meta, arrays)
    validate_split_totals(split_dir, meta, sets)
    for set_name, arrays in sets.items():
        for field, path in split_paths(split_dir, set_name).items():
            arr = arrays[field]
            if isinstance(arr, np.memmap) and Path(arr.filename).resolve() == path.resolve():
                continue  # streamed there already
            np.save(path, arr)
    (split_dir / "dataset.json").write_text(json.dumps(meta.model_dump()))


class NpyWriter:
    """Stream rows of a `[rows, ...]` array into a .npy file (header first, then blocks in order).

    Unlike a writable memmap, written pages are not mapped into the process, so building a
    large split keeps the builder's resident memory flat. `close()` checks the row count and
    returns the finished file as a read-only memmap.
    """

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape, self.rows = Path(path), np.dtype(dtype), shape, 0
        self.file = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self.rows + block.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path}: block {block.shape} does not fit array {self.shape} at row {self.rows}")
        self.file.write(block.tobytes())
        self.rows += block.shape[0]

    def close(self) -> np.ndarray:
        self.file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: wrote {self.rows} rows, expected {self.shape[0]}")
        return np.load(self.path, mmap_mode="r")


def write_identifiers(output_dir: Path, names: list[str]) -> None:
    """`identifiers.json`: list index = puzzle identifier, entry 0 is the blank identifier."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "identifiers.json").write_text(json.dumps(names))
