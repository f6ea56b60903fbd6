"""Build an ARC dataset (SPEC §8) from folders of ARC puzzle JSON files.

    python dataset/build_arc_dataset.py                       # ARC-AGI-1 + ConceptARC -> data/arc-aug-1000
    python dataset/build_arc_dataset.py --dataset-dirs dataset/raw-data/ARC-AGI-2/data --output-dir data/arc-2-aug-1000

Design choices:
- Every `*.json` in every sub-folder of every `--dataset-dirs` entry is a puzzle (layouts:
  ARC-AGI-1/2 `data/{training,evaluation}`, ConceptARC `corpus/<concept>`). Folders and files
  are sorted, and each puzzle draws its augmentations from its own generator seeded by
  `(--seed, "<sub-folder>/<file>")`, so the output is fixed by the seed and independent of the
  file-system listing order (the reference depends on it) and of which other puzzles exist.
- Demonstration pairs go to the train split; the test pairs of puzzles in a sub-folder named
  `evaluation` go to the test split (same puzzle name, so same identifier), all others to train.
- Augmentation: up to `--num-aug` variants per puzzle, each a dihedral transform plus a
  permutation of colours 1..9 (0 fixed); a variant whose set of transformed pairs hashes like
  one already kept (including the original) is rejected; at most 5 * num_aug tries. A variant
  is named `{name}_t{tid}_{colour map digits}` where digit c is the new colour of colour c.
- Two passes keep memory small for 1000 augmentations: plan every puzzle's variants (small
  lists of transforms; over `--num-workers` processes, each puzzle on its own seed), then stream each split to its .npy files puzzle by puzzle.
- Encoding on a 30x30 canvas: PAD 0, EOS 1, colour c -> c + 2; the grid sits at an offset with
  an EOS row under it and an EOS column right of it where they fit (the corner stays PAD). In
  the train split every example but one chosen at random per puzzle gets a random offset (the
  same for its input and output); the test split uses offset (0, 0).
"""

import hashlib
import json
import multiprocessing as mp
import sys
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as `python dataset/build_arc_dataset.py`: make the repo root importable
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

MAX_GRID = 30
PAD, EOS, COLOUR_OFFSET = 0, 1, 2
RETRIES_FACTOR = 5
SET_NAME = "all"
SPLITS = ("train", "test")
IDENTITY_MAP = np.arange(10, dtype=np.uint8)


class ArcBuildConfig(BaseModel):
    """Build an ARC dataset from folders of ARC puzzle JSON files."""

    dataset_dirs: list[str] = Field(
        ["dataset/raw-data/ARC-AGI/data", "dataset/raw-data/ConceptARC/corpus"],
        description="folders whose sub-folders hold puzzle JSON files (a given list replaces the default)",
    )
    output_dir: str = Field("data/arc-aug-1000", description="output dataset folder")
    seed: int = Field(42, description="seed of augmentations and translations")
    num_aug: int = Field(1000, description="augmented variants per puzzle")
    num_workers: int = Field(1, description="processes planning augmentations (output does not depend on it)")


Example = tuple[np.ndarray, np.ndarray]  # (input grid, output grid), uint8 colours


@dataclass
class Puzzle:
    name: str
    key: str  # "<sub-folder>/<file stem>": seeds this puzzle's generators
    examples: dict[str, list[Example]]  # split -> pairs
    variants: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (dihedral id, colour map), original first


def parse_grid(value, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise ValueError(f"{where}: grid must be a non-empty list of rows")
    width = len(value[0])
    if width == 0 or any(len(row) != width for row in value):
        raise ValueError(f"{where}: rows of unequal or zero length")
    if len(value) > MAX_GRID or width > MAX_GRID:
        raise ValueError(f"{where}: grid {len(value)}x{width} exceeds {MAX_GRID}x{MAX_GRID}")
    try:
        arr = np.array(value, dtype=np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: cells must be integers") from None
    if arr.min() < 0 or arr.max() > 9:
        bad = np.argwhere((arr < 0) | (arr > 9))[0]
        raise ValueError(f"{where}: colour {int(arr[tuple(bad)])} at row {bad[0]}, column {bad[1]} outside 0-9")
    return arr.astype(np.uint8)


def load_puzzle(path: Path, test_split: str) -> Puzzle:
    """Parse one puzzle file; its test pairs go to `test_split`."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), list) or not isinstance(raw.get("test"), list):
        raise ValueError(f"{path}: expected an object with lists 'train' and 'test'")
    examples: dict[str, list[Example]] = {"train": [], "test": []}
    for kind, dest in (("train", "train"), ("test", test_split)):
        for i, pair in enumerate(raw[kind]):
            if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
                raise ValueError(f"{path}: field '{kind}[{i}]': expected 'input' and 'output'")
            examples[dest].append(
                (parse_grid(pair["input"], f"{path}: field '{kind}[{i}].input'"),
                 parse_grid(pair["output"], f"{path}: field '{kind}[{i}].output'"))
            )  # fmt: skip
    name = str(raw.get("name", path.stem))
    return Puzzle(name=name, key=f"{path.parent.name}/{path.stem}", examples=examples)


def list_puzzle_files(dataset_dirs: list[str]) -> list[tuple[Path, str]]:
    """(file, split of its test pairs) for every puzzle, sorted by folder then file name."""
    files = []
    for d in dataset_dirs:
        root = Path(d)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: dataset folder not found")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        found = [
            (f, "test" if sub.name == "evaluation" else "train") for sub in subdirs for f in sorted(sub.glob("*.json"))
        ]
        if not found:
            raise FileNotFoundError(
                f"{root}: no sub-folder with puzzle *.json files (expected e.g. training/, evaluation/)"
            )
        files.extend(found)
    return files


def transform_grid(grid: np.ndarray, tid: int, colour_map: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(dihedral_transform(colour_map[grid], tid))


def puzzle_hash(examples: dict[str, list[Example]], tid: int, colour_map: np.ndarray) -> bytes:
    """Digest of the set of transformed pairs (order- and split-independent)."""
    digests = []
    for pairs in examples.values():
        for inp, out in pairs:
            h = hashlib.sha256()
            for g in (transform_grid(inp, tid, colour_map), transform_grid(out, tid, colour_map)):
                h.update(bytes(g.shape))
                h.update(g.tobytes())
            digests.append(h.digest())
    return hashlib.sha256(b"".join(sorted(digests))).digest()


def puzzle_rng(seed: int, key: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode()), stream])


def plan_variants(puzzle: Puzzle, num_aug: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """The original, then up to `num_aug` distinct augmentations: [(dihedral id, colour map)]."""
    rng = puzzle_rng(seed, puzzle.key, 0)
    variants = [(0, IDENTITY_MAP)]
    seen = {puzzle_hash(puzzle.examples, 0, IDENTITY_MAP)}
    for _ in range(RETRIES_FACTOR * num_aug):
        if len(variants) > num_aug:
            break
        tid = int(rng.integers(0, 8))
        colour_map = np.concatenate([[0], rng.permutation(np.arange(1, 10))]).astype(np.uint8)
        h = puzzle_hash(puzzle.examples, tid, colour_map)
        if h not in seen:
            seen.add(h)
            variants.append((tid, colour_map))
    return variants


def variant_name(name: str, tid: int, colour_map: np.ndarray) -> str:
    if tid == 0 and np.array_equal(colour_map, IDENTITY_MAP):
        return name
    return f"{name}_t{tid}_{''.join(str(int(c)) for c in colour_map)}"


def grid_to_canvas(grid: np.ndarray, row: int = 0, col: int = 0) -> np.ndarray:
    """30x30 token canvas: colours + 2 at (row, col), EOS row under and column right of it."""
    canvas = np.full((MAX_GRID, MAX_GRID), PAD, dtype=TOKEN_DTYPE)
    h, w = grid.shape
    canvas[row : row + h, col : col + w] = grid + COLOUR_OFFSET
    if row + h < MAX_GRID:
        canvas[row + h, col : col + w] = EOS
    if col + w < MAX_GRID:
        canvas[row : row + h, col + w] = EOS
    return canvas


def random_offset(rng: np.random.Generator, inp: np.ndarray, out: np.ndarray) -> tuple[int, int]:
    """Top-left offset at which both grids of a pair fit the canvas."""
    max_r = MAX_GRID - max(inp.shape[0], out.shape[0])
    max_c = MAX_GRID - max(inp.shape[1], out.shape[1])
    return int(rng.integers(0, max_r + 1)), int(rng.integers(0, max_c + 1))


def write_split_arrays(output_dir: Path, split: str, puzzles: list[Puzzle], identifier_of: dict[str, int], seed: int):
    """Encode every variant of every puzzle having pairs in `split`; returns (meta fields, arrays)."""
    members = [p for p in puzzles if p.examples[split]]
    total = sum(len(p.examples[split]) * len(p.variants) for p in members)
    split_dir = output_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    paths = split_paths(split_dir, SET_NAME)
    inputs = NpyWriter(paths["inputs"], TOKEN_DTYPE, (total, MAX_GRID**2))
    labels = NpyWriter(paths["labels"], TOKEN_DTYPE, (total, MAX_GRID**2))
    identifiers, puzzle_indices, group_indices = [], [0], [0]
    row = 0
    translate = split == "train"
    for puzzle in tqdm(members, desc=f"write {split}", unit="puzzle"):
        rng = puzzle_rng(seed, puzzle.key, 1 + SPLITS.index(split))
        pairs = puzzle.examples[split]
        for tid, colour_map in puzzle.variants:
            kept_in_place = int(rng.integers(0, len(pairs))) if translate else -1
            block_in, block_out = [], []
            for i, (inp, out) in enumerate(pairs):
                inp, out = transform_grid(inp, tid, colour_map), transform_grid(out, tid, colour_map)
                r, c = random_offset(rng, inp, out) if translate and i != kept_in_place else (0, 0)
                block_in.append(grid_to_canvas(inp, r, c).reshape(-1))
                block_out.append(grid_to_canvas(out, r, c).reshape(-1))
            inputs.write(np.stack(block_in))
            labels.write(np.stack(block_out))
            row += len(pairs)
            puzzle_indices.append(row)
            identifiers.append(identifier_of[variant_name(puzzle.name, tid, colour_map)])
        group_indices.append(len(identifiers))
    arrays = {
        "inputs": inputs.close(),
        "labels": labels.close(),
        "puzzle_identifiers": np.array(identifiers, dtype=INDEX_DTYPE),
        "puzzle_indices": np.array(puzzle_indices, dtype=INDEX_DTYPE),
        "group_indices": np.array(group_indices, dtype=INDEX_DTYPE),
    }
    return split_dir, arrays, len(members), total


def main(config: ArcBuildConfig) -> None:
    """Build an ARC dataset (SPEC §8) from folders of ARC puzzle JSON files."""
    if config.num_aug < 0 or config.num_workers < 1:
        raise ValueError(f"--num-aug must be >= 0 and --num-workers >= 1, got {config.num_aug}, {config.num_workers}")
    output_dir = Path(config.output_dir)
    files = list_puzzle_files(config.dataset_dirs)
    puzzles = [load_puzzle(path, test_split) for path, test_split in files]  # all input errors before any work
    plan = partial(plan_variants, num_aug=config.num_aug, seed=config.seed)
    with mp.Pool(config.num_workers) if config.num_workers > 1 else nullcontext() as pool:
        planned = pool.imap(plan, puzzles, chunksize=4) if pool is not None else map(plan, puzzles)
        for puzzle, variants in tqdm(
            zip(puzzles, planned), total=len(puzzles), desc="plan augmentations", unit="puzzle"
        ):
            puzzle.variants = variants
    short = sum(len(p.variants) < config.num_aug + 1 for p in puzzles)
    if short:
        print(f"{short} of {len(puzzles)} puzzles have fewer than {config.num_aug} distinct augmentations")

    names = [BLANK_IDENTIFIER_NAME]
    identifier_of: dict[str, int] = {}
    for puzzle in puzzles:  # one identifier per puzzle/variant name, shared by its train and test pairs
        for tid, colour_map in puzzle.variants:
            name = variant_name(puzzle.name, tid, colour_map)
            if name not in identifier_of:
                identifier_of[name] = len(names)
                names.append(name)

    for split in SPLITS:
        if not any(p.examples[split] for p in puzzles):
            print(f"{split}: no puzzles (no 'evaluation' sub-folder), split not written")
            continue
        split_dir, arrays, groups, total = write_split_arrays(output_dir, split, puzzles, identifier_of, config.seed)
        num_puzzles = arrays["puzzle_identifiers"].size
        meta = PuzzleDatasetMetadata(
            pad_id=PAD,
            ignore_label_id=PAD,
            blank_identifier_id=0,
            vocab_size=10 + COLOUR_OFFSET,
            seq_len=MAX_GRID * MAX_GRID,
            num_puzzle_identifiers=len(names),
            total_groups=groups,
            mean_puzzle_examples=total / max(1, num_puzzles),
            total_puzzles=num_puzzles,
            sets=[SET_NAME],
        )
        write_split(split_dir, meta, {SET_NAME: arrays})
        print(f"{split}: {groups} groups, {num_puzzles} puzzles, {total} examples")
    write_identifiers(output_dir, names)


if __name__ == "__main__":
    sys.exit(run_cli(main, ArcBuildConfig))
