"""Sparse puzzle embedding and its sign-SGD optimizer: hand-computed updates and a 2-process gloo run."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
from models.losses import ACTLossHead
from models.sparse_embedding import CastedSparseEmbedding, CastedSparseEmbeddingSignSGD_Distributed
from tests.helpers import free_port


def make_embedding(num=6, dim=2, batch=4, cast_to=torch.float32) -> CastedSparseEmbedding:
    emb = CastedSparseEmbedding(num, dim, batch_size=batch, init_std=0, cast_to=cast_to)
    with torch.no_grad():
        emb.weights.copy_(torch.arange(num * dim, dtype=torch.float32).view(num, dim) / 10 - 0.3)
    return emb


def test_zero_init_buffers_and_state_dict():
    emb = CastedSparseEmbedding(10, 4, batch_size=3, init_std=0, cast_to=torch.bfloat16)
    assert torch.count_nonzero(emb.weights) == 0 and emb.weights.dtype == torch.float32
    assert list(emb.state_dict()) == ["weights"]  # locals are non-persistent
    assert emb.local_weights.shape == (3, 4) and emb.local_weights.requires_grad
    assert emb.local_ids.dtype == torch.int32
    assert len(list(emb.parameters())) == 0  # trained by its own optimizer, not by Adam
    torch.manual_seed(0)
    emb2 = CastedSparseEmbedding(1000, 64, batch_size=3, init_std=0.5, cast_to=torch.float32)
    assert emb2.weights.std().item() == pytest.approx(0.5, rel=0.02)


def test_training_forward_copies_rows_and_ids():
    emb = make_embedding(cast_to=torch.bfloat16).train()
    ids = torch.tensor([1, 3, 1, 4], dtype=torch.int32)
    out = emb(ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(emb.local_ids, ids)
    assert torch.equal(emb.local_weights.detach(), emb.weights[ids.long()])
    assert torch.equal(out, emb.weights[ids.long()].to(torch.bfloat16))
    out.float().sum().backward()
    assert emb.local_weights.grad is not None and emb.weights.grad is None


def test_eval_forward_reads_table_and_leaves_locals():
    emb = make_embedding().eval()
    ids = torch.tensor([5, 0, 2, 2], dtype=torch.int32)
    out = emb(ids)
    assert torch.equal(out, emb.weights[ids.long()])
    assert torch.count_nonzero(emb.local_weights) == 0 and torch.count_nonzero(emb.local_ids) == 0
    assert not out.requires_grad


def test_signsgd_step_by_hand():
    emb = make_embedding().train()
    before = emb.weights.clone()
    ids = torch.tensor([1, 3, 1, 4], dtype=torch.int32)
    grad = torch.tensor([[2.0, -1.0], [0.5, 0.0], [-1.0, -3.0], [0.0, 0.0]])
    (emb(ids) * grad).sum().backward()
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=1, lr=0.1, weight_decay=0.5)
    opt.step()

    expected = before.clone()
    decay = 1 - 0.1 * 0.5
    # id 1 appears twice: gradients summed first, (2 - 1, -1 - 3) = (1, -4), then one sign step.
    expected[1] = before[1] * decay - 0.1 * torch.tensor([1.0, -1.0])
    expected[3] = before[3] * decay - 0.1 * torch.tensor([1.0, 0.0])  # sign(0) = 0: decay only
    expected[4] = before[4] * decay  # touched with zero gradient: decay only
    # rows 0, 2, 5 are not in the batch: untouched, not even decayed
    torch.testing.assert_close(emb.weights, expected, rtol=0, atol=1e-7)


def test_signsgd_lr_zero_and_no_grad_are_no_ops():
    emb = make_embedding().train()
    before = emb.weights.clone()
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=1, lr=0.0, weight_decay=1.0)
    opt.step()  # no backward yet: nothing to do
    emb(torch.tensor([0, 1, 2, 3], dtype=torch.int32)).sum().backward()
    opt.step()
    assert torch.equal(emb.weights, before)
    opt.param_groups[0]["lr"] = 0.5  # the schedule sets lr per step
    opt.step()
    assert not torch.equal(emb.weights, before)


def test_signsgd_rejects_wrong_group():
    with pytest.raises(ValueError, match="lr"):
        CastedSparseEmbeddingSignSGD_Distributed(make_embedding().buffers(), world_size=1, lr=-1.0)
    opt = CastedSparseEmbeddingSignSGD_Distributed([torch.zeros(3, requires_grad=True)], world_size=1, lr=0.1)
    with pytest.raises(ValueError, match="exactly the 3 buffers"):
        opt.step()


def test_model_training_step_updates_only_batch_rows():
    cfg = dict(
        batch_size=3, seq_len=4, vocab_size=5, num_puzzle_identifiers=7, puzzle_emb_ndim=8, H_cycles=1, L_cycles=1,
        H_layers=1, L_layers=1, hidden_size=8, num_heads=2, expansion=2, pos_encodings="rope",
        halt_max_steps=2, halt_exploration_prob=0.0, forward_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    head = ACTLossHead(HierarchicalReasoningModel_ACTV1(cfg), "softmax_cross_entropy").train()
    puzzle_emb = head.model.puzzle_emb
    opt = CastedSparseEmbeddingSignSGD_Distributed(puzzle_emb.buffers(), world_size=1, lr=0.01, weight_decay=0.1)
    batch = dict(
        inputs=torch.randint(0, 5, (3, 4), dtype=torch.int32),
        labels=torch.randint(0, 5, (3, 4), dtype=torch.int32),
        puzzle_identifiers=torch.tensor([2, 5, 2], dtype=torch.int32),
    )
    _, loss, _, _, _ = head(return_keys=[], carry=head.initial_carry(batch), batch=batch)
    loss.backward()
    assert torch.equal(puzzle_emb.local_ids, batch["puzzle_identifiers"])
    opt.step()
    changed = (puzzle_emb.weights != 0).any(-1).nonzero().flatten().tolist()
    assert changed == [2, 5]  # zero-initialised rows move by ±lr only where the batch touched them
    w = puzzle_emb.weights
    assert bool((torch.isclose(w.abs(), torch.tensor(0.01)) | (w == 0)).all())


# ---------------------------------------------------------------- distributed


NUM, DIM, LOCAL_BATCH, LR, WD = 6, 3, 4, 0.1, 0.5
RANK_IDS = [[1, 2, 1, 5], [2, 3, 0, 1]]
# id 1: rank 0 contributes +1 +1 and rank 1 contributes -3 in column 0, so only the *global* sum is negative.
RANK_GRADS = [
    [[1.0, 0.5, -2.0], [0.2, -0.1, 0.0], [1.0, 0.5, 1.0], [-0.7, 0.0, 0.3]],
    [[-0.5, 0.4, 0.0], [0.9, -0.9, 0.0], [0.0, 0.0, 0.0], [-3.0, -2.0, 0.5]],
]


def _initial_weights() -> torch.Tensor:
    return torch.linspace(-1, 1, NUM * DIM).view(NUM, DIM)


def _train_one_step(ids: list[int], grads: list[list[float]], world_size: int) -> torch.Tensor:
    emb = CastedSparseEmbedding(NUM, DIM, batch_size=len(ids), init_std=0, cast_to=torch.float32).train()
    with torch.no_grad():
        emb.weights.copy_(_initial_weights())
    (emb(torch.tensor(ids, dtype=torch.int32)) * torch.tensor(grads)).sum().backward()
    CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=world_size, lr=LR, weight_decay=WD).step()
    return emb.weights


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        weights = _train_one_step(RANK_IDS[rank], RANK_GRADS[rank], world_size=2)
        torch.save(weights, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_process_gloo_equals_single_process_on_concatenated_batch(tmp_path):
    mp.spawn(_distributed_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _train_one_step(RANK_IDS[0] + RANK_IDS[1], RANK_GRADS[0] + RANK_GRADS[1], world_size=1)
    local_only = _train_one_step(RANK_IDS[0], RANK_GRADS[0], world_size=1)
    for rank in range(2):
        weights = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(weights, single)  # both ranks hold the same, globally-updated table
    assert not torch.equal(single, local_only)  # the gather matters (row 1 and row 3 differ)
    init = _initial_weights()
    assert single[1, 0].item() == pytest.approx(init[1, 0].item() * (1 - LR * WD) + LR)  # global sum -1 -> sign -1
    assert torch.equal(single[4], init[4])  # no rank touched id 4


def test_signsgd_skip_if_leaves_rows_and_false_matches_plain_step():
    """`skip_if=True` (decided on the device) leaves every row; `skip_if=False` is the normal update."""
    ids = torch.tensor([1, 3, 1, 4], dtype=torch.int32)
    grad = torch.tensor([[2.0, -1.0], [0.5, 0.0], [-1.0, -3.0], [0.0, 0.0]])
    results = []
    for skip in (None, False, True):
        emb = make_embedding().train()
        before = emb.weights.clone()
        (emb(ids) * grad).sum().backward()
        opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=1, lr=0.1, weight_decay=0.5)
        opt.step() if skip is None else opt.step(skip_if=torch.tensor(skip))
        results.append((before, emb.weights.clone()))
    (before, plain), (_, not_skipped), (before_skip, skipped) = results
    assert not torch.equal(plain, before) and torch.equal(not_skipped, plain)
    assert torch.equal(skipped, before_skip)
