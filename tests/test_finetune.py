"""The README's fine-tuning recipe: a trained checkpoint (`load_checkpoint`) adapted to new puzzles by training
their puzzle-embedding rows alone (`freeze_weights=true`).

The new dataset has its own puzzles and identifiers (fewer than the checkpoint's table has rows, so the table
starts as the checkpoint's mean row, TRM's rule). The new puzzles' loss and accuracy must improve over those of
the starting weights, while every other weight stays bit-identical to the checkpoint's.
"""

import shutil

import pytest
import torch

import pretrain
from tests.helpers import make_tiny_dataset, tiny_config
from training.build import PUZZLE_TABLE_KEY, create_dataloader
from training.evaluation import evaluate
from utils.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

pytestmark = pytest.mark.slow


def test_fine_tuning_the_puzzle_embedding_on_new_puzzles_learns_them(tmp_path):
    trained = make_tiny_dataset(tmp_path / "trained", num_groups=6)
    pretrain.run(tiny_config(trained, tmp_path / "base", "evaluators=[]"))
    checkpoint = tmp_path / "base" / "step_6"
    # New puzzles (other inputs, other identifiers), scored on the examples they are fine-tuned on.
    new = make_tiny_dataset(tmp_path / "new", num_groups=4, seed=1)
    shutil.rmtree(new / "test")
    shutil.copytree(new / "train", new / "test")
    config = tiny_config(
        new, tmp_path / "tuned", "evaluators=[]", f"load_checkpoint={checkpoint}", "freeze_weights=true", "epochs=16",
        "eval_interval=16", "puzzle_emb_lr=0.1",
    )  # fmt: skip
    dataset, _ = create_dataloader(config, "train", CPU, test_set_mode=False, epochs=1)
    start, _ = pretrain.init_train_state(config, dataset.metadata, CPU)  # the weights fine-tuning starts from
    test_dataset, loader = create_dataloader(config, "test", CPU, test_set_mode=True, epochs=1)
    start.model.eval()
    before = evaluate(config, start, loader, test_dataset.metadata, CPU)["all"]

    tuned = pretrain.run(config)
    after = evaluate(config, tuned, loader, test_dataset.metadata, CPU)["all"]
    # Measured on CPU: loss 1.64 -> 1.51, cell accuracy 32% -> 44% in 16 steps.
    assert after["lm_loss"] < 0.95 * before["lm_loss"] and after["accuracy"] > before["accuracy"] + 0.05, (
        before,
        after,
    )

    base, final = (
        torch.load(checkpoint, weights_only=True),
        torch.load(tmp_path / "tuned" / "step_16", weights_only=True),
    )
    assert final[PUZZLE_TABLE_KEY].shape[0] == dataset.metadata.num_puzzle_identifiers < base[PUZZLE_TABLE_KEY].shape[0]
    assert not torch.equal(final[PUZZLE_TABLE_KEY], start.model.state_dict()[PUZZLE_TABLE_KEY])
    assert final.keys() == base.keys()
    for key in base:
        if key != PUZZLE_TABLE_KEY:
            assert torch.equal(final[key], base[key]), key
