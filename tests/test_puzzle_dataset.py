"""Loader (puzzle_dataset.py) and dataset/common.py: sampling, sharding, collate, resume, validation."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from dataset.common import (
    DIHEDRAL_INVERSE,
    PuzzleDatasetMetadata,
    dihedral_transform,
    inverse_dihedral_transform,
    write_split,
)
from puzzle_dataset import IGNORE_LABEL_ID, PuzzleDataset, PuzzleDatasetConfig

SEQ = 5
PAD, IGNORE, BLANK = 7, 3, 0


def make_dataset(root, puzzle_sizes_per_group, seed=0, split="train"):
    """Synthetic split: example i has inputs[i, 0] = i; labels contain the ignore id at column 1.

    Returns the per-example puzzle id and per-puzzle group id for independent checks.
    """
    rng = np.random.default_rng(seed)
    puzzle_sizes = [s for group in puzzle_sizes_per_group for s in group]
    n = sum(puzzle_sizes)
    inputs = np.zeros((n, SEQ), dtype=np.int32)
    inputs[:, 0] = np.arange(n)
    inputs[:, 1:] = rng.integers(8, 12, size=(n, SEQ - 1))
    labels = inputs.copy()
    labels[:, 1] = IGNORE
    puzzle_indices = np.concatenate([[0], np.cumsum(puzzle_sizes)]).astype(np.int32)
    group_indices = np.concatenate([[0], np.cumsum([len(g) for g in puzzle_sizes_per_group])]).astype(np.int32)
    identifiers = np.arange(1, len(puzzle_sizes) + 1, dtype=np.int32)
    meta = PuzzleDatasetMetadata(
        pad_id=PAD,
        ignore_label_id=IGNORE,
        blank_identifier_id=BLANK,
        vocab_size=max(12, n),  # inputs[:, 0] holds the example index, a token id below vocab_size
        seq_len=SEQ,
        num_puzzle_identifiers=len(puzzle_sizes) + 1,
        total_groups=len(puzzle_sizes_per_group),
        mean_puzzle_examples=n / len(puzzle_sizes),
        sets=["all"],
    )
    arrays = {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": identifiers,
        "puzzle_indices": puzzle_indices,
        "group_indices": group_indices,
    }
    write_split(root / split, meta, {"all": arrays})
    example_puzzle = np.repeat(np.arange(len(puzzle_sizes)), puzzle_sizes)
    puzzle_group = np.repeat(np.arange(len(puzzle_sizes_per_group)), [len(g) for g in puzzle_sizes_per_group])
    return example_puzzle, puzzle_group


def loader(root, *, batch, test=False, epochs=1, rank=0, replicas=1, seed=0, split="train"):
    cfg = PuzzleDatasetConfig(
        seed=seed,
        dataset_path=str(root),
        global_batch_size=batch,
        test_set_mode=test,
        epochs_per_iter=epochs,
        rank=rank,
        num_replicas=replicas,
    )
    return PuzzleDataset(cfg, split)


def real_rows(batch):
    """Example ids of the non-padding rows of a batch."""
    keep = batch["puzzle_identifiers"] != BLANK
    return batch["inputs"][keep, 0].tolist()


# ---- train sampling -------------------------------------------------------------------------


def test_every_group_once_per_epoch(tmp_path):
    # 12 groups of one-example puzzles (1..3 per group); batch 4 divides 12: nothing dropped.
    sizes = [[1] * (1 + g % 3) for g in range(12)]
    ex_puzzle, puzzle_group = make_dataset(tmp_path, sizes)
    batches = [b for _, b, _ in loader(tmp_path, batch=4, epochs=3)]
    assert len(batches) == 9
    groups = [int(puzzle_group[ex_puzzle[i]]) for b in batches for i in real_rows(b)]
    for epoch in range(3):
        assert sorted(groups[epoch * 12 : (epoch + 1) * 12]) == list(range(12))
    # Within each group the chosen puzzle varies over many epochs (uniform choice, not always the first).
    many = [b for _, b, _ in loader(tmp_path, batch=4, epochs=60)]
    chosen = Counter(int(ex_puzzle[i]) for b in many for i in real_rows(b))
    assert all(chosen[p] > 0 for p in range(len(ex_puzzle)))


def test_multi_example_puzzles_sampled_without_replacement(tmp_path):
    sizes = [[3, 5], [2], [4, 1, 6], [5], [2, 2]] * 4
    ex_puzzle, puzzle_group = make_dataset(tmp_path, sizes)
    batches = list(loader(tmp_path, batch=6, epochs=1))  # one epoch: consecutive groups differ
    assert len(batches) >= 5
    for _, batch, global_size in batches:
        assert global_size == 6 and batch["inputs"].shape == (6, SEQ)  # drop-last: only full batches
        ids = real_rows(batch)
        runs = [[ids[0]]]
        for i in ids[1:]:
            (runs[-1].append(i) if ex_puzzle[i] == ex_puzzle[runs[-1][-1]] else runs.append([i]))
        for run in runs:
            puzzle = ex_puzzle[run[0]]
            assert len(set(run)) == len(run)  # no repeats inside a puzzle
            assert all(ex_puzzle[i] == puzzle for i in run)
            # a run is the whole puzzle unless the batch was full before it ended (only the last run)
            if run is not runs[-1]:
                assert len(run) == int(np.sum(ex_puzzle == puzzle))
        # identifiers follow the sampled puzzle
        assert batch["puzzle_identifiers"].tolist() == [int(ex_puzzle[i]) + 1 for i in ids]


def test_drop_last_and_batch_count(tmp_path):
    sizes = [[1]] * 10
    make_dataset(tmp_path, sizes)
    batches = list(loader(tmp_path, batch=4, epochs=1))
    assert len(batches) == 10 // 4  # the 2 left-over groups are dropped


def test_same_seed_same_batches_and_iterations_differ(tmp_path):
    make_dataset(tmp_path, [[2, 3]] * 9)
    a, b = loader(tmp_path, batch=4), loader(tmp_path, batch=4)
    first_a = [x["inputs"] for _, x, _ in a]
    first_b = [x["inputs"] for _, x, _ in b]
    assert all(torch.equal(x, y) for x, y in zip(first_a, first_b))
    second_a = [x["inputs"] for _, x, _ in a]  # next iteration: Philox seed + 2
    assert not all(torch.equal(x, y) for x, y in zip(first_a, second_a))


def test_two_replicas_form_the_global_batch(tmp_path):
    make_dataset(tmp_path, [[1, 2], [3], [2, 2, 1], [4], [1], [2]] * 3)
    whole = list(loader(tmp_path, batch=8, epochs=2))
    r0 = list(loader(tmp_path, batch=8, epochs=2, rank=0, replicas=2))
    r1 = list(loader(tmp_path, batch=8, epochs=2, rank=1, replicas=2))
    assert len(whole) == len(r0) == len(r1) > 0
    for (_, g, gs), (_, a, s0), (_, b, s1) in zip(whole, r0, r1):
        assert gs == s0 == s1 == 8
        for key in g:
            assert a[key].shape[0] == b[key].shape[0] == 4
            assert torch.equal(torch.cat([a[key], b[key]]), g[key])
    # with one epoch per iteration no example can appear twice in a global batch: slices are disjoint
    for (_, a, _), (_, b, _) in zip(
        loader(tmp_path, batch=8, rank=0, replicas=2), loader(tmp_path, batch=8, rank=1, replicas=2)
    ):
        assert not set(real_rows(a)) & set(real_rows(b))


# ---- test mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas,batch", [(1, 5), (2, 6), (2, 20), (3, 9)])
def test_test_mode_covers_every_example_once(tmp_path, replicas, batch):
    sizes = [[1, 3], [2], [1, 1, 4], [5]]
    ex_puzzle, _ = make_dataset(tmp_path, sizes, split="test")
    n = len(ex_puzzle)
    seen = Counter()
    per_rank = [
        list(loader(tmp_path, batch=batch, test=True, rank=r, replicas=replicas, split="test")) for r in range(replicas)
    ]
    assert len({len(p) for p in per_rank}) == 1  # every rank yields the same number of batches
    for step, results in enumerate(zip(*per_rank)):
        expected_global = min(batch, n - step * batch)
        for _, b, global_size in results:
            assert global_size == expected_global
            assert b["inputs"].shape == (batch // replicas, SEQ)
            ids = real_rows(b)
            seen.update(ids)
            assert b["puzzle_identifiers"][: len(ids)].tolist() == [int(ex_puzzle[i]) + 1 for i in ids]
    assert seen == Counter(range(n))
    # the rows come in order: concatenating rank slices of each step gives 0..n-1
    order = [i for results in zip(*per_rank) for _, b, _ in results for i in real_rows(b)]
    assert order == list(range(n))


def test_collate_ignore_label_and_padding(tmp_path):
    make_dataset(tmp_path, [[1]] * 5, split="test")
    batches = list(loader(tmp_path, batch=4, test=True, rank=1, replicas=2, split="test"))
    # second global batch holds only example 4, which belongs to rank 0: rank 1 is all padding
    _, last, global_size = batches[-1]
    assert global_size == 1
    assert (last["inputs"] == PAD).all() and (last["labels"] == IGNORE_LABEL_ID).all()
    assert (last["puzzle_identifiers"] == BLANK).all()
    _, first, _ = batches[0]
    assert all(t.dtype == torch.int32 for t in first.values())
    assert (first["labels"][:, 1] == IGNORE_LABEL_ID).all()  # ignore_label_id mapped to -100
    assert (first["labels"][:, 2:] == first["inputs"][:, 2:]).all()  # other labels untouched
    rank0 = list(loader(tmp_path, batch=4, test=True, rank=0, replicas=2, split="test"))
    _, partial, _ = rank0[-1]
    assert partial["inputs"][0, 0] == 4 and (partial["inputs"][1] == PAD).all()
    assert partial["labels"][1].tolist() == [IGNORE_LABEL_ID] * SEQ and partial["puzzle_identifiers"][1] == BLANK


# ---- resume ----------------------------------------------------------------------------------


class CountingArray:
    """Wraps an array, counting row reads (to prove skipped batches read no inputs/labels)."""

    def __init__(self, arr):
        self.arr, self.reads, self.shape = arr, 0, arr.shape

    def __getitem__(self, idx):
        self.reads += 1
        return self.arr[idx]


@pytest.mark.parametrize("skip", [0, 1, 3])
def test_set_position_matches_uninterrupted_run(tmp_path, skip):
    make_dataset(tmp_path, [[1, 2], [3], [2, 2], [1]] * 4)
    fresh = loader(tmp_path, batch=4, epochs=2)
    run = [[b for _, b, _ in fresh] for _ in range(3)]  # three iterations
    resumed = loader(tmp_path, batch=4, epochs=2)
    resumed.set_position(1, skip)
    resumed._lazy_load()
    counter = CountingArray(resumed._data["all"]["inputs"])
    resumed._data["all"]["inputs"] = counter
    second = [b for _, b, _ in resumed]
    assert counter.reads == len(run[1]) - skip  # only the yielded batches were read
    assert len(second) == len(run[1]) - skip
    for x, y in zip(second, run[1][skip:]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    third = [b for _, b, _ in resumed]  # later iterations continue normally
    assert len(third) == len(run[2]) and all(torch.equal(x["inputs"], y["inputs"]) for x, y in zip(third, run[2]))


def test_inputs_are_memory_mapped_and_opened_lazily(tmp_path):
    make_dataset(tmp_path, [[1]] * 4)
    ds = loader(tmp_path, batch=2)
    assert ds._data is None  # constructor reads dataset.json only
    next(iter(ds))
    assert isinstance(ds._data["all"]["inputs"], np.memmap) and isinstance(ds._data["all"]["labels"], np.memmap)
    assert not isinstance(ds._data["all"]["puzzle_indices"], np.memmap)


def test_dataloader_one_worker(tmp_path):
    make_dataset(tmp_path, [[1]] * 8)
    ds = loader(tmp_path, batch=4)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, persistent_workers=True)
    direct = [b["inputs"] for _, b, _ in loader(tmp_path, batch=4)]
    through = [b["inputs"] for _, b, _ in dl]
    assert all(torch.equal(x, y) for x, y in zip(direct, through)) and len(through) == 2


# ---- validation / bad input ------------------------------------------------------------------


def test_missing_split_folder(tmp_path):
    make_dataset(tmp_path, [[1]] * 4)
    with pytest.raises(FileNotFoundError, match=r"test: split folder not found"):
        loader(tmp_path, batch=2, split="test")


def test_inconsistent_dataset_json(tmp_path):
    make_dataset(tmp_path, [[1]] * 4)
    path = tmp_path / "train" / "dataset.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "seq_len": SEQ + 1}))
    with pytest.raises(ValueError, match=r"all__inputs\.npy: shape \(4, 5\) does not match \[N, seq_len=6\]"):
        next(iter(loader(tmp_path, batch=2)))
    del meta["vocab_size"]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dataset\.json: field 'vocab_size': Field required"):
        loader(tmp_path, batch=2)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"dataset\.json: malformed JSON"):
        loader(tmp_path, batch=2)


def test_mismatched_array_lengths(tmp_path):
    make_dataset(tmp_path, [[1]] * 4)
    np.save(tmp_path / "train" / "all__labels.npy", np.zeros((3, SEQ), np.int32))
    with pytest.raises(ValueError, match=r"all__labels\.npy: 3 rows but all__inputs\.npy has 4"):
        next(iter(loader(tmp_path, batch=2)))
    make_dataset(tmp_path, [[1]] * 4)
    np.save(tmp_path / "train" / "all__puzzle_indices.npy", np.array([0, 2, 1, 3, 4], np.int32))
    with pytest.raises(ValueError, match=r"all__puzzle_indices\.npy: offsets not strictly increasing at position 2"):
        next(iter(loader(tmp_path, batch=2)))
    make_dataset(tmp_path, [[1]] * 4)
    np.save(tmp_path / "train" / "all__group_indices.npy", np.array([0, 1, 2, 3], np.int32))
    with pytest.raises(ValueError, match=r"all__group_indices\.npy: last offset 3 != number of puzzles 4"):
        next(iter(loader(tmp_path, batch=2)))
    (tmp_path / "train" / "all__labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"all__labels\.npy: array file listed by"):
        loader(tmp_path, batch=2)


def test_bad_replica_layout(tmp_path):
    make_dataset(tmp_path, [[1]] * 4)
    with pytest.raises(ValueError, match="multiple of num_replicas"):
        loader(tmp_path, batch=3, replicas=2)


# ---- dihedral transforms ---------------------------------------------------------------------


def test_dihedral_transforms_against_index_formulas():
    a = np.arange(12).reshape(3, 4)  # rectangular, no symmetry
    h, w = a.shape
    expected = {
        0: lambda i, j: a[i, j],
        1: lambda i, j: a[j, w - 1 - i],  # counter-clockwise quarter turn, shape (w, h)
        2: lambda i, j: a[h - 1 - i, w - 1 - j],
        3: lambda i, j: a[h - 1 - j, i],
        4: lambda i, j: a[i, w - 1 - j],
        5: lambda i, j: a[h - 1 - i, j],
        6: lambda i, j: a[j, i],
        7: lambda i, j: a[h - 1 - j, w - 1 - i],  # anti-transpose
    }
    results = []
    for tid, f in expected.items():
        out = dihedral_transform(a, tid)
        assert out.shape == ((h, w) if tid in (0, 2, 4, 5) else (w, h))
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                assert out[i, j] == f(i, j), (tid, i, j)
        assert np.array_equal(inverse_dihedral_transform(out, tid), a)
        assert np.array_equal(dihedral_transform(out, DIHEDRAL_INVERSE[tid]), a)
        results.append(out.tobytes() + bytes(out.shape))
    assert len(set(results)) == 8
    assert list(DIHEDRAL_INVERSE) == [0, 3, 2, 1, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="0..7"):
        dihedral_transform(a, 8)
