"""Research options beyond the reference: EMA, learned-halting evaluation, early stopping,
keep-best, gradient accumulation. Each is checked against an independent expectation."""

import dataclasses
import json
import types

import pytest
import torch
from torch import nn

import evaluate as evaluate_cli
import pretrain
from models.losses import IGNORE_LABEL_ID, ACTLossHead
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from tests.helpers import TINY_ARCH, make_tiny_dataset, run_two_rank_training, tiny_config
from training import build, train_state, train_step, training_options
from training.ema import ModelEMA
from utils.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("research") / "data")


# ------------------------------------------------------------------------------------------------ config


def test_options_are_off_by_default_and_validated(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "ckpt")
    assert (config.ema, config.ema_rate, config.eval_halting) == (False, 0.999, "fixed")
    assert (config.early_stop_train_accuracy, config.keep_best, config.grad_accum_steps) == (None, None, 1)
    for override, message in [
        ("grad_accum_steps=0", "config key 'grad_accum_steps': must be >= 1"),
        ("ema_rate=1.0", "config key 'ema_rate': must be in"),
        ("keep_best=exact_accuracy", "config key 'keep_best': expected an eval metric as '<set>/<metric>'"),
        ("early_stop_train_accuracy=1.5", "config key 'early_stop_train_accuracy'"),
        ("eval_halting=sometimes", "config key 'eval_halting'"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny_config(tmp_path, tmp_path / "ckpt", override)
    # The per-rank batch (4) must split into whole micro-batches.
    config = tiny_config(tmp_path, tmp_path / "ckpt", "grad_accum_steps=3")
    with pytest.raises(ValueError, match="config key 'grad_accum_steps': the per-rank batch 4 is not divisible by 3"):
        build.model_config_dict(config, types.SimpleNamespace(vocab_size=6, seq_len=8, num_puzzle_identifiers=3), 1)


# --------------------------------------------------------------------------------------------------- EMA


def test_ema_update_formula_by_hand():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, rate=0.5)
    for w in (2.0, 4.0):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model)
    # e1 = 0.5·1 + 0.5·2 = 1.5; e2 = 0.5·1.5 + 0.5·4 = 2.75 (exact in binary)
    assert ema.shadow["weight"].item() == 2.75

    ema = ModelEMA(model, rate=0.9)  # starts at 4
    with torch.no_grad():
        model.weight.fill_(-1.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 * 4 + 0.1 * -1, abs=1e-6)
    with ema.swapped_in(model):
        assert model.weight.item() == pytest.approx(3.5, abs=1e-6)
    assert model.weight.item() == -1.0  # the live weight comes back unchanged


def test_ema_follows_trm_to_the_bit_and_skips_frozen_parameters():
    """TRM: shadow = (1 - mu) * param + mu * shadow, over parameters with requires_grad, from the initial weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))
    model[1].bias.requires_grad_(False)
    ema = ModelEMA(model, rate=0.999)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        params = dict(model.named_parameters())
        for k in expected:  # TRM's expression, evaluated in float32 like its code
            expected[k] = (1.0 - 0.999) * params[k].data + 0.999 * expected[k]
    for k, v in expected.items():
        assert torch.equal(ema.shadow[k], v), k
    frozen = model[1].bias.detach().clone()
    with ema.swapped_in(model):
        assert torch.equal(model[1].bias, frozen)  # not averaged, left as it is
        assert torch.equal(model[0].weight, ema.shadow["0.weight"])


def eval_logits(config, weights):
    """Evaluate a freshly built model holding `weights`; the logits it saves, in eval order."""
    train_ds, _ = pretrain.create_dataloader(config, "train", CPU, test_set_mode=False, epochs=1)
    eval_ds, loader = pretrain.create_dataloader(config, "test", CPU, test_set_mode=True, epochs=1)
    head, _ = build.create_model(config, train_ds.metadata, CPU)
    head.load_state_dict(weights)
    head.eval()
    state = train_state.TrainState(model=head, forward=head, optimizers=[], optimizer_lrs=[], total_steps=0, step=999)
    pretrain.evaluate(config, state, loader, eval_ds.metadata, CPU)
    return torch.load(f"{config.checkpoint_path}/step_999_all_preds.0")["logits"]


def test_ema_is_used_for_evaluation_and_step_files(data, tmp_path):
    ckpt = tmp_path / "ema"
    config = tiny_config(data, ckpt, "ema=true", "ema_rate=0.5", "epochs=2", "eval_save_outputs=[logits]")
    state = pretrain.run(config)
    assert state.step == 3
    payload = train_state.read_train_state(str(ckpt / "train_state_step_000003.pt"))
    live, averaged = payload["model"], payload["ema"]
    step_file = torch.load(ckpt / "step_3", weights_only=True)

    # The averaged parameters by hand: the initial weights, then three updates with rate 0.5, equal the
    # EMA kept in the train state; the live ones differ from it.
    assert set(averaged) == {name for name, _ in state.model.named_parameters()}
    assert any(not torch.equal(live[k], averaged[k]) for k in averaged)
    for key, value in step_file.items():  # step_N: averaged parameters, live buffers (puzzle table)
        assert torch.equal(value, averaged.get(key, live[key])), key
    assert torch.equal(step_file["model.inner.puzzle_emb.weights"], live["model.inner.puzzle_emb.weights"])
    # The live weights are back in the model after evaluation.
    for key, value in state.model.state_dict().items():
        assert torch.equal(value, live[key]), key

    # Evaluation during training = evaluating a model loaded with the averaged weights.
    during_training = torch.load(ckpt / "step_3_all_preds.0")["logits"]
    config_eval = config.model_copy(update={"checkpoint_path": str(tmp_path / "eval")})
    assert torch.equal(during_training, eval_logits(config_eval, step_file))
    assert not torch.equal(during_training, eval_logits(config_eval, live))

    # evaluate.py on the train state also takes the averaged weights.
    weights, step, _ = evaluate_cli.read_checkpoint(str(ckpt / "train_state_step_000003.pt"))
    assert step == 3 and all(torch.equal(weights[k], step_file[k]) for k in step_file)


def test_ema_by_hand_over_a_run(data, tmp_path, monkeypatch):
    """The EMA after two steps equals rate²·w0 + rate(1−rate)·w1 + (1−rate)·w2 of the recorded weights."""
    config = tiny_config(data, tmp_path / "ckpt", "ema=true", "ema_rate=0.75", "stop_at_step=2")
    recorded = []
    original_step = train_step.apply_lr_and_step

    def recording_step(cfg, state, **kwargs):
        if not recorded:
            recorded.append({k: v.detach().clone() for k, v in state.model.named_parameters()})
        lr = original_step(cfg, state, **kwargs)
        recorded.append({k: v.detach().clone() for k, v in state.model.named_parameters()})
        return lr

    monkeypatch.setattr(train_step, "apply_lr_and_step", recording_step)
    state = pretrain.run(config)
    w0, w1, w2 = recorded
    r = 0.75
    for name, value in state.ema.shadow.items():
        expected = r * r * w0[name].double() + r * (1 - r) * w1[name].double() + (1 - r) * w2[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)


def test_ema_resume_is_bit_exact(data, tmp_path):
    full = pretrain.run(tiny_config(data, tmp_path / "full", "ema=true", "ema_rate=0.9"))
    stopped = tiny_config(data, tmp_path / "part", "ema=true", "ema_rate=0.9", "stop_at_step=2")
    pretrain.run(stopped)
    resumed = pretrain.run(tiny_config(data, tmp_path / "part", "ema=true", "ema_rate=0.9", "resume=auto"))
    assert resumed.step == full.step == 6
    for name, value in full.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], value), name
    a = torch.load(tmp_path / "full" / "step_6", weights_only=True)
    b = torch.load(tmp_path / "part" / "step_6", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- learned-halting evaluation


@dataclasses.dataclass
class ScriptedCarry:
    steps: torch.Tensor
    halted: torch.Tensor
    current_data: dict


class ScriptedACT(nn.Module):
    """An ACT model with known behaviour, keyed by puzzle identifier: q_halt > q_continue from step
    `halt_at[id]` on; the prediction is right from step `right_at[id]` on, before that wrong at the
    first `wrong_tokens[id]` positions. Like the real model in eval, rows only halt at halt_max_steps."""

    def __init__(self, halt_at, right_at, wrong_tokens, halt_max_steps=4, vocab=6):
        super().__init__()
        self.halt_at, self.right_at, self.wrong_tokens = halt_at, right_at, wrong_tokens
        self.halt_max_steps, self.vocab, self.calls = halt_max_steps, vocab, 0

    def initial_carry(self, batch):
        b = batch["inputs"].shape[0]
        return ScriptedCarry(
            torch.zeros(b, dtype=torch.int32),
            torch.ones(b, dtype=torch.bool),
            {k: torch.empty_like(v) for k, v in batch.items()},
        )

    def forward(self, carry, batch):
        self.calls += 1
        steps = torch.where(carry.halted, 0, carry.steps) + 1
        data = {
            k: torch.where(carry.halted.view(-1, *[1] * (v.ndim - 1)), batch[k], v)
            for k, v in carry.current_data.items()
        }
        ids = data["puzzle_identifiers"].long()
        labels = data["labels"].clamp_min(0).long()
        wrong = (steps < self.right_at[ids]).unsqueeze(-1) & (
            torch.arange(labels.shape[1]) < self.wrong_tokens[ids].unsqueeze(-1)
        )
        predicted = torch.where(wrong, (labels + 1) % self.vocab, labels)
        logits = 5.0 * nn.functional.one_hot(predicted, self.vocab).float()  # [B, S, V]
        q_halt = torch.where(steps >= self.halt_at[ids], 1.0, -1.0)
        outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": torch.zeros_like(q_halt)}
        return ScriptedCarry(steps, steps >= self.halt_max_steps, data), outputs


def scripted_eval(tmp_path, halting, model, batch):
    config = tiny_config(
        tmp_path, tmp_path / "ckpt", f"eval_halting={halting}", "eval_save_outputs=[logits,puzzle_identifiers]"
    )
    head = ACTLossHead(model, "stablemax_cross_entropy")  # the loss of the tiny config
    state = train_state.TrainState(model=head, forward=head, optimizers=[], optimizer_lrs=[], total_steps=0, step=7)
    head.eval()
    model.calls = 0
    metadata = types.SimpleNamespace(sets=["all"])
    results = pretrain.evaluate(config, state, [("all", batch, 5)], metadata, CPU)["all"]
    saved = torch.load(tmp_path / "ckpt" / "step_7_all_preds.0")
    return results, saved, model.calls


def scripted_batch(ids):
    labels = torch.tensor([[1, 2, 3, 4]] * len(ids), dtype=torch.int32)
    labels[ids.index(4)] = IGNORE_LABEL_ID  # identifier 4: a padding row without labels
    return {"inputs": labels.clamp_min(0), "labels": labels, "puzzle_identifiers": torch.tensor(ids, dtype=torch.int32)}


NEVER = 99


def test_learned_halting_stops_rows_at_their_q_decision(tmp_path):
    # id:              0      1   2      3  4 (padding)
    halt_at = torch.tensor([1, 2, NEVER, 3, 1])
    right_at = torch.tensor([2, 2, 3, 1, 1])
    wrong_tokens = torch.tensor([1, 4, 4, 4, 0])
    model = ScriptedACT(halt_at, right_at, wrong_tokens, halt_max_steps=4)
    batch = scripted_batch([0, 1, 2, 3, 4])

    learned, saved, calls = scripted_eval(tmp_path, "learned", model, batch)
    # Stops: id0 at 1 (1 of 4 tokens wrong), id1 at 2 (right), id2 never halts → 4 (right), id3 at 3 (right).
    assert calls == 4
    assert learned["exact_accuracy"] == pytest.approx(3 / 4)
    assert learned["accuracy"] == pytest.approx((3 / 4 + 1 + 1 + 1) / 4)
    assert learned["steps"] == pytest.approx((1 + 2 + 4 + 3) / 4)
    # q_halt >= 0 predicts "right": id0 halts wrong (miss), id1 ok, id2 (q_halt −1, right: miss), id3 ok.
    assert learned["q_halt_accuracy"] == pytest.approx(2 / 4)
    preds = saved["logits"].argmax(-1)
    assert preds[0].tolist() == [2, 2, 3, 4]  # frozen at step 1: first token still wrong
    assert preds[1].tolist() == preds[2].tolist() == preds[3].tolist() == [1, 2, 3, 4]
    assert saved["puzzle_identifiers"].tolist() == [0, 1, 2, 3, 4]

    fixed, saved_fixed, calls = scripted_eval(tmp_path, "fixed", model, batch)
    # The reference: every row at step 4, all right; q_halt at step 4 is +1 except for id2.
    assert calls == 4
    assert fixed["exact_accuracy"] == fixed["accuracy"] == 1.0
    assert fixed["steps"] == 4.0
    assert fixed["q_halt_accuracy"] == pytest.approx(3 / 4)
    assert set(fixed) == set(learned)
    # lm_loss of learned halting = the loss of the frozen logits, by hand from the fixed run's per-row loss:
    # rows 1..3 have the same (all right) logits in both runs, so only row 0 differs.
    assert learned["lm_loss"] > fixed["lm_loss"]


def test_learned_halting_ends_batch_when_all_rows_stopped(tmp_path):
    model = ScriptedACT(torch.tensor([1, 2, 2, 1, 1]), torch.tensor([1, 1, 3, 1, 1]), torch.tensor([4, 4, 4, 4, 0]))
    batch = scripted_batch([0, 1, 2, 3, 4])
    learned, _, calls = scripted_eval(tmp_path, "learned", model, batch)
    assert calls == 2  # not halt_max_steps = 4
    assert learned["steps"] == pytest.approx((1 + 2 + 2 + 1) / 4)
    assert learned["exact_accuracy"] == pytest.approx(3 / 4)  # id2 is wrong until step 3


def test_learned_halting_without_early_stops_equals_fixed(tmp_path):
    model = ScriptedACT(torch.full((5,), NEVER), torch.tensor([2, 3, 4, 5, 1]), torch.tensor([1, 2, 3, 4, 0]))
    batch = scripted_batch([0, 1, 2, 3, 4])
    learned, saved_learned, _ = scripted_eval(tmp_path, "learned", model, batch)
    fixed, saved_fixed, _ = scripted_eval(tmp_path, "fixed", model, batch)
    assert learned == fixed
    assert torch.equal(saved_learned["logits"], saved_fixed["logits"])
    assert fixed["exact_accuracy"] == pytest.approx(3 / 4)  # id3 is right only from step 5


def test_learned_halting_on_the_real_model(data, tmp_path):
    """A trained tiny HRM: learned-halting steps lie in [1, halt_max_steps]; `fixed` reports halt_max_steps."""
    ckpt = tmp_path / "ckpt"
    pretrain.run(tiny_config(data, ckpt, "epochs=2"))
    out = {}
    for mode in ("fixed", "learned"):
        cfg = evaluate_cli.EvalConfig(checkpoint=str(ckpt / "step_3"), device="cpu", eval_halting=mode)
        out[mode] = evaluate_cli.evaluate_checkpoint(cfg, CPU)["metrics"]["all"]
    assert out["fixed"]["steps"] == 3.0  # tiny arch: halt_max_steps=3
    assert 1.0 <= out["learned"]["steps"] <= 3.0


# --------------------------------------------------------------------------------------- early stop, best


def test_early_stopping_window(monkeypatch):
    stopper = training_options.EarlyStopping(threshold=0.9, window=3)
    seq = [1.0, 1.0, 0.5, 1.0, 1.0, 1.0]
    decisions = [stopper.update({"train/exact_accuracy": v}, CPU) for v in seq]
    # Means of the full windows: (1,1,.5)=.83, (1,.5,1)=.83, (.5,1,1)=.83, (1,1,1)=1 → stop at the 6th step.
    assert decisions == [False, False, False, False, False, True]
    assert stopper.update(None, CPU) is True  # no metrics this step (past the last step): window unchanged


def test_early_stop_saves_and_says_so(data, tmp_path, monkeypatch, capsys):
    original = train_step.train_metrics

    def perfect_from_step_1(summed, global_batch_size, lr):
        out = original(summed, global_batch_size, lr)
        out["train/exact_accuracy"] = 1.0
        return out

    monkeypatch.setattr(train_step, "train_metrics", perfect_from_step_1)
    ckpt = tmp_path / "ckpt"
    state = pretrain.run(
        tiny_config(data, ckpt, "early_stop_train_accuracy=0.99", "early_stop_window=2", "checkpoint_every_eval=false")
    )
    assert state.step == 2  # window of 2 full at step 2, mid-way through the first iteration
    assert (ckpt / "step_2").is_file()
    payload = train_state.read_train_state(str(ckpt / "train_state_step_000002.pt"))
    assert (payload["data_iters"], payload["data_batches"]) == (0, 2)
    assert "early stop at step 2" in capsys.readouterr().err
    logged = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == 2 and "all/exact_accuracy" in r for r in logged)  # it evaluated before stopping


def test_keep_best_by_eval_metric(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    pretrain.run(tiny_config(data, ckpt, "eval_interval=1", "keep_best=all/lm_loss"))
    evals = {
        r["step"]: r["all/lm_loss"]
        for r in map(json.loads, (ckpt / "metrics.jsonl").read_text().splitlines())
        if "all/lm_loss" in r
    }
    assert len(evals) == 4
    best_step = min(evals, key=lambda s: (evals[s], s))  # lower is better for losses; the first best is kept
    record = json.loads((ckpt / "best.json").read_text())
    assert record == {"metric": "all/lm_loss", "value": evals[best_step], "step": best_step}
    best = torch.load(ckpt / "best", weights_only=True)
    expected = torch.load(ckpt / f"step_{best_step}", weights_only=True)
    assert all(torch.equal(best[k], expected[k]) for k in expected)
    # evaluate.py on `best` reports the best checkpoint's step (its name has none) and names its files by it
    cfg = evaluate_cli.EvalConfig(checkpoint=str(ckpt / "best"), device="cpu", save_outputs=["inputs"])
    metrics = evaluate_cli.evaluate_checkpoint(cfg, CPU)["metrics"]["all"]
    assert metrics["lm_loss"] == pytest.approx(evals[best_step], rel=1e-5)
    assert json.loads((ckpt / "eval_results.json").read_text())["step"] == best_step
    assert (ckpt / f"step_{best_step}_all_preds.0").is_file() and not (ckpt / "step_0_all_preds.0").exists()


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"metric": "all/lm_loss", "value": 0.5', "unreadable keep_best record (Expecting"),
        ("\xff\xfe", "unreadable keep_best record"),
        ("[1, 2]", 'not a keep_best record {"metric", "value", "step"}'),
        ('{"metric": "all/lm_loss", "value": "low", "step": 3}', "not a keep_best record"),
        ('{"metric": "all/lm_loss", "value": 0.5, "step": true}', "not a keep_best record"),
    ],
    ids=["truncated", "not_utf8", "a_list", "value_not_a_number", "step_not_an_int"],
)
def test_damaged_best_record_is_one_error_line(tmp_path, text, reason):
    """A damaged best.json stops a resumed keep_best run, and an evaluation of `best`, with one line naming it."""
    (tmp_path / "best.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError) as caught:
        training_options.BestCheckpoint("all/lm_loss", str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'best.json'}: ") and reason in message and "\n" not in message
    with pytest.raises(ValueError, match="keep_best record"):
        evaluate_cli.checkpoint_step(str(tmp_path / "best"), 0)
    assert evaluate_cli.checkpoint_step(str(tmp_path / "step_7"), 7) == 7  # only `best` reads the record


def test_keep_best_direction_and_unknown_metric(data, tmp_path):
    best = training_options.BestCheckpoint("all/exact_accuracy", str(tmp_path))
    assert best.is_better(0.1) and not best.is_better(float("nan"))
    best.value = 0.5
    assert best.is_better(0.6) and not best.is_better(0.5)
    loss = training_options.BestCheckpoint("all/lm_loss", str(tmp_path))
    loss.value = 0.5
    assert loss.is_better(0.4) and not loss.is_better(0.6)
    with pytest.raises(ValueError, match="config key 'keep_best': 'all/nope' is not an eval metric"):
        pretrain.run(tiny_config(data, tmp_path / "ckpt", "epochs=2", "keep_best=all/nope"))


# ----------------------------------------------------------------------------------- gradient accumulation


def train_batches(config, n):
    ds = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=0,
            dataset_path=config.data_path,
            global_batch_size=config.global_batch_size,
            test_set_mode=False,
            epochs_per_iter=4,
            rank=0,
            num_replicas=1,
        )
    )
    return [batch for _, (_, batch, _) in zip(range(n), ds)]


def make_state(config):
    torch.manual_seed(0)
    metadata = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=0,
            dataset_path=config.data_path,
            global_batch_size=4,
            test_set_mode=False,
            epochs_per_iter=1,
            rank=0,
            num_replicas=1,
        )
    ).metadata
    state, _ = pretrain.init_train_state(config, metadata, CPU)
    state.model.train()
    return state


def test_two_micro_batches_give_the_full_batch_gradients_and_update(data, tmp_path):
    # No exploration noise: it draws random numbers per call, so its draws would differ between the two.
    common = ["arch.halt_exploration_prob=0", "arch.halt_max_steps=2"]
    full = make_state(tiny_config(data, tmp_path / "a", *common))
    accum = make_state(tiny_config(data, tmp_path / "b", *common, "grad_accum_steps=2"))
    assert accum.model.model.config.batch_size == 2 and accum.sparse_grads is not None
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, accum.model.state_dict()[key])

    config = tiny_config(data, tmp_path / "a", *common)
    for batch in train_batches(config, 3):  # the carries persist over 3 steps
        _, metrics_full = train_step.forward_backward(full, batch, 4, CPU.device, 1)
        _, metrics_accum = train_step.forward_backward(accum, batch, 4, CPU.device, 2)
        for k in metrics_full:
            torch.testing.assert_close(metrics_accum[k].double(), metrics_full[k].double(), rtol=1e-6, atol=1e-6)
        for (name, p), q in zip(full.model.named_parameters(), accum.model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
        # The sign-SGD sees every row of the batch, in the same order.
        emb = full.model.model.puzzle_emb
        assert torch.equal(accum.sparse_grads.local_ids, emb.local_ids)
        torch.testing.assert_close(accum.sparse_grads.local_weights.grad, emb.local_weights.grad, rtol=1e-5, atol=1e-7)

        for state in (full, accum):
            state.step += 1
            train_step.apply_lr_and_step(config, state)
        for key, value in full.model.state_dict().items():
            torch.testing.assert_close(accum.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
        for a, b in zip(dataclasses.astuple(full.carry.inner_carry), dataclasses.astuple(accum.carry.inner_carry)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert torch.equal(full.carry.steps, accum.carry.steps) and torch.equal(full.carry.halted, accum.carry.halted)


def test_grad_accum_training_run(data, tmp_path):
    """End to end with the launcher (exploration on): it trains, evaluates and resumes bit-exactly."""
    full = pretrain.run(tiny_config(data, tmp_path / "full", "grad_accum_steps=2"))
    pretrain.run(tiny_config(data, tmp_path / "part", "grad_accum_steps=2", "stop_at_step=4"))
    resumed = pretrain.run(tiny_config(data, tmp_path / "part", "grad_accum_steps=2", "resume=auto"))
    assert full.step == resumed.step == 6
    a = torch.load(tmp_path / "full" / "step_6", weights_only=True)
    b = torch.load(tmp_path / "part" / "step_6", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_all_options_on_two_gloo_ranks(tmp_path):
    """Every option on at once over 2 ranks: the collectives (early-stop decision, keep-best check, SignSGD
    over accumulated rows) line up, ranks end identical, and the best file is written."""
    data = make_tiny_dataset(tmp_path / "data", num_groups=16)
    overrides = [
        *TINY_ARCH,
        f"data_path={data}",
        f"checkpoint_path={tmp_path / 'ckpt'}",
        "global_batch_size=8",  # 4 rows per rank, 2 per micro-batch
        "epochs=2",
        "eval_interval=1",
        "use_wandb=false",
        "device=cpu",
        "ema=true",
        "eval_halting=learned",
        "early_stop_train_accuracy=1.0",
        "early_stop_window=50",
        "keep_best=all/accuracy",
        "grad_accum_steps=2",
    ]
    rank0, rank1, meta0, _ = run_two_rank_training(tmp_path, overrides)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert meta0["step"] == 2 * 16 // 8
    record = json.loads((tmp_path / "ckpt" / "best.json").read_text())
    assert record["metric"] == "all/accuracy" and record["step"] in (2, 4)
