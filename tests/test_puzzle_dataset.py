"""Loader (puzzle_dataset.py) and dataset/common.py: sampling, sharding, collate, resume, validation."""

import io
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
    path.write_bytes(b'{"pad_id": \xff}')  # not UTF-8
    with pytest.raises(ValueError, match=r"dataset\.json: malformed JSON"):
        loader(tmp_path, batch=2)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"dataset\.json: expected a JSON object of metadata fields"):
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


def rewrite(root, field, change, split="train", set_name="all"):
    path = root / split / f"{set_name}__{field}.npy"
    np.save(path, change(np.load(path)))


def with_value(row, col, value, dtype=None):
    def change(a):
        a = a.astype(dtype or a.dtype)
        a[row, col] = value
        return a

    return change


@pytest.mark.parametrize(
    "field, change, message",
    [
        # The last row of a 40-example split: in the old per-batch check, found only if ever sampled.
        (
            "inputs",
            with_value(39, 4, 40),
            r"all__inputs\.npy: row 39, position 4: token id 40 outside \[0, vocab_size=40\)",
        ),
        ("inputs", with_value(17, 2, -1, np.int8), r"all__inputs\.npy: row 17, position 2: token id -1 outside"),
        ("labels", with_value(0, 3, 2**40, np.int64), r"all__labels\.npy: row 0, position 3: token id 1099511627776"),
        ("labels", with_value(25, 0, -100, np.int16), r"all__labels\.npy: row 25, position 0: token id -100 outside"),
    ],
)
@pytest.mark.parametrize("block_bytes", [1 << 24, 3 * SEQ * 8])  # one block, or blocks of a few rows
def test_token_ids_of_every_row_checked_when_opened(tmp_path, monkeypatch, field, change, message, block_bytes):
    monkeypatch.setattr("dataset.common.TOKEN_CHECK_BYTES", block_bytes)
    make_dataset(tmp_path, [[1]] * 40)
    loader(tmp_path, batch=4)  # the unchanged split opens
    rewrite(tmp_path, field, change)
    for test_mode in (False, True):
        with pytest.raises(ValueError, match=message):
            loader(tmp_path, batch=4, test=test_mode)  # the constructor: before any batch is drawn


def test_ignore_label_id_outside_the_vocabulary_is_allowed_in_labels_only(tmp_path, monkeypatch):
    monkeypatch.setattr("dataset.common.TOKEN_CHECK_BYTES", 2 * SEQ * 2)
    make_dataset(tmp_path, [[1]] * 6)
    meta_path = tmp_path / "train" / "dataset.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "ignore_label_id": -1}))
    rewrite(tmp_path, "labels", lambda a: np.where(np.arange(SEQ) == 1, -1, a).astype(np.int16))
    batch = next(iter(loader(tmp_path, batch=2)))[1]
    assert (batch["labels"][:, 1] == IGNORE_LABEL_ID).all()
    rewrite(tmp_path, "inputs", with_value(5, 3, -1, np.int16))
    with pytest.raises(ValueError, match=r"all__inputs\.npy: row 5, position 3: token id -1 outside"):
        loader(tmp_path, batch=2)


def test_every_set_of_the_split_is_checked(tmp_path):
    meta = PuzzleDatasetMetadata(
        pad_id=0, ignore_label_id=None, blank_identifier_id=0, vocab_size=4, seq_len=2, num_puzzle_identifiers=1,
        total_groups=3, mean_puzzle_examples=1.0, sets=["a", "b"],
    )  # fmt: skip

    def arrays(n):
        return {
            "inputs": np.ones((n, 2), np.uint8), "labels": np.ones((n, 2), np.uint8),
            "puzzle_identifiers": np.zeros(n, np.int32), "puzzle_indices": np.arange(n + 1, dtype=np.int32),
            "group_indices": np.arange(n + 1, dtype=np.int32),
        }  # fmt: skip

    write_split(tmp_path / "train", meta, {"a": arrays(2), "b": arrays(1)})
    loader(tmp_path, batch=1)
    rewrite(tmp_path, "labels", with_value(0, 1, 4), set_name="b")
    with pytest.raises(ValueError, match=r"train/b__labels\.npy: row 0, position 1: token id 4 outside"):
        loader(tmp_path, batch=1)


def test_writer_refuses_token_ids_the_loader_would_reject(tmp_path):
    make_dataset(tmp_path, [[1]] * 4)
    meta = PuzzleDatasetMetadata.model_validate_json((tmp_path / "train" / "dataset.json").read_text())
    arrays = {f: np.load(tmp_path / "train" / f"all__{f}.npy") for f in ("inputs", "puzzle_identifiers",
              "puzzle_indices", "group_indices")}  # fmt: skip
    arrays["labels"] = with_value(2, 2, meta.vocab_size)(arrays["inputs"])
    with pytest.raises(ValueError, match=r"out/all__labels\.npy: row 2, position 2: token id 12 outside"):
        write_split(tmp_path / "out", meta, {"all": arrays})


def npz_bytes():
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(3))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "field, content, message",
    [
        ("inputs", b"", r"all__inputs\.npy: cannot read \.npy file \(No data left in file\)"),
        ("labels", b"\x93NUMPY\x01\x00v\x00{'descr'", r"all__labels\.npy: cannot read \.npy file \(EOF"),
        ("puzzle_indices", npz_bytes(), r"all__puzzle_indices\.npy: not a \.npy array file \(found a NpzFile\)"),
        (
            "group_indices",
            b"\x80\x04K\x01.",
            r"all__group_indices\.npy: cannot read \.npy file \(This file contains pickled",
        ),
    ],
)
def test_unreadable_array_file_is_one_error_naming_it(tmp_path, field, content, message):
    make_dataset(tmp_path, [[1]] * 4)
    (tmp_path / "train" / f"all__{field}.npy").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        loader(tmp_path, batch=2)


def test_truncated_inputs_file_is_one_error_naming_it(tmp_path):
    make_dataset(tmp_path, [[1]] * 4)
    path = tmp_path / "train" / "all__inputs.npy"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"all__inputs\.npy: cannot read \.npy file \(mmap length is greater"):
        loader(tmp_path, batch=2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pad_id": 40}, r"field 'pad_id' must be in \[0, vocab_size=12\), got 40"),
        ({"sets": ["all", "all"]}, r"field 'sets' lists 'all' more than once"),
        ({"total_groups": 0}, r"field 'total_groups' is 0, but the group_indices arrays hold 4"),
        ({"total_groups": 1000}, r"field 'total_groups' is 1000, but the group_indices arrays hold 4"),
        ({"mean_puzzle_examples": 2.0}, r"field 'mean_puzzle_examples' is 2.0, but the arrays hold 4 examples in 4"),
    ],
)
def test_dataset_json_that_contradicts_the_arrays(tmp_path, change, message):
    make_dataset(tmp_path, [[1]] * 4)
    path = tmp_path / "train" / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=r"train/dataset\.json: " + message):
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
