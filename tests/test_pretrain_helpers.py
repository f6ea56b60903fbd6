"""The tiny dataset of tests/helpers.py loads as the launcher reads it."""

import numpy as np

from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from tests.helpers import make_tiny_dataset


def test_tiny_dataset_loads(tmp_path):
    make_tiny_dataset(tmp_path)
    ds = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=0,
            dataset_path=str(tmp_path),
            global_batch_size=4,
            test_set_mode=False,
            epochs_per_iter=1,
            rank=0,
            num_replicas=1,
        )
    )
    batches = list(ds)
    assert len(batches) == 6 // 4  # one group per batch slot, last partial batch dropped
    _, batch, size = batches[0]
    assert size == 4
    np.testing.assert_array_equal(batch["labels"].numpy(), batch["inputs"].numpy()[:, ::-1])
