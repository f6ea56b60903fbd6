"""utils/saved_outputs.py: the `step_N_all_preds.{rank}` files written by an evaluation and read back as one."""

import os

import pytest
import torch

from utils.saved_outputs import (
    concatenate_saved_outputs,
    find_saved_outputs,
    in_rank_order,
    read_saved_outputs,
    saved_outputs_path,
    write_saved_outputs,
)


def test_write_concatenates_batches_under_the_rank_name(tmp_path):
    batches = {
        "inputs": [torch.arange(6).reshape(2, 3), torch.arange(6, 9).reshape(1, 3)],
        "q_halt_logits": [torch.tensor([0.5, -1.0]), torch.tensor([2.0])],
    }
    path = write_saved_outputs(str(tmp_path), 40, 3, batches)
    assert path == saved_outputs_path(str(tmp_path), 40, 3) == str(tmp_path / "step_40_all_preds.3")
    assert os.listdir(tmp_path) == ["step_40_all_preds.3"]  # no temporary file left beside it
    saved = read_saved_outputs(path)
    assert saved["inputs"].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert saved["q_halt_logits"].tolist() == [0.5, -1.0, 2.0]
    with pytest.raises(ValueError, match=r"rank files \[0, 1, 2\] missing"):  # rank 3 alone is not an evaluation
        find_saved_outputs(path)


def test_find_refuses_missing_ranks_and_rank_order_is_numeric(tmp_path):
    for rank in (0, 2):
        torch.save({"inputs": torch.zeros(1, 2)}, tmp_path / f"step_5_all_preds.{rank}")
    with pytest.raises(ValueError, match=r"rank files \[1\] missing"):
        find_saved_outputs(tmp_path)
    assert in_rank_order(["r/step_1_all_preds.10", "r/step_1_all_preds.2", "r/step_1_all_preds.0"]) == [
        "r/step_1_all_preds.0",
        "r/step_1_all_preds.2",
        "r/step_1_all_preds.10",
    ]


def test_read_turns_logits_into_preds_and_keeps_saved_preds(tmp_path):
    logits = torch.tensor([[[0.1, 0.9, 0.0], [2.0, 0.0, 1.0]]])  # argmax [[1, 0]]
    torch.save({"inputs": torch.zeros(1, 2), "logits": logits}, tmp_path / "a.0")
    torch.save({"logits": logits, "preds": torch.tensor([[2, 2]])}, tmp_path / "b.0")
    read = read_saved_outputs(tmp_path / "a.0", preds=True)
    assert sorted(read) == ["inputs", "preds"] and read["preds"].tolist() == [[1, 0]]
    assert read_saved_outputs(tmp_path / "b.0", preds=True)["preds"].tolist() == [[2, 2]]  # the model's own
    assert "logits" in read_saved_outputs(tmp_path / "a.0")  # without preds=True the file is returned as saved
    with pytest.raises(ValueError, match=r"b\.0: no tensor 'inputs' \(evaluate with save_outputs including it\)"):
        read_saved_outputs(tmp_path / "b.0", preds=True, require=("inputs",))
    torch.save({"inputs": torch.zeros(1, 2)}, tmp_path / "c.0")
    with pytest.raises(ValueError, match=r"no tensor 'logits' \(or 'preds'\)"):
        read_saved_outputs(tmp_path / "c.0", preds=True, require=("preds",))


def test_concatenate_joins_ranks_and_refuses_files_that_disagree(tmp_path):
    def save(name, **tensors):
        torch.save(tensors, tmp_path / name)
        return tmp_path / name

    a = save("s.0", inputs=torch.tensor([[1, 2]]), q_halt_logits=torch.tensor([0.5]), labels=torch.tensor([[3, 4]]))
    b = save("s.1", inputs=torch.tensor([[5, 6], [7, 8]]), q_halt_logits=torch.tensor([1.0, 2.0]))
    joined = concatenate_saved_outputs([a, b], keys=("inputs", "q_halt_logits"))
    assert sorted(joined) == ["inputs", "q_halt_logits"]
    assert joined["inputs"].tolist() == [[1, 2], [5, 6], [7, 8]] and joined["q_halt_logits"].tolist() == [0.5, 1, 2]
    with pytest.raises(ValueError, match=r"\['labels'\] saved by some ranks only"):
        concatenate_saved_outputs([a, b])
    short = save("s.2", inputs=torch.tensor([[1, 2]]), q_halt_logits=torch.tensor([0.5, 0.1]))
    with pytest.raises(ValueError, match=r"s\.2: 'q_halt_logits' has 2 rows, 'inputs' 1"):
        concatenate_saved_outputs([a, short], keys=("inputs", "q_halt_logits"))
    wide = save("s.3", inputs=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"'inputs' has rows of different shapes \[\(2,\), \(3,\)\]"):
        concatenate_saved_outputs([a, wide], keys=("inputs",))
    with pytest.raises(FileNotFoundError, match="no saved-outputs files given"):
        concatenate_saved_outputs([])
