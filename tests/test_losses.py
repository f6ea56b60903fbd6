"""Token losses against direct per-element formulas, and ACTLossHead metrics against hand computation."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
from models.losses import IGNORE_LABEL_ID, ACTLossHead, softmax_cross_entropy, stablemax_cross_entropy


def _stablemax_ce_reference(logits: list[float], label: int) -> float:
    s = [1 / (1 - x + 1e-30) if x < 0 else x + 1 for x in logits]
    return -math.log(s[label] / sum(s))


def _softmax_ce_reference(logits: list[float], label: int) -> float:
    m = max(logits)
    return -(logits[label] - m - math.log(sum(math.exp(x - m) for x in logits)))


def _bce_with_logits(x: float, y: float) -> float:
    sig = 1 / (1 + math.exp(-x))
    return -(y * math.log(sig) + (1 - y) * math.log(1 - sig))


def test_ignore_label_id():
    assert IGNORE_LABEL_ID == -100


def test_stablemax_cross_entropy_matches_float64_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 6) * 4  # both signs, |x| up to ~15
    logits[0, 0] = torch.tensor([0.0, -1e6, 1e6, -0.5, 2.0, 0.0])  # extremes stay finite (no exp)
    labels = torch.randint(0, 6, (3, 5))
    labels[1, 2] = IGNORE_LABEL_ID
    labels[2, 4] = IGNORE_LABEL_ID
    out = stablemax_cross_entropy(logits.to(torch.bfloat16).float(), labels)
    assert out.dtype == torch.float64 and out.shape == (3, 5)
    rounded = logits.to(torch.bfloat16).float()
    for b in range(3):
        for s in range(5):
            lab = labels[b, s].item()
            expected = 0.0 if lab == IGNORE_LABEL_ID else _stablemax_ce_reference(rounded[b, s].double().tolist(), lab)
            assert out[b, s].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert torch.isfinite(out).all()


def test_stablemax_uniform_logits_give_log_vocab():
    out = stablemax_cross_entropy(torch.full((1, 2, 7), -3.0), torch.tensor([[0, 6]]))
    assert out[0].tolist() == pytest.approx([math.log(7)] * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_cross_entropy_on_non_contiguous_logits(dtype):
    # Logits sliced after a puzzle-embedding prefix are non-contiguous (the reference's `.view` crashed here).
    torch.manual_seed(0)
    full = (torch.randn(2, 6, 5) * 3).to(dtype)
    logits = full[:, 2:]
    assert not logits.is_contiguous()
    labels = torch.tensor([[0, 4, IGNORE_LABEL_ID, 2], [1, 1, 3, IGNORE_LABEL_ID]], dtype=torch.int32)
    out = softmax_cross_entropy(logits, labels)
    assert out.dtype == torch.float32 and out.shape == (2, 4)
    for b in range(2):
        for s in range(4):
            lab = labels[b, s].item()
            expected = 0.0 if lab == IGNORE_LABEL_ID else _softmax_ce_reference(logits[b, s].double().tolist(), lab)
            assert out[b, s].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- ACTLossHead with scripted outputs


class ScriptedModel(nn.Module):
    """Returns a fixed carry and outputs, so the head's arithmetic can be checked by hand."""

    def __init__(self, carry, outputs):
        super().__init__()
        self.carry, self.outputs = carry, outputs
        self.dummy = nn.Parameter(torch.zeros(()))

    def initial_carry(self, batch, scale=1):
        return ("initial", batch, scale)

    def forward(self, carry, batch):
        return self.carry, {k: v + 0 * self.dummy for k, v in self.outputs.items()}


def scripted_case(with_target: bool):
    v = 4
    labels = torch.tensor(
        [
            [1, 2, 3],  # all correct
            [0, IGNORE_LABEL_ID, 2],  # 2 labelled, both correct
            [1, 1, IGNORE_LABEL_ID],  # 2 labelled, 1 correct
            [IGNORE_LABEL_ID] * 3,  # no labels: not counted although halted
            [2, 2, 2],  # correct but not halted: not counted
        ]
    )
    predictions = torch.tensor([[1, 2, 3], [0, 1, 2], [1, 0, 0], [0, 0, 0], [2, 2, 2]])
    torch.manual_seed(0)
    logits = torch.rand(5, 3, v)
    logits.scatter_(-1, predictions.unsqueeze(-1), 2.0)  # make `predictions` the argmax
    outputs = {
        "logits": logits,
        "q_halt_logits": torch.tensor([0.5, -0.2, -1.0, 3.0, 2.0]),
        "q_continue_logits": torch.tensor([0.1, 0.2, -0.3, 0.4, -0.5]),
    }
    if with_target:
        outputs["target_q_continue"] = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    carry = SimpleNamespace(
        current_data={"labels": labels},
        halted=torch.tensor([True, True, True, True, False]),
        steps=torch.tensor([2, 3, 1, 5, 4], dtype=torch.int32),
    )
    return carry, outputs


@pytest.mark.parametrize("loss_type", ["softmax_cross_entropy", "stablemax_cross_entropy"])
@pytest.mark.parametrize("with_target", [False, True])
def test_head_metrics_and_loss_by_hand(loss_type, with_target):
    carry, outputs = scripted_case(with_target)
    head = ACTLossHead(ScriptedModel(carry, outputs), loss_type)
    new_carry, loss, metrics, detached, all_halted = head(return_keys=["logits", "nope"], carry=None, batch=None)

    assert new_carry is carry
    expected_keys = {"count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss"}
    assert set(metrics) == expected_keys | ({"q_continue_loss"} if with_target else set())
    assert metrics["count"].item() == 3
    assert metrics["accuracy"].item() == pytest.approx(1 + 1 + 0.5)
    assert metrics["exact_accuracy"].item() == 2
    # q_halt >= 0 predicts "sequence correct": row 0 right, row 1 wrong, row 2 right.
    assert metrics["q_halt_accuracy"].item() == 2
    assert metrics["steps"].item() == 2 + 3 + 1

    ref = _softmax_ce_reference if loss_type == "softmax_cross_entropy" else _stablemax_ce_reference
    labels = carry.current_data["labels"]
    lm_loss = 0.0
    for b in range(5):  # every row counts in the loss, each normalised by its own label count
        labelled = [s for s in range(3) if labels[b, s] != IGNORE_LABEL_ID]
        for s in labelled:
            lm_loss += ref(outputs["logits"][b, s].double().tolist(), labels[b, s].item()) / len(labelled)
    seq_correct = [1.0, 1.0, 0.0, 1.0, 1.0]  # a row without labels counts as correct (0 == 0)
    q_halt_loss = sum(_bce_with_logits(x, y) for x, y in zip(outputs["q_halt_logits"].tolist(), seq_correct))
    q_continue_loss = 0.0
    if with_target:
        q_continue_loss = sum(
            _bce_with_logits(x, y)
            for x, y in zip(outputs["q_continue_logits"].tolist(), outputs["target_q_continue"].tolist())
        )
        assert metrics["q_continue_loss"].item() == pytest.approx(q_continue_loss, rel=1e-5)
    assert metrics["lm_loss"].item() == pytest.approx(lm_loss, rel=1e-5)
    assert metrics["q_halt_loss"].item() == pytest.approx(q_halt_loss, rel=1e-5)
    assert loss.item() == pytest.approx(lm_loss + 0.5 * (q_halt_loss + q_continue_loss), rel=1e-5)
    assert all(not m.requires_grad for m in metrics.values())

    assert set(detached) == {"logits"} and not detached["logits"].requires_grad
    assert all_halted.dtype == torch.bool and not bool(all_halted)
    assert loss.requires_grad  # gradient reaches the model


def test_head_returns_preds_when_asked():
    carry, outputs = scripted_case(False)
    head = ACTLossHead(ScriptedModel(carry, outputs), "stablemax_cross_entropy")
    _, _, _, detached, _ = head(return_keys=["preds"], carry=None, batch=None)
    expected = torch.tensor([[1, 2, 3], [0, 1, 2], [1, 0, 0], [0, 0, 0], [2, 2, 2]])  # scripted_case's argmax
    assert set(detached) == {"preds"} and torch.equal(detached["preds"], expected)
    assert detached["preds"].dtype == torch.int64 and not detached["preds"].requires_grad


@pytest.mark.parametrize("loss_fn", [softmax_cross_entropy, stablemax_cross_entropy])
def test_valid_mask_argument(loss_fn):
    # TRM's head passes valid_mask = labels != ignore_index; a narrower mask also zeroes labelled positions.
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[0, 4, IGNORE_LABEL_ID, 2], [1, 1, 3, IGNORE_LABEL_ID]])
    default = loss_fn(logits, labels)
    torch.testing.assert_close(loss_fn(logits, labels, valid_mask=labels != IGNORE_LABEL_ID), default)
    mask = labels != IGNORE_LABEL_ID
    mask[0, 1] = False
    masked = loss_fn(logits, labels, valid_mask=mask)
    assert masked[0, 1] == 0 and default[0, 1] > 0
    torch.testing.assert_close(masked[mask], default[mask])


def test_initial_carry_delegates():
    head = ACTLossHead(ScriptedModel(*scripted_case(False)), "softmax_cross_entropy")
    assert head.initial_carry("b", scale=3) == ("initial", "b", 3)


def test_unknown_loss_type_names_field():
    with pytest.raises(ValueError, match="loss_type.*cross_entropy_v2"):
        ACTLossHead(ScriptedModel(*scripted_case(False)), "cross_entropy_v2")


def test_head_on_real_model_train_and_eval():
    cfg = dict(
        batch_size=3, seq_len=5, vocab_size=6, num_puzzle_identifiers=2, puzzle_emb_ndim=8, H_cycles=1, L_cycles=2,
        H_layers=1, L_layers=1, hidden_size=16, num_heads=2, expansion=2, pos_encodings="learned",
        halt_max_steps=2, halt_exploration_prob=0.1, forward_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    head = ACTLossHead(HierarchicalReasoningModel_ACTV1(cfg), "softmax_cross_entropy")
    batch = dict(
        inputs=torch.randint(0, 6, (3, 5), dtype=torch.int32),
        labels=torch.tensor([[1, 2, 3, 4, 5], [IGNORE_LABEL_ID] * 5, [0, 0, IGNORE_LABEL_ID, 1, 1]], dtype=torch.int32),
        puzzle_identifiers=torch.tensor([0, 1, 1], dtype=torch.int32),
    )
    carry = head.initial_carry(batch)
    carry, loss, metrics, _, _ = head(return_keys=[], carry=carry, batch=batch)
    assert "q_continue_loss" in metrics  # training: bootstrap target present
    loss.backward()
    assert head.model.inner.lm_head.weight.grad.abs().sum() > 0

    head.eval()
    carry = head.initial_carry(batch)
    for step in (1, 2):
        carry, loss, metrics, out, all_halted = head(return_keys=["logits", "q_halt_logits"], carry=carry, batch=batch)
        assert "q_continue_loss" not in metrics
        assert bool(all_halted) == (step == 2)
        assert metrics["count"].item() == (2 if step == 2 else 0)  # row 1 has no labels
        assert set(out) == {"logits", "q_halt_logits"}


@pytest.mark.parametrize(
    "model_name, overrides",
    [
        ("hrm", {}),
        ("hrm", {"halt_max_steps": 1}),  # one step: no continue target, so no q_continue_loss
        ("trm", {"no_ACT_continue": True}),
        ("trm", {"no_ACT_continue": False}),
    ],
)
def test_metric_names_are_the_metrics_the_head_returns(model_name, overrides):
    """`metric_names(training)` lists exactly the keys of the metrics the head returns in that mode, for HRM and
    TRM and their halting options (q_continue_loss only where the model trains a continue target)."""
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1

    cfg = dict(
        batch_size=3, seq_len=5, vocab_size=6, num_puzzle_identifiers=2, puzzle_emb_ndim=8, H_cycles=1, L_cycles=1,
        H_layers=1, L_layers=1, hidden_size=16, num_heads=2, expansion=2, pos_encodings="rope",
        halt_max_steps=2, halt_exploration_prob=0.1, forward_dtype="float32",
    ) | overrides  # fmt: skip
    model_cls = HierarchicalReasoningModel_ACTV1 if model_name == "hrm" else TinyRecursiveReasoningModel_ACTV1
    torch.manual_seed(0)
    head = ACTLossHead(model_cls(cfg), "stablemax_cross_entropy")
    batch = dict(
        inputs=torch.randint(0, 6, (3, 5), dtype=torch.int32),
        labels=torch.randint(0, 6, (3, 5), dtype=torch.int32),
        puzzle_identifiers=torch.tensor([0, 1, 1], dtype=torch.int32),
    )
    reported = {}
    for training in (True, False):
        head.train(training)
        _, _, metrics, _, _ = head(return_keys=[], carry=head.initial_carry(batch), batch=batch)
        assert list(head.metric_names()) == list(head.metric_names(training=training))
        assert set(head.metric_names(training=training)) == set(metrics)
        reported[training] = set(metrics)
    trains_continue = overrides.get("halt_max_steps", 2) > 1 and not overrides.get("no_ACT_continue", False)
    assert ("q_continue_loss" in reported[True]) == trains_continue
    assert "q_continue_loss" not in reported[False]
