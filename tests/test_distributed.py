"""A 2-process gloo run through torchrun on the tiny config: every rank ends with the same weights."""

import pytest
import torch

from tests.helpers import TINY_ARCH, make_tiny_dataset, metric_records, run_two_rank_training


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_rank_gloo_run_keeps_ranks_identical(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", num_groups=8)
    overrides = [
        *TINY_ARCH,
        f"data_path={data}",
        f"checkpoint_path={tmp_path / 'ckpt'}",
        "global_batch_size=4",  # 2 rows per rank
        "epochs=2",
        "eval_interval=1",
        "lr=1e-3",
        "lr_warmup_steps=1",
        "use_wandb=false",
        "device=cpu",
    ]
    rank0, rank1, meta0, meta1 = run_two_rank_training(tmp_path, overrides)
    total_steps = 2 * 8 // 4
    assert meta0["step"] == meta1["step"] == total_steps
    # Rank 0 chose the run name (random slug) and broadcast it: both ranks agree.
    assert meta0["config"]["run_name"] == meta1["config"]["run_name"]
    assert meta0["config"]["run_name"].startswith("HierarchicalReasoningModel_ACTV1 ")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # The saved checkpoint is rank 0's model, and training moved the weights and the puzzle embedding.
    saved = torch.load(tmp_path / "ckpt" / f"step_{total_steps}", weights_only=True)
    for key in rank0:
        assert torch.equal(saved[key], rank0[key]), key
    assert rank0["model.inner.puzzle_emb.weights"].abs().sum() > 0  # zero-initialised, so SignSGD stepped it
    # Eval predictions were not requested; metrics went to rank 0's JSON lines only.
    assert (tmp_path / "ckpt" / "metrics.jsonl").read_text().count("all/accuracy") == 2


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_rank_async_metrics_run_equals_waited_run(tmp_path):
    """`async_metrics` (the GPU default: each step's metric sums are reduced to rank 0 and read one step late)
    gives the same weights on both ranks and the same metric lines as waiting for every step."""
    data = make_tiny_dataset(tmp_path / "data", num_groups=8)
    results = {}
    for mode in ("false", "true"):
        run_dir = tmp_path / mode
        run_dir.mkdir()
        overrides = [
            *TINY_ARCH,
            f"data_path={data}",
            f"checkpoint_path={run_dir / 'ckpt'}",
            "run_name=same",
            "global_batch_size=4",
            "epochs=2",
            "eval_interval=1",
            "lr=1e-3",
            "lr_warmup_steps=1",
            "use_wandb=false",
            "device=cpu",
            f"async_metrics={mode}",
        ]
        rank0, rank1, _, _ = run_two_rank_training(run_dir, overrides)
        results[mode] = (rank0, rank1, metric_records(run_dir / "ckpt" / "metrics.jsonl"))
    (w0, w1, lines_waited), (a0, a1, lines_async) = results["false"], results["true"]
    assert all(torch.equal(w1[key], w0[key]) for key in w0)
    for key in w0:
        assert torch.equal(a0[key], w0[key]) and torch.equal(a1[key], w0[key]), key
    assert len(lines_async) > 4 and lines_async == lines_waited
