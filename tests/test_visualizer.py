"""tools/visualize.py: prediction export aligned to the dataset, PNG sheets, accuracy by ACT step, CLI errors.

Saved predictions are written the way evaluate.py lays them out (per-rank slices of padded test-mode batches)
with planted argmax predictions, so the expected aligned arrays and accuracies are known independently.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.browser import synthetic
from tests.helpers import REPO
from tools import visualize as viz


def test_detect_kind():
    assert viz.detect_kind(12, 900) == ("arc", 30)
    assert viz.detect_kind(11, 81) == ("sudoku", 9)
    assert viz.detect_kind(6, 900) == ("maze", 30)
    assert viz.detect_kind(6, 49) == ("maze", 7)
    assert viz.detect_kind(6, 50) == ("generic", 50)  # not square: one row
    assert viz.detect_kind(20, 16) == ("generic", 4)


def test_non_pad_box_and_wrong_cells():
    a = np.zeros(25, dtype=np.int64)
    a[1 * 5 + 2] = 3  # (1, 2)
    b = np.zeros(25, dtype=np.int64)
    b[3 * 5 + 0] = 1  # (3, 0), EOS counts as content
    assert viz.non_pad_box([a], 5) == (1, 2, 2, 3)
    assert viz.non_pad_box([a, b, None], 5) == (1, 4, 0, 3)
    assert viz.non_pad_box([np.zeros(25)], 5) is None
    labels = np.array([0, 2, 3, 4, -100])
    preds = np.array([5, 2, 9, 4, 7])
    # label 0 is ignored (ignore_label_id 0), -100 always; only position 2 counts and differs
    assert viz.wrong_cells(labels, preds, 0).tolist() == [False, False, True, False, False]
    assert viz.wrong_cells(labels, preds, None).tolist() == [True, False, True, False, False]


@pytest.fixture
def arc_with_preds(tmp_path):
    """ARC dataset, planted predictions (2 examples wrong), saved by 3 ranks with global batch 3, one example unsaved."""
    data = synthetic.write_arc_dataset(tmp_path / "arc", seed=4)
    test = data["test"]
    rng = np.random.default_rng(1)
    preds = synthetic.corrupt(rng, test["labels"], rows=[0, 2], vocab_size=12, cells=2)
    q_halt = np.array([0.5, -1.0, 2.0, 3.0])
    keep = np.array([True, True, True, False])
    files = synthetic.write_saved_predictions(
        tmp_path / "ckpt", 40, test, preds, q_halt, vocab_size=12, world_size=3, global_batch=3, keep=keep
    )
    return SimpleNamespace(root=tmp_path / "arc", data=data, preds=preds, q_halt=q_halt, keep=keep, files=files)


def test_find_saved_outputs(arc_with_preds, tmp_path):
    from utils.saved_outputs import find_saved_outputs

    files = arc_with_preds.files
    assert find_saved_outputs(files[1]) == files  # any rank file finds all ranks, in rank order
    assert find_saved_outputs(files[0].with_suffix("")) == files  # the prefix
    torch.save({}, files[0].parent / "step_8_all_preds.0")
    assert find_saved_outputs(files[0].parent) == files  # a folder: the latest step (40 > 8)
    files[1].unlink()
    with pytest.raises(ValueError, match=r"rank files \[1\] missing"):
        find_saved_outputs(files[0])
    with pytest.raises(FileNotFoundError, match="no saved predictions"):
        find_saved_outputs(tmp_path / "nothing" / "step_1_all_preds")


def test_export_aligns_ranks_and_padding(arc_with_preds, tmp_path):
    t = arc_with_preds
    info = viz.export_predictions(t.files[2], t.root, tmp_path / "out")
    out = tmp_path / "out"
    preds = np.load(out / "all__predictions.npy")
    q = np.load(out / "all__q_halt_logits.npy")
    qc = np.load(out / "all__q_continue_logits.npy")
    assert preds.dtype == np.int32 and preds.shape == t.preds.shape
    # kept examples carry their planted prediction, the unsaved one -1 / NaN
    np.testing.assert_array_equal(preds[t.keep], t.preds[t.keep])
    assert np.all(preds[~t.keep] == -1)
    np.testing.assert_allclose(q[t.keep], t.q_halt[t.keep])
    np.testing.assert_allclose(qc[t.keep], -t.q_halt[t.keep])
    assert np.isnan(q[~t.keep]).all()
    # accuracies over the 3 saved examples, by a naive loop: per row, correct counted cells / counted cells
    labels = t.data["test"]["labels"].astype(np.int64)
    accs, exact = [], 0
    for e in np.flatnonzero(t.keep):
        counted = [i for i in range(900) if labels[e, i] != 0]
        correct = sum(t.preds[e, i] == labels[e, i] for i in counted)
        accs.append(correct / len(counted))
        exact += correct == len(counted)
    written = json.loads((out / "predictions.json").read_text())
    assert written == info
    assert info["step"] == 40 and info["split"] == "test" and info["count"] == 3
    assert info["sets"] == {"all": {"examples": 4, "predicted": 3}}
    assert info["accuracy"] == pytest.approx(np.mean(accs))
    assert info["exact_accuracy"] == pytest.approx(exact / 3) and exact == 1


def test_match_rows_duplicates_in_order():
    ids = np.array([1, 1, 2, 1])
    inputs = np.array([[3, 4], [3, 4], [3, 4], [5, 6]])
    # saved: the second copy of (1, [3 4]) first, then (2, ...), the first copy, an unknown row, a third copy
    saved_ids = np.array([1, 2, 1, 7, 1])
    saved_inputs = np.array([[3, 4], [3, 4], [3, 4], [3, 4], [3, 4]])
    assert viz.match_rows(ids, inputs, saved_ids, saved_inputs).tolist() == [0, 2, 1, -1, -1]
    big = np.array([[300, 4], [3, 4]])  # tokens beyond a byte take the wide key path
    assert viz.match_rows(np.array([0, 0]), big, np.array([0]), np.array([[3, 4]])).tolist() == [1]


def test_export_rejects_other_dataset(arc_with_preds, tmp_path, capsys):
    other = tmp_path / "other"
    synthetic.write_arc_dataset(other, seed=99)
    code = viz.main(
        ["export", "--predictions", str(arc_with_preds.files[0]), "--dataset", str(other), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "match no example" in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "predictions.json").exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda root: (root / "test" / "all__labels.npy").unlink(), "missing file"),
        (lambda root: (root / "test" / "dataset.json").write_text("{oops"), "malformed JSON"),
        (lambda root: np.save(root / "test" / "all__puzzle_indices.npy", np.array([0, 1, 2])), "puzzle_indices.npy"),
        (lambda root: np.save(root / "test" / "all__inputs.npy", np.zeros((4, 81), np.uint8)), "seq_len 900"),
    ],
)
def test_cli_bad_dataset_one_line_error(arc_with_preds, tmp_path, capsys, damage, expected):
    damage(arc_with_preds.root)
    code = viz.main(
        ["sheets", "--predictions", str(arc_with_preds.files[0]), "--dataset", str(arc_with_preds.root)]
        + ["--out", str(tmp_path / "s")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1


def test_cli_bad_saved_file(arc_with_preds, tmp_path, capsys):
    torch.save({"inputs": torch.zeros(2, 900)}, arc_with_preds.files[0])
    code = viz.main(
        ["export", "--predictions", str(arc_with_preds.files[0]), "--dataset", str(arc_with_preds.root)]
        + ["--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "step_40_all_preds.0" in err and "puzzle_identifiers" in err


def _red_pixels(png: Path) -> int:
    """Pixels close to the wrong-cell colour (#ff1744)."""
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    return int(np.sum(np.all(np.abs(img - np.array([1.0, 0x17 / 255, 0x44 / 255])) < 0.06, axis=-1)))


def test_sheets_png_and_wrong_marks(tmp_path):
    pytest.importorskip("matplotlib", reason="PNG sheets need matplotlib (viz extra)")
    data = synthetic.write_sudoku_dataset(tmp_path / "sudoku", seed=3)
    test = data["test"]  # 5 examples
    preds = synthetic.corrupt(np.random.default_rng(0), test["labels"], rows=[4], vocab_size=11, cells=5)
    files = synthetic.write_saved_predictions(
        tmp_path / "ckpt", 3, test, preds, np.zeros(5), vocab_size=11, world_size=1, global_batch=2
    )
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps({"steps": [1, 2, 3], "accuracy": [0.5, 0.8, 0.9], "exact_accuracy": [0, 0.2, 0.4]}))
    out = tmp_path / "sheets"
    code = viz.main(
        ["sheets", "--predictions", str(files[0]), "--dataset", str(tmp_path / "sudoku"), "--out", str(out)]
        + ["--per-sheet", "2", "--step-accuracy", str(steps)]
    )
    assert code == 0
    sheets = sorted(out.glob("sheet_*.png"))
    assert [p.name for p in sheets] == ["sheet_000.png", "sheet_001.png", "sheet_002.png"]  # 5 examples, 2 a sheet
    # examples 0..3 are right: no red; the last sheet holds example 4 with 5 wrong cells
    assert _red_pixels(sheets[0]) == 0 and _red_pixels(sheets[1]) == 0
    assert _red_pixels(sheets[2]) > 5 * 20
    assert (out / "accuracy_by_step.png").stat().st_size > 5_000

    only = tmp_path / "only"
    assert (
        viz.main(
            ["sheets", "--predictions", str(files[0]), "--dataset", str(tmp_path / "sudoku")]
            + ["--out", str(only), "--only-wrong"]
        )
        == 0
    )
    assert [p.name for p in only.glob("*.png")] == ["sheet_000.png"]


def test_arc_sheet_renders(arc_with_preds, tmp_path):
    pytest.importorskip("matplotlib", reason="PNG sheets need matplotlib (viz extra)")
    data = viz.collect_predictions(arc_with_preds.files[0], arc_with_preds.root)
    paths = viz.render_sheets(data, tmp_path / "arc_sheets", max_examples=2)
    assert len(paths) == 1 and paths[0].read_bytes()[:4] == b"\x89PNG"


def test_missing_matplotlib_one_line_hint(monkeypatch, tmp_path, capsys):
    for name in ["matplotlib", *[m for m in sys.modules if m.startswith("matplotlib.")]]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps({"steps": [1], "accuracy": [0.5]}))
    assert viz.main(["sheets", "--step-accuracy", str(steps), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {viz.VIZ_INSTALL_HINT}\n" and "pip install" in err


def test_flag_errors_are_one_line(tmp_path, capsys):
    assert viz.main(["sheets", "--predictions", "x"]) == 2  # --out missing
    assert capsys.readouterr().err == "error: the following arguments are required: --out\n"
    assert viz.main(["draw", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument command: invalid choice: 'draw'") and err.count("\n") == 1


def test_load_step_accuracy_validates(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"steps": [1, 2], "accuracy": [0.1]}))
    with pytest.raises(ValueError, match="1 values for 2 steps"):
        viz.load_step_accuracy(p)
    npz = tmp_path / "s.npz"
    np.savez(npz, steps=np.array([1, 2]), exact_accuracy=np.array([0.0, 0.5]))
    assert viz.load_step_accuracy(npz) == {"steps": [1, 2], "exact_accuracy": [0.0, 0.5]}


class ScriptedHead:
    """Stands in for ACTLossHead: step k of a batch predicts `script[k]`; rows halt as `halt_at` says."""

    def __init__(self, scripts, halt_at, vocab=5):
        self.scripts, self.halt_at, self.vocab, self.batch_no = scripts, halt_at, vocab, -1

    def initial_carry(self, batch):
        self.batch_no += 1
        return SimpleNamespace(steps=0, halted=torch.ones(batch["labels"].shape[0], dtype=torch.bool))

    def __call__(self, return_keys, carry, batch):
        step = carry.steps + 1
        pred = torch.tensor(self.scripts[self.batch_no][step - 1])
        logits = torch.nn.functional.one_hot(pred, self.vocab).float()
        halted = torch.tensor(self.halt_at[self.batch_no]) <= step
        new = SimpleNamespace(steps=step, halted=halted)
        return new, torch.tensor(0.0), {}, {"logits": logits}, halted.all()


def test_act_step_accuracy_hand_computed():
    labels0 = torch.tensor([[1, 2, 3, -100], [4, 4, -100, -100], [-100, -100, -100, -100]])  # row 2: padding
    labels1 = torch.tensor([[2, 2, 2, 2]])
    scripts = [
        [
            [[1, 0, 0, 0], [4, 0, 0, 0], [0, 0, 0, 0]],  # step 1
            [[1, 2, 0, 0], [4, 4, 0, 0], [0, 0, 0, 0]],  # step 2: row 1 halts here
            [[1, 2, 3, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ],  # step 3: row 1's new output must be ignored
        [[[2, 2, 2, 2]]],  # batch 2 halts after one step, exact from the start
    ]
    head = ScriptedHead(scripts, halt_at=[[3, 2, 3], [1]])
    batches = [("all", {"labels": labels0, "inputs": labels0}, 3), {"labels": labels1, "inputs": labels1}]
    got = viz.act_step_accuracy(head, batches)
    # 3 counted rows (two in batch 1, one in batch 2); per step: token acc of row0, row1, batch-2 row
    acc = [(1 / 3 + 1 / 2 + 1) / 3, (2 / 3 + 1 + 1) / 3, (1 + 1 + 1) / 3]
    exact = [1 / 3, 2 / 3, 3 / 3]
    assert got["steps"] == [1, 2, 3] and got["count"] == 3
    assert got["accuracy"] == pytest.approx(acc)
    assert got["exact_accuracy"] == pytest.approx(exact)


def test_module_entry_point(arc_with_preds, tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.visualize",
            "export",
            "--predictions",
            str(arc_with_preds.files[0]),
            "--dataset",
            str(arc_with_preds.root),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "3 predictions" in res.stdout and (out / "all__predictions.npy").exists()


def test_act_step_accuracy_real_hrm_matches_head_metrics():
    """With the real tiny HRM in eval mode: as many steps as halt_max_steps, and the last step's accuracies equal
    the loss head's own metrics (which count rows once they halt)."""
    from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
    from models.losses import ACTLossHead

    torch.manual_seed(0)
    cfg = dict(
        batch_size=4,
        seq_len=81,
        puzzle_emb_ndim=16,
        num_puzzle_identifiers=3,
        vocab_size=11,
        H_cycles=1,
        L_cycles=1,
        H_layers=1,
        L_layers=1,
        hidden_size=32,
        expansion=2,
        num_heads=2,
        pos_encodings="rope",
        halt_max_steps=3,
        halt_exploration_prob=0.1,
        forward_dtype="float32",
    )
    head = ACTLossHead(HierarchicalReasoningModel_ACTV1(cfg), loss_type="softmax_cross_entropy").eval()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(2, 11, (4, 81), generator=g, dtype=torch.int32)
    labels[3] = -100  # a padding row
    batch = {
        "inputs": torch.randint(1, 11, (4, 81), generator=g, dtype=torch.int32),
        "labels": labels,
        "puzzle_identifiers": torch.tensor([0, 1, 2, 0], dtype=torch.int32),
    }
    got = viz.act_step_accuracy(head, [batch])
    with torch.inference_mode():
        carry = head.initial_carry(batch)
        while True:
            carry, _, metrics, _, all_halted = head(return_keys=[], carry=carry, batch=batch)
            if all_halted:
                break
    count = metrics["count"].item()
    assert got["steps"] == [1, 2, 3] and got["count"] == count == 3
    assert got["accuracy"][-1] == pytest.approx(metrics["accuracy"].item() / count, abs=1e-6)
    assert got["exact_accuracy"][-1] == pytest.approx(metrics["exact_accuracy"].item() / count, abs=1e-6)
    assert 0 < got["accuracy"][-1] < 1


@pytest.mark.slow
def test_export_of_a_real_training_run_matches_its_eval_metrics(tmp_path):
    """pretrain.py's own saved outputs (tiny run): exported accuracies equal the accuracies its evaluation logged."""
    from pretrain import run
    from tests.helpers import make_tiny_dataset, tiny_config

    data = make_tiny_dataset(tmp_path / "data")
    keys = "[inputs,labels,puzzle_identifiers,logits,q_halt_logits,q_continue_logits]"
    run(tiny_config(data, tmp_path / "ckpt", f"eval_save_outputs={keys}"))
    logged = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in logged if "all/accuracy" in r][-1]
    info = viz.export_predictions(tmp_path / "ckpt", data, tmp_path / "out")  # the folder: its latest step
    assert info["step"] == last_eval["step"]
    assert info["sets"]["all"]["predicted"] == info["sets"]["all"]["examples"]
    assert info["accuracy"] == pytest.approx(last_eval["all/accuracy"], abs=1e-6)
    assert info["exact_accuracy"] == pytest.approx(last_eval["all/exact_accuracy"], abs=1e-6)


def test_page_is_self_contained():
    """No CDN or other external resource: no src/href attributes, no <link>, no CSS url(), no @import."""
    html = (REPO / "puzzle_visualizer.html").read_text()
    for needle in ("src=", "href=", "<link", "url(", "@import", "//cdn", "https://"):
        assert needle not in html, needle


def test_browser_harness_skips_naming_missing_binary(monkeypatch):
    from tests.browser import chromium

    monkeypatch.setattr(chromium.shutil, "which", lambda name: "/usr/bin/chromium" if name == "chromium" else None)
    monkeypatch.delenv("HRM_INSTALL_CHROMIUM", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"needs chromedriver on PATH.*HRM_INSTALL_CHROMIUM=1"):
        chromium.find_or_install_chromium()
