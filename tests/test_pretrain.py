"""Unit tests of the training step pieces, optimizer setup, compile switch, loggers and checkpoint helpers."""

import math
import os

import pytest
import torch
from torch import nn

import pretrain
from tests.helpers import make_tiny_dataset, metric_records, tiny_config
from training import build, train_state, train_step
from utils import checkpointing as ckpt
from utils import logging_utils
from utils.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_compile_switch(tmp_path, monkeypatch):
    monkeypatch.delenv("DISABLE_COMPILE", raising=False)
    config = tiny_config(tmp_path, tmp_path)  # compile: null
    assert build.use_compile(config, torch.device("cpu")) is False
    assert build.use_compile(config, torch.device("cuda", 0)) is True
    forced = config.model_copy(update={"compile": True})
    assert build.use_compile(forced, torch.device("cpu")) is True
    assert build.use_compile(config.model_copy(update={"compile": False}), torch.device("cuda", 0)) is False
    monkeypatch.setenv("DISABLE_COMPILE", "1")  # the reference's switch still works
    assert build.use_compile(forced, torch.device("cuda", 0)) is False


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that remembers the gradient and lr it stepped with."""

    def step(self, closure=None):
        self.seen = [(g["lr"], [p.grad.clone() for p in g["params"]]) for g in self.param_groups]
        return super().step(closure)


class QuadraticHead(nn.Module):
    """Stands in for the loss head: loss = sum(3 * w) + sum(5 * v), fixed metrics."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.v = nn.Parameter(torch.ones(3))
        self.calls = 0

    def initial_carry(self, batch):
        return {"n": torch.zeros(())}

    def forward(self, carry, batch, return_keys):
        self.calls += 1
        metrics = {"count": torch.tensor(2), "lm_loss": torch.tensor(8.0), "accuracy": torch.tensor(1.5)}
        return {"n": carry["n"] + 1}, (3 * self.w).sum() + (5 * self.v).sum(), metrics, {}, torch.tensor(True)


def test_train_batch_scales_loss_schedules_both_optimizers_and_reduces_metrics(tmp_path):
    config = tiny_config(tmp_path, tmp_path, "lr_warmup_steps=4", "lr=0.8", "puzzle_emb_lr=0.4")
    head = QuadraticHead()
    first = RecordingSGD([{"params": [head.w], "lr_scale": 0.5}], lr=0.0)
    second = RecordingSGD([head.v], lr=0.0)
    state = train_state.TrainState(head, head, [first, second], [0.4, 0.8], total_steps=3)
    batch = {"inputs": torch.zeros(2, 3, dtype=torch.int32)}

    metrics = pretrain.train_batch(config, state, batch, global_batch_size=16, info=CPU)
    # Step 1 of a 4-step warmup: lr = base/4; the first optimizer's group carries lr_scale 0.5.
    assert first.seen[0][0] == pytest.approx(0.4 / 4 * 0.5)
    assert second.seen[0][0] == pytest.approx(0.8 / 4)
    torch.testing.assert_close(first.seen[0][1][0], torch.full((2,), 3 / 16))  # d(loss/16)/dw
    torch.testing.assert_close(second.seen[0][1][0], torch.full((3,), 5 / 16))
    assert head.w.grad is None and head.v.grad is None  # zeroed after the step
    # "loss" keys divide by the global batch, the rest by count; lr is the last optimizer's.
    assert metrics == {
        "train/count": 1.0,
        "train/lm_loss": 8.0 / 16,
        "train/accuracy": 1.5 / 2,
        "train/lr": pytest.approx(0.2),
    }
    assert state.carry["n"].item() == 1  # carry built from the first batch, then kept
    pretrain.train_batch(config, state, batch, 16, CPU)
    assert state.carry["n"].item() == 2
    pretrain.train_batch(config, state, batch, 16, CPU)
    # Past total_steps the step counter still advances but nothing is computed.
    assert pretrain.train_batch(config, state, batch, 16, CPU) is None
    assert (state.step, head.calls) == (4, 3)


def test_train_metrics_with_no_halted_sequence():
    out = train_step.train_metrics({"count": 0.0, "q_halt_loss": 4.0, "steps": 0.0}, 8, 0.1)
    assert out == {"train/count": 0.0, "train/q_halt_loss": 0.5, "train/steps": 0.0, "train/lr": 0.1}


def test_model_and_optimizers(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    config = tiny_config(data, tmp_path / "ckpt")
    dataset, _ = pretrain.create_dataloader(config, "train", CPU, test_set_mode=False, epochs=1)
    state, sources = pretrain.init_train_state(config, dataset.metadata, CPU)
    assert [type(o).__name__ for o in state.optimizers] == ["CastedSparseEmbeddingSignSGD_Distributed", "AdamATan2"]
    assert state.optimizer_lrs == [config.puzzle_emb_lr, config.lr]
    inner = state.model.model.inner
    assert inner.embed_tokens.embedding_weight.shape == (dataset.metadata.vocab_size, 32)
    assert inner.puzzle_emb.weights.shape == (dataset.metadata.num_puzzle_identifiers, 32)
    assert state.model.model.config.batch_size == 4 and state.model.model.config.seq_len == 8
    assert [os.path.basename(s) for s in sources] == ["hrm_act_v1.py", "losses.py"]
    # total_steps = epochs * groups * mean examples / global batch = 4 * 6 * 1 / 4
    assert state.total_steps == 6
    # No puzzle embedding → AdamATan2 only.
    no_emb = config.model_copy(update={"arch": config.arch.model_copy(update={"puzzle_emb_ndim": 0})})
    state, _ = pretrain.init_train_state(no_emb, dataset.metadata, CPU)
    assert [type(o).__name__ for o in state.optimizers] == ["AdamATan2"] and state.optimizer_lrs == [config.lr]


def test_optimizer_param_groups_hook(tmp_path):
    config = tiny_config(tmp_path, tmp_path)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def optimizer_param_groups(self):
            return [
                {"params": list(self.a.parameters()), "lr_scale": 1.0},
                {"params": list(self.b.parameters()), "lr_scale": 0.1},
            ]

    head = nn.Module()
    head.model = Model()
    optimizers, lrs = pretrain.create_optimizers(config, head, world_size=1)
    (adam,) = optimizers
    assert [g.get("lr_scale") for g in adam.param_groups] == [1.0, 0.1] and lrs == [config.lr]


def test_data_loading_leaves_global_rng_alone(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    config = tiny_config(data, tmp_path / "ckpt")
    _, loader = pretrain.create_dataloader(config, "train", CPU, test_set_mode=False, epochs=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert len(list(loader)) == 1
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------------- logging


def test_wandb_goes_offline_without_credentials(monkeypatch, tmp_path, capsys):
    import wandb

    calls = []

    class FakeRun:
        def log(self, metrics, step):
            calls.append(("log", metrics, step))

        def finish(self):
            calls.append(("finish",))

    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(("init", kw)) or FakeRun())
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    logger = logging_utils.create_logger(
        is_main=True, use_wandb=True, project="P", run_name="R", config={"a": 1}, jsonl_path=None
    )
    logger.log({"x": 1.0}, step=3)
    logger.close()
    assert calls[0] == ("init", {"project": "P", "name": "R", "config": {"a": 1}, "mode": "offline"})
    assert calls[1:] == [("log", {"x": 1.0}, 3), ("finish",)]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "offline" in err[0]

    calls.clear()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password secret\n")
    os.chmod(tmp_path / ".netrc", 0o600)
    logging_utils.WandbLogger("P", "R", {})
    assert calls[0][1]["mode"] is None  # credentials found: online, W&B's own default
    assert capsys.readouterr().err == ""


def test_jsonl_and_null_loggers(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = logging_utils.create_logger(
        is_main=True, use_wandb=False, project="", run_name="", config={}, jsonl_path=str(path)
    )
    logger.log({"train/lm_loss": 1.5}, step=1)
    logger.log({"all/accuracy": float("nan")}, step=2)
    logger.close()
    assert metric_records(path) == [{"step": 1, "train/lm_loss": 1.5}, {"step": 2, "all/accuracy": "nan"}]
    other_rank = logging_utils.create_logger(
        is_main=False, use_wandb=True, project="", run_name="", config={}, jsonl_path=str(path)
    )
    assert isinstance(other_rank, logging_utils.NullLogger)


# ---------------------------------------------------------------------------------------- checkpoints


def test_atomic_write_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "state.pt"
    ckpt.atomic_torch_save({"v": 1}, str(path))

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(str(path), broken)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary left behind


def test_find_latest_train_state(tmp_path):
    assert ckpt.find_latest_train_state(str(tmp_path / "missing")) is None
    for step in (9, 120, 35):
        (tmp_path / f"train_state_step_{step:06d}.pt").write_bytes(b"")
    (tmp_path / "step_999").write_bytes(b"")
    (tmp_path / ".train_state_step_000999.pt.abc.tmp").write_bytes(b"")  # an interrupted write
    assert ckpt.find_latest_train_state(str(tmp_path)) == str(tmp_path / "train_state_step_000120.pt")
    assert ckpt.step_from_filename("/x/step_120") == 120 and ckpt.step_from_filename("/x/model.pt") == 0


def test_state_dict_mismatch_message():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^src: 'weight' has shape \[2, 4\] in the checkpoint but \[2, 3\]"):
        ckpt.load_model_weights(model, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "src")
    with pytest.raises(ValueError, match=r"^src: key 'bias' missing"):
        ckpt.load_model_weights(model, {"weight": torch.zeros(2, 3)}, "src")
    ckpt.load_model_weights(model, {"_orig_mod.weight": torch.ones(2, 3), "_orig_mod.bias": torch.ones(2)}, "src")
    assert math.isclose(model.weight.sum().item(), 6.0)
