"""Build an ARC dataset (the reference's format): from folders of puzzle files, or from ARC Prize files as TRM does.

    python dataset/build_arc_dataset.py                       # ARC-AGI-1 + ConceptARC folders -> data/arc-aug-1000
    python dataset/build_arc_dataset.py --dataset-dirs dataset/raw-data/ARC-AGI-2/data --output-dir data/arc-2-aug-1000
    python -m dataset.build_arc_dataset --input-file-prefix kaggle/combined/arc-agi \
        --output-dir data/arc1concept-aug-1000 --subsets training evaluation concept --test-set-name evaluation

Two modes share one config class; `--input-file-prefix` selects the second.

Folder mode (`--dataset-dirs`, HRM's layout), design choices:
- Every `*.json` in every sub-folder of every `--dataset-dirs` entry is a puzzle (layouts:
  ARC-AGI-1/2 `data/{training,evaluation}`, ConceptARC `corpus/<concept>`). Folders and files
  are sorted, and each puzzle draws its augmentations from its own generator seeded by
  `(--seed, "<sub-folder>/<file>")`, so the output is fixed by the seed and independent of the
  file-system listing order (the reference depends on it) and of which other puzzles exist.
- Demonstration pairs go to the train split; the test pairs of puzzles in a sub-folder named
  `evaluation` go to the test split (same puzzle name, so same identifier), all others to train.
- A variant is named `{name}_t{tid}_{colour map digits}` where digit c is the new colour of colour c.
- Two passes keep memory small for 1000 augmentations: plan every puzzle's variants (small
  lists of transforms; over `--num-workers` processes, each puzzle on its own seed), then stream
  each split to its .npy files puzzle by puzzle.

ARC Prize mode (`--input-file-prefix P --subsets ... --test-set-name T`, TRM's builder and flags):
- Reads `P_{subset}_challenges.json` (puzzle id -> {"train": [...], "test": [{input}]}) and, when
  present, `P_{subset}_solutions.json` (puzzle id -> test output grids; absent: outputs `[[0]]`).
- The output is byte-identical to TRM's builder on the same files and seed, because TRM
  checkpoints index their puzzle-embedding rows by identifier. That fixes the order of every
  random draw, made here on one `RandomState(seed)` (the stream of TRM's seeded global RNG):
  per subset a shuffle of its puzzles in JSON order, then per puzzle the augmentation trials
  (dihedral id, permutation of colours 1..9) until `--num-aug` distinct variants or 5x as many
  trials; afterwards, per split (train, then test), per variant, the example kept in place and
  a (row, column) offset for each other example. Pairs keep their JSON key order (the ARC Prize
  files list "test" before "train", so a training puzzle's test pairs come first), variant names
  are `{id}|||t{tid}|||{colour map digits}`, identifiers count from `--puzzle-identifiers-start`
  in order of first appearance over the train split, then the test split. (TRM's builder takes
  the split order from a Python set: when the first subset is a test subset, its output depends
  on PYTHONHASHSEED if a test task has several test inputs; otherwise it is train first, as here.)
- Unlike TRM's builder, which holds every encoded example in Python lists (tens of GB for 1000
  augmentations), this one keeps only the plan (transform and colour map per variant) and
  streams each split to its .npy files, encoding all variants of a puzzle at once from
  precomputed canvases (a translated canvas is a window onto one padded canvas per transform).
- Duplicate variants are recognised by the multiset of their transformed (input, output) pairs,
  the criterion of TRM's sorted list of pair hashes, compared as exact bytes.
- Where TRM's builder would crash (a test-subset puzzle without test or demonstration pairs, a
  puzzle without pairs, solutions that do not fit the challenges), this one stops with an error
  naming the file and puzzle: such a puzzle would silently count as 0/0 in scoring. A bad grid of a
  solutions file is blamed on that file, not on the challenges file it completes.

Both modes:
- Encoding on a 30x30 canvas: PAD 0, EOS 1, colour c -> c + 2; the grid sits at an offset with
  an EOS row under it and an EOS column right of it where they fit (the corner stays PAD). In
  the train split every example but one chosen at random per puzzle gets a random offset (the
  same for its input and output); the test split uses offset (0, 0).
- Augmentation: dihedral transform after a permutation of colours 1..9 (0 fixed); a variant whose
  set of transformed pairs equals one already kept (including the original) is rejected.
- After a build, a warning names test tasks that also appear in the train split, by name or by a
  test pair among another task's pairs (ARC-AGI-2's training set holds ARC-AGI-1 evaluation tasks);
  tasks are counted by name, so one listed by two test subsets counts once.
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
    read_json,
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
DEFAULT_DATASET_DIRS = ["dataset/raw-data/ARC-AGI/data", "dataset/raw-data/ConceptARC/corpus"]
TRM_SEPARATOR = "|||"  # TRM's variant names: {id}|||t{tid}|||{colour map digits}
TRANSPOSING = (1, 3, 6, 7)  # dihedral ids that swap rows and columns
VARIANTS_PER_BLOCK = 256  # variants encoded per vectorised block (bounds the block's index arrays to ~40 MB)
LEAK_EXAMPLES = 5  # task names shown in the leakage warning


class ArcBuildConfig(BaseModel):
    """Build an ARC dataset from folders of puzzle files, or (--input-file-prefix) from ARC Prize files as TRM does."""

    dataset_dirs: list[str] = Field(
        DEFAULT_DATASET_DIRS,
        description="folder mode: folders whose sub-folders hold puzzle JSON files (a given list replaces the default)",
    )
    input_file_prefix: str | None = Field(
        None,
        description="ARC Prize mode (TRM's builder): read P_{subset}_challenges.json and P_{subset}_solutions.json",
    )
    subsets: list[str] | None = Field(None, description="ARC Prize mode: subsets in order, e.g. training evaluation")
    test_set_name: str | None = Field(None, description="ARC Prize mode: subset whose test pairs form the test split")
    test_set_name2: str | None = Field(None, description="ARC Prize mode: a second such subset")
    output_dir: str = Field("data/arc-aug-1000", description="output dataset folder")
    seed: int = Field(42, description="seed of augmentations and translations")
    num_aug: int = Field(1000, description="augmented variants per puzzle")
    puzzle_identifiers_start: int = Field(1, description="ARC Prize mode: first identifier (> 1 to combine datasets)")
    num_workers: int = Field(
        1, description="folder mode: processes planning augmentations (output does not depend on it)"
    )


Example = tuple[np.ndarray, np.ndarray]  # (input grid, output grid), uint8 colours


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def parse_grid(value, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise ValueError(f"{where}: grid must be a non-empty list of rows")
    width = len(value[0])
    if width == 0 or any(len(row) != width for row in value):
        raise ValueError(f"{where}: rows of unequal or zero length")
    if len(value) > MAX_GRID or width > MAX_GRID:
        raise ValueError(f"{where}: grid {len(value)}x{width} exceeds {MAX_GRID}x{MAX_GRID}")
    try:
        arr = np.array(value)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.dtype.kind not in "iu" or arr.ndim != 2:  # floats, booleans, strings, nested lists
        raise ValueError(f"{where}: cells must be integers")
    if arr.min() < 0 or arr.max() > 9:
        bad = np.argwhere((arr < 0) | (arr > 9))[0]
        raise ValueError(f"{where}: colour {int(arr[tuple(bad)])} at row {bad[0]}, column {bad[1]} outside 0-9")
    return arr.astype(np.uint8)


def parse_pairs(pairs, where: str, kind: str) -> list[Example]:
    """The (input, output) grids of a puzzle's `kind` list ("train" or "test")."""
    examples = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
            raise ValueError(f"{where}: field '{kind}[{i}]': expected 'input' and 'output'")
        examples.append(
            (parse_grid(pair["input"], f"{where}: field '{kind}[{i}].input'"),
             parse_grid(pair["output"], f"{where}: field '{kind}[{i}].output'"))
        )  # fmt: skip
    return examples


def transform_grid(grid: np.ndarray, tid: int, colour_map: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(dihedral_transform(colour_map[grid], tid))


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


def pair_key(inp: np.ndarray, out: np.ndarray) -> bytes:
    """Exact identity of a pair: shapes (each <= 30, one byte) then cells."""
    return bytes(inp.shape + out.shape) + inp.tobytes() + out.tobytes()


def warn_leakage(test_tasks: list[tuple[int, str, list[Example]]], train_tasks: list[tuple[int, str, list[Example]]]):
    """One warning line when test tasks also appear in the train split.

    Tasks are (index, name, pairs) and are counted by name: a task that two test subsets list is one
    task, and its copies' demonstrations, which belong in the train split, are its own and not counted.
    A test task leaks when another train-split task has its name or holds one of its test pairs.
    """
    owners: dict[bytes, set[int]] = {}
    names: dict[str, set[int]] = {}
    for index, name, pairs in train_tasks:
        names.setdefault(name, set()).add(index)
        for inp, out in pairs:
            owners.setdefault(pair_key(inp, out), set()).add(index)
    own: dict[str, set[int]] = {}
    for index, name, _ in test_tasks:
        own.setdefault(name, set()).add(index)
    leaked: dict[str, None] = {}  # names in order of appearance
    for _, name, pairs in test_tasks:
        mine = own[name]
        if names.get(name, set()) - mine or any(owners.get(pair_key(i, o), set()) - mine for i, o in pairs):
            leaked[name] = None
    if leaked:
        total = len(own)
        shown = ", ".join(list(leaked)[:LEAK_EXAMPLES]) + (", ..." if len(leaked) > LEAK_EXAMPLES else "")
        warn(
            f"{len(leaked)} of {total} test tasks also appear in the train split (same name, or a test pair"
            f" in another training task): {shown}; their test answers are seen in training"
        )


def write_metadata(split_dir: Path, arrays: dict, num_identifiers: int, groups: int) -> None:
    num_puzzles, total = arrays["puzzle_identifiers"].size, arrays["inputs"].shape[0]
    meta = PuzzleDatasetMetadata(
        pad_id=PAD,
        ignore_label_id=PAD,
        blank_identifier_id=0,
        vocab_size=10 + COLOUR_OFFSET,
        seq_len=MAX_GRID * MAX_GRID,
        num_puzzle_identifiers=num_identifiers,
        total_groups=groups,
        mean_puzzle_examples=total / max(1, num_puzzles),
        total_puzzles=num_puzzles,
        sets=[SET_NAME],
    )
    write_split(split_dir, meta, {SET_NAME: arrays})
    print(f"{split_dir.name}: {groups} groups, {num_puzzles} puzzles, {total} examples")


# ----------------------------------------------------------------------------------------------
# Folder mode
# ----------------------------------------------------------------------------------------------


@dataclass
class Puzzle:
    name: str
    key: str  # "<sub-folder>/<file stem>": seeds this puzzle's generators
    examples: dict[str, list[Example]]  # split -> pairs
    test_pairs: int = 0  # pairs in the source's "test" list
    variants: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (dihedral id, colour map), original first


def load_puzzle(path: Path, test_split: str) -> Puzzle:
    """Parse one puzzle file; its test pairs go to `test_split`."""
    raw = read_json(path, "puzzle file")
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), list) or not isinstance(raw.get("test"), list):
        raise ValueError(f"{path}: expected an object with lists 'train' and 'test'")
    examples: dict[str, list[Example]] = {"train": parse_pairs(raw["train"], str(path), "train"), "test": []}
    examples[test_split].extend(parse_pairs(raw["test"], str(path), "test"))
    name = str(raw.get("name", path.stem))
    return Puzzle(name=name, key=f"{path.parent.name}/{path.stem}", examples=examples, test_pairs=len(raw["test"]))


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


def random_offset(rng: np.random.Generator, inp: np.ndarray, out: np.ndarray) -> tuple[int, int]:
    """Top-left offset at which both grids of a pair fit the canvas."""
    max_r = MAX_GRID - max(inp.shape[0], out.shape[0])
    max_c = MAX_GRID - max(inp.shape[1], out.shape[1])
    return int(rng.integers(0, max_r + 1)), int(rng.integers(0, max_c + 1))


def write_split_arrays(output_dir: Path, split: str, puzzles: list[Puzzle], identifier_of: dict[str, int], seed: int):
    """Encode every variant of every puzzle having pairs in `split`; returns (split folder, arrays, groups)."""
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
    return split_dir, arrays, len(members)


def build_from_folders(config: ArcBuildConfig) -> None:
    if config.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {config.num_workers}")
    output_dir = Path(config.output_dir)
    files = list_puzzle_files(config.dataset_dirs)
    puzzles = [load_puzzle(path, test_split) for path, test_split in files]  # all input errors before any work
    for (path, test_split), puzzle in zip(files, puzzles):
        if not puzzle.examples["train"] and not puzzle.examples["test"]:
            warn(f"{path}: puzzle has no pairs and contributes nothing")
        elif test_split == "test" and not puzzle.test_pairs:
            warn(f"{path}: evaluation puzzle has an empty 'test' list: it is not in the test split (nor in pass@K)")
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
            print(f"{split}: no pairs (test pairs come from 'evaluation' sub-folders), split not written")
            continue
        split_dir, arrays, groups = write_split_arrays(output_dir, split, puzzles, identifier_of, config.seed)
        write_metadata(split_dir, arrays, len(names), groups)
    write_identifiers(output_dir, names)
    warn_leakage(
        [(i, p.name, p.examples["test"]) for i, p in enumerate(puzzles) if p.examples["test"]],
        [(i, p.name, p.examples["train"]) for i, p in enumerate(puzzles)],
    )


# ----------------------------------------------------------------------------------------------
# ARC Prize mode (TRM's builder)
# ----------------------------------------------------------------------------------------------


@dataclass
class PrizePuzzle:
    name: str
    pairs: dict[str, list[Example]]  # split -> pairs, in the puzzle's JSON key order
    tids: np.ndarray = field(default_factory=lambda: np.zeros(1, np.uint8))  # [variants] dihedral ids, original first
    maps: np.ndarray = field(default_factory=lambda: IDENTITY_MAP[None])  # [variants, 10] colour maps

    def variant_names(self) -> list[str]:
        names = [self.name]
        for tid, colour_map in zip(self.tids[1:].tolist(), self.maps[1:].tolist()):
            names.append(f"{self.name}{TRM_SEPARATOR}t{tid}{TRM_SEPARATOR}{''.join(map(str, colour_map))}")
        return names


def load_prize_subset(prefix: str, subset: str, is_test: bool) -> tuple[list[tuple[str, dict]], list[PrizePuzzle]]:
    """One subset's puzzles in JSON order: (id, puzzle as loaded with outputs filled) and the parsed pairs."""
    challenges_path = Path(f"{prefix}_{subset}_challenges.json")
    raw = read_json(challenges_path, f"challenges file of subset '{subset}'")
    if not isinstance(raw, dict):
        raise ValueError(f"{challenges_path}: expected an object mapping puzzle ids to puzzles")
    if not raw:
        raise ValueError(f"{challenges_path}: no puzzles")
    for pid, puzzle in raw.items():
        if (
            not isinstance(puzzle, dict)
            or set(puzzle) != {"train", "test"}
            or not all(isinstance(v, list) and all(isinstance(p, dict) for p in v) for v in puzzle.values())
        ):
            raise ValueError(
                f"{challenges_path}: puzzle '{pid}': expected an object with exactly the lists 'train' and 'test' of pairs"
            )

    solutions_path = Path(f"{prefix}_{subset}_solutions.json")
    if solutions_path.is_file():
        solutions = read_json(solutions_path, "solutions file")
        if not isinstance(solutions, dict):
            raise ValueError(f"{solutions_path}: expected an object mapping puzzle ids to lists of output grids")
        for pid, puzzle in raw.items():
            grids = solutions.get(pid)
            if not isinstance(grids, list):
                raise ValueError(f"{solutions_path}: no list of output grids for puzzle '{pid}'")
            if len(grids) > len(puzzle["test"]):
                raise ValueError(
                    f"{solutions_path}: puzzle '{pid}' has {len(grids)} solutions for {len(puzzle['test'])} test inputs"
                )
            for i, (pair, grid) in enumerate(zip(puzzle["test"], grids)):
                parse_grid(grid, f"{solutions_path}: puzzle '{pid}': field 'test[{i}].output'")  # blame its own file
                pair["output"] = grid
    else:  # the caller notices it once every input has been read without error
        for puzzle in raw.values():
            for pair in puzzle["test"]:
                pair.setdefault("output", [[0]])

    parsed = []
    for pid, puzzle in raw.items():
        where = f"{challenges_path}: puzzle '{pid}'"
        pairs: dict[str, list[Example]] = {"train": []} if not is_test else {"train": [], "test": []}
        for kind, items in puzzle.items():  # JSON key order decides the order of the pairs
            pairs["test" if is_test and kind == "test" else "train"].extend(parse_pairs(items, where, kind))
        if is_test and not puzzle["test"]:
            raise ValueError(f"{where}: empty 'test' list in test subset '{subset}' (the task would score 0/0)")
        if is_test and not puzzle["train"]:
            raise ValueError(f"{where}: no demonstration pairs in test subset '{subset}'")
        if not is_test and not pairs["train"]:
            raise ValueError(f"{where}: no pairs, the puzzle contributes nothing")
        parsed.append(PrizePuzzle(name=str(pid), pairs=pairs))
    return list(raw.items()), parsed


class VariantKeys:
    """Exact duplicate test of TRM's augmentation loop: a variant's key is the multiset of its
    transformed pairs. The pairs are laid out once per dihedral id as one flat buffer (identity
    colours), so a trial costs one colour lookup over the buffer plus a sort of byte slices; a
    4-byte shape prefix makes each slice self-delimiting, so the joined key is injective."""

    def __init__(self, pairs: list[Example]):
        self.layouts = []
        for tid in range(8):
            grids = [np.ascontiguousarray(dihedral_transform(g, tid)) for pair in pairs for g in pair]
            pieces, start = [], 0
            for inp, out in zip(grids[0::2], grids[1::2]):
                end = start + inp.size + out.size
                pieces.append((bytes(inp.shape + out.shape), start, end))
                start = end
            self.layouts.append((np.concatenate([g.reshape(-1) for g in grids]), pieces))

    def key(self, tid: int, colour_map: np.ndarray) -> bytes:
        buffer, pieces = self.layouts[tid]
        data = colour_map[buffer].tobytes()
        return b"".join(sorted(prefix + data[start:end] for prefix, start, end in pieces))


def plan_prize_variants(rs: np.random.RandomState, puzzle: PrizePuzzle, num_aug: int) -> None:
    """TRM's augmentation loop on the shared RNG: trials until `num_aug` new variants or 5x num_aug trials."""
    if num_aug <= 0:
        return
    keys = VariantKeys([pair for pairs in puzzle.pairs.values() for pair in pairs])
    seen = {keys.key(0, IDENTITY_MAP)}
    tids, maps = [0], [IDENTITY_MAP]
    for _ in range(RETRIES_FACTOR * num_aug):
        tid = int(rs.randint(0, 8))
        colour_map = np.concatenate([IDENTITY_MAP[:1], rs.permutation(np.arange(1, 10, dtype=np.uint8))])
        key = keys.key(tid, colour_map)
        if key not in seen:
            seen.add(key)
            tids.append(tid)
            maps.append(colour_map)
        if len(tids) > num_aug:
            break
    puzzle.tids, puzzle.maps = np.array(tids, dtype=np.uint8), np.stack(maps)


class CanvasWindows:
    """Encoded canvases of one puzzle's pairs in one split, for every dihedral id and offset.

    Each grid (identity colours + 2, with its EOS row and column) sits at the bottom-right quarter
    of a 60x60 zero canvas; the 30x30 window starting at (30 - r, 30 - c) is then the grid placed at
    offset (r, c), with an EOS row or column that would fall off the canvas cut off, as the rule says.
    """

    def __init__(self, pairs: list[Example]):
        n = len(pairs)
        padded = np.zeros((8, n, 2, 2 * MAX_GRID, 2 * MAX_GRID), dtype=TOKEN_DTYPE)  # [tid, pair, in/out, 60, 60]
        self.ranges = np.zeros((8, n, 2), dtype=np.int64)  # offsets drawn in [0, range) per (tid, pair, axis)
        for tid in range(8):
            for i, (inp, out) in enumerate(pairs):
                inp, out = dihedral_transform(inp, tid), dihedral_transform(out, tid)
                padded[tid, i, 0, MAX_GRID:, MAX_GRID:] = grid_to_canvas(inp)
                padded[tid, i, 1, MAX_GRID:, MAX_GRID:] = grid_to_canvas(out)
                self.ranges[tid, i] = MAX_GRID + 1 - np.maximum(inp.shape, out.shape)
        # [tid, pair, in/out, 31, 31, 30, 30]: window (a, b) = canvas translated by (30 - a, 30 - b)
        self.windows = np.lib.stride_tricks.sliding_window_view(padded, (MAX_GRID, MAX_GRID), axis=(3, 4))

    def encode(self, tids, pair_ids, rows, cols, colour_maps) -> np.ndarray:
        """[examples, 2, 900] tokens: pair `pair_ids[e]` under `tids[e]`, `colour_maps[e]`, at offset (rows, cols)."""
        block = self.windows[tids, pair_ids, :, MAX_GRID - rows, MAX_GRID - cols]  # [examples, 2, 30, 30]
        lut = np.concatenate(  # [examples, 12]: token -> token under the colour map (PAD, EOS fixed)
            [np.broadcast_to(np.array([PAD, EOS], TOKEN_DTYPE), (len(tids), 2)), colour_maps + COLOUR_OFFSET], axis=1
        )
        flat = block.reshape(len(tids), 2 * MAX_GRID * MAX_GRID)  # [examples, 1800]
        return np.take_along_axis(lut, flat, axis=1).reshape(len(tids), 2, MAX_GRID * MAX_GRID)


def write_prize_split(rs, split_dir: Path, members: list[PrizePuzzle], split: str, identifier_of: dict[str, int]):
    """Stream one split; in the train split, draw TRM's kept-in-place example and offsets per variant."""
    total = sum(len(p.pairs[split]) * len(p.tids) for p in members)
    split_dir.mkdir(parents=True, exist_ok=True)
    paths = split_paths(split_dir, SET_NAME)
    inputs = NpyWriter(paths["inputs"], TOKEN_DTYPE, (total, MAX_GRID**2))
    labels = NpyWriter(paths["labels"], TOKEN_DTYPE, (total, MAX_GRID**2))
    identifiers, puzzle_sizes, group_sizes = [], [], []
    translate = split == "train"
    for puzzle in tqdm(members, desc=f"write {split}", unit="puzzle"):
        pairs = puzzle.pairs[split]
        n = len(pairs)
        canvases = CanvasWindows(pairs)
        identifiers.extend(identifier_of[name] for name in puzzle.variant_names())
        puzzle_sizes.extend([n] * len(puzzle.tids))
        group_sizes.append(len(puzzle.tids))
        for first in range(0, len(puzzle.tids), VARIANTS_PER_BLOCK):
            tids = np.repeat(puzzle.tids[first : first + VARIANTS_PER_BLOCK].astype(np.int64), n)  # [examples]
            pair_ids = np.tile(np.arange(n), len(tids) // n)
            offsets = np.zeros((len(tids), 2), dtype=np.int64)  # [examples, (row, col)]
            if translate:  # the test split is written last and draws nothing that matters: skipped
                ranges = canvases.ranges[tids, pair_ids].reshape(-1, n, 2)  # [variants, pairs, 2]
                for v, variant_ranges in enumerate(ranges):
                    kept = rs.randint(0, n)
                    moved = np.delete(np.arange(n), kept)
                    if moved.size:
                        offsets[v * n + moved] = rs.randint(0, variant_ranges[moved]).reshape(-1, 2)
            maps = np.repeat(puzzle.maps[first : first + VARIANTS_PER_BLOCK], n, axis=0)
            tokens = canvases.encode(tids, pair_ids, offsets[:, 0], offsets[:, 1], maps)
            inputs.write(tokens[:, 0])
            labels.write(tokens[:, 1])
    arrays = {
        "inputs": inputs.close(),
        "labels": labels.close(),
        "puzzle_identifiers": np.array(identifiers, dtype=INDEX_DTYPE),
        "puzzle_indices": np.concatenate([[0], np.cumsum(puzzle_sizes)]).astype(INDEX_DTYPE),
        "group_indices": np.concatenate([[0], np.cumsum(group_sizes)]).astype(INDEX_DTYPE),
    }
    return arrays, len(members)


def check_prize_flags(config: ArcBuildConfig) -> set[str]:
    """The test subsets, after checking the ARC Prize flags against each other."""
    if config.dataset_dirs != DEFAULT_DATASET_DIRS or config.num_workers != 1:
        raise ValueError("--dataset-dirs and --num-workers belong to folder mode, not to --input-file-prefix builds")
    if not config.subsets:
        raise ValueError("--subsets: required with --input-file-prefix (e.g. --subsets training evaluation)")
    if config.test_set_name is None:
        raise ValueError("--test-set-name: required with --input-file-prefix (e.g. --test-set-name evaluation)")
    repeated = sorted({s for s in config.subsets if config.subsets.count(s) > 1})
    if repeated:
        raise ValueError(f"--subsets: {', '.join(repeated)} listed more than once")
    for flag, name in (("--test-set-name", config.test_set_name), ("--test-set-name2", config.test_set_name2)):
        if name is not None and name not in config.subsets:
            raise ValueError(f"{flag}: '{name}' is not among --subsets ({' '.join(config.subsets)})")
    if config.puzzle_identifiers_start < 1:
        raise ValueError(
            f"--puzzle-identifiers-start must be >= 1 (0 is the blank), got {config.puzzle_identifiers_start}"
        )
    return {config.test_set_name, config.test_set_name2} - {None}


def build_from_prize_files(config: ArcBuildConfig) -> None:
    test_subsets = check_prize_flags(config)
    output_dir = Path(config.output_dir)
    loaded = [load_prize_subset(config.input_file_prefix, s, s in test_subsets) for s in config.subsets]  # errors first
    for subset in config.subsets:
        solutions_path = Path(f"{config.input_file_prefix}_{subset}_solutions.json")
        if not solutions_path.is_file():
            print(f"notice: {solutions_path} not found: test outputs of subset '{subset}' are [[0]]", file=sys.stderr)

    rs = np.random.RandomState(config.seed)  # TRM seeds NumPy's global RNG once: the same stream
    puzzles: list[PrizePuzzle] = []
    test_puzzles: dict[str, dict] = {}  # as loaded, outputs filled; TRM's test_puzzles.json
    for subset, (raw_items, parsed) in zip(config.subsets, loaded):
        order = list(range(len(parsed)))
        rs.shuffle(order)  # the same draws as TRM's shuffle of its (id, puzzle) list
        for i in tqdm(order, desc=f"plan {subset}", unit="puzzle"):
            plan_prize_variants(rs, parsed[i], config.num_aug)
            puzzles.append(parsed[i])
            if subset in test_subsets:
                test_puzzles[raw_items[i][0]] = raw_items[i][1]
    short = sum(len(p.tids) < config.num_aug + 1 for p in puzzles)
    if short:
        print(f"{short} of {len(puzzles)} puzzles have fewer than {config.num_aug} distinct augmentations")

    members = {split: [p for p in puzzles if split in p.pairs] for split in SPLITS}
    names = [BLANK_IDENTIFIER_NAME] * config.puzzle_identifiers_start
    identifier_of: dict[str, int] = {}
    for split in SPLITS:  # first appearance, train split first (puzzle names may repeat across subsets)
        for puzzle in members[split]:
            for name in puzzle.variant_names():
                if name not in identifier_of:
                    identifier_of[name] = len(names)
                    names.append(name)

    for split in SPLITS:
        arrays, groups = write_prize_split(rs, output_dir / split, members[split], split, identifier_of)
        write_metadata(output_dir / split, arrays, len(names), groups)
    write_identifiers(output_dir, names)
    (output_dir / "test_puzzles.json").write_text(json.dumps(test_puzzles))
    warn_leakage(
        [(i, p.name, p.pairs["test"]) for i, p in enumerate(puzzles) if "test" in p.pairs],
        [(i, p.name, p.pairs["train"]) for i, p in enumerate(puzzles)],
    )


def main(config: ArcBuildConfig) -> None:
    """Build an ARC dataset (train/, test/, identifiers.json) from puzzle folders, or from ARC Prize files (--input-file-prefix)."""
    if config.num_aug < 0:
        raise ValueError(f"--num-aug must be >= 0, got {config.num_aug}")
    prize_only = {"--subsets": config.subsets, "--test-set-name": config.test_set_name}
    prize_only["--test-set-name2"] = config.test_set_name2
    if config.input_file_prefix is not None:
        build_from_prize_files(config)
    elif any(v is not None for v in prize_only.values()) or config.puzzle_identifiers_start != 1:
        given = [flag for flag, v in prize_only.items() if v is not None]
        given += ["--puzzle-identifiers-start"] if config.puzzle_identifiers_start != 1 else []
        raise ValueError(f"{', '.join(given)}: only with --input-file-prefix (ARC Prize mode)")
    else:
        build_from_folders(config)


def command_line() -> int:
    """`python dataset/build_arc_dataset.py ...` and `hrm-build-arc ...`: flags, one-line errors, the exit status."""
    return run_cli(main, ArcBuildConfig)


if __name__ == "__main__":
    sys.exit(command_line())
