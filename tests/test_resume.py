"""A run stopped at step k and resumed from its train state ends bit-identical to an uninterrupted run."""

import pytest
import torch

from pretrain import run
from tests.helpers import make_tiny_dataset, metric_records, tiny_config
from training.train_state import read_train_state
from utils.checkpointing import find_latest_train_state

# epochs=4, eval_interval=2, 6 groups, global batch 4 → 3 steps per iteration, 6 steps in all.
TOTAL_STEPS = 6


def load_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics_by_step(path, prefix="train/"):
    out = {}
    for record in metric_records(path):
        if any(k.startswith(prefix) for k in record):
            out[record["step"]] = record
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_tiny_dataset(root / "data")
    ckpt = root / "full"
    state = run(tiny_config(data, ckpt))
    assert state.step == TOTAL_STEPS
    return data, ckpt


@pytest.mark.parametrize("stop_at", [2, 3, 4])  # mid-iteration, end of an iteration before its eval, after an eval
def test_stop_and_resume_is_bit_identical(uninterrupted, tmp_path, stop_at):
    data, full_ckpt = uninterrupted
    ckpt = tmp_path / "ckpt"
    stopped = run(tiny_config(data, ckpt, f"stop_at_step={stop_at}"))
    assert stopped.step == stop_at
    saved = find_latest_train_state(str(ckpt))
    assert saved is not None and saved.endswith(f"train_state_step_{stop_at:06d}.pt")
    payload = read_train_state(saved)
    # (iterations completed, batches consumed in the current one); step 3 ends iteration 0 before its eval.
    expected_position = (0, 3) if stop_at == 3 else divmod(stop_at, 3)
    assert (payload["data_iters"], payload["data_batches"]) == expected_position
    assert payload["ranks"][0]["carry"] is not None  # the ACT carry travels with the state

    resumed = run(tiny_config(data, ckpt, "resume=auto"))
    assert resumed.step == TOTAL_STEPS

    final, expected = load_weights(ckpt / f"step_{TOTAL_STEPS}"), load_weights(full_ckpt / f"step_{TOTAL_STEPS}")
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    # Optimizer moments too, and the logged metrics after the stop (exploration noise, carry, data order).
    opt, opt_expected = (
        read_train_state(find_latest_train_state(str(ckpt)))["optimizers"],
        read_train_state(find_latest_train_state(str(full_ckpt)))["optimizers"],
    )
    for group, group_expected in zip(opt, opt_expected):
        for idx, st in group["state"].items():
            for name, value in st.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(group_expected["state"][idx][name]))
    got, want = metrics_by_step(ckpt / "metrics.jsonl"), metrics_by_step(full_ckpt / "metrics.jsonl")
    for step in range(stop_at + 1, TOTAL_STEPS + 1):
        assert got[step] == want[step]


def test_resume_explicit_path_continues_in_saved_run_folder(uninterrupted, tmp_path):
    data, _ = uninterrupted
    ckpt = tmp_path / "ckpt"
    run(tiny_config(data, ckpt, "stop_at_step=2", "checkpoint_interval_steps=1"))
    # checkpoint_interval_steps keeps only the newest train state on disk.
    assert [p.name for p in ckpt.glob("train_state_step_*.pt")] == ["train_state_step_000002.pt"]
    state = run(tiny_config(data, ckpt, f"resume={ckpt / 'train_state_step_000002.pt'}", "stop_at_step=5"))
    assert state.step == 5


def test_resume_missing_file_is_one_line_error(uninterrupted, tmp_path):
    data, _ = uninterrupted
    with pytest.raises(FileNotFoundError, match="config key 'resume': train state not found"):
        run(tiny_config(data, tmp_path / "ckpt", f"resume={tmp_path / 'nope.pt'}"))


def test_resume_auto_without_state_starts_fresh(uninterrupted, tmp_path):
    data, _ = uninterrupted
    state = run(tiny_config(data, tmp_path / "ckpt", "resume=auto", "stop_at_step=1"))
    assert state.step == 1
