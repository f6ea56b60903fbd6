"""Reliability: the non-finite guard (skip / stop), checkpoint writes that fail, stale temporary files,
and every rank reaching the same skip decision.

Expectations are independent of the guard's code: a run whose step k is poisoned and skipped must hold
exactly the weights and optimizer state of a clean run stopped at step k - 1.
"""

import errno
import io
import json
import os
import pickle
import re
import resource
import subprocess
import sys
import textwrap

import pytest
import torch

import pretrain
from models.losses import ACTLossHead
from tests.helpers import REPO, TINY_ARCH, free_port, make_tiny_dataset, metric_records, tiny_config
from training import train_state, train_step
from utils import checkpointing as ckpt

BAD_STEP = 2  # tiny config: 6 steps, 3 per loader iteration; step 2 is mid-iteration


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("reliability") / "data")


@pytest.fixture(scope="module")
def clean_before_bad_step(data, tmp_path_factory):
    """A clean run stopped just before the poisoned step: what a skipped step must leave behind."""
    return pretrain.run(tiny_config(data, tmp_path_factory.mktemp("clean"), f"stop_at_step={BAD_STEP - 1}"))


def poison(monkeypatch, where: str, at_step: int) -> None:
    """Make train step `at_step` non-finite: its loss (hence every gradient), one parameter gradient, or
    one row of the sparse puzzle-embedding gradient (which is not all-reduced with the others)."""
    if where == "loss":
        forward, calls = ACTLossHead.forward, [0]

        def poisoned_forward(self, *args, **kwargs):
            carry, loss, *rest = forward(self, *args, **kwargs)
            if self.training:
                calls[0] += 1
                if calls[0] == at_step:
                    loss = loss * float("nan")
            return carry, loss, *rest

        monkeypatch.setattr(ACTLossHead, "forward", poisoned_forward)
        return
    sync, calls = train_step.sync_gradients, [0]

    def poisoned_sync(model, local_checks=()):
        calls[0] += 1
        if calls[0] == at_step:
            if where == "param_grad":
                next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
            else:  # sparse_grad: local_checks = [loss, puzzle-embedding gradient]
                assert len(local_checks) == 2
                local_checks[1][0, 0] = float("inf")
        return sync(model, local_checks)

    monkeypatch.setattr(train_step, "sync_gradients", poisoned_sync)


def assert_same_state(state, expected):
    got, want = state.model.state_dict(), expected.model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for opt, opt_expected in zip(state.optimizers, expected.optimizers, strict=True):
        got, want = opt.state_dict()["state"], opt_expected.state_dict()["state"]
        assert got.keys() == want.keys()
        for idx in want:
            for name, value in want[idx].items():  # moments and step counts
                assert torch.equal(torch.as_tensor(got[idx][name]), torch.as_tensor(value)), (idx, name)


@pytest.mark.parametrize("where", ["loss", "param_grad", "sparse_grad"])
def test_skip_leaves_weights_and_optimizer_state_unchanged(
    data, clean_before_bad_step, tmp_path, monkeypatch, capsys, where
):
    poison(monkeypatch, where, BAD_STEP)
    state = pretrain.run(tiny_config(data, tmp_path / "ckpt", f"stop_at_step={BAD_STEP}"))
    assert state.step == BAD_STEP and state.skipped_steps == 1
    assert_same_state(state, clean_before_bad_step)  # incl. the SignSGD-trained puzzle embedding
    warnings = [line for line in capsys.readouterr().err.splitlines() if "non-finite" in line]
    assert warnings == [f"warning: step {BAD_STEP}: non-finite loss or gradients, update skipped (nonfinite=skip)"]
    # The ACT carry restarts after a skipped step (its hidden states may be the bad ones).
    saved = train_state.read_train_state(ckpt.find_latest_train_state(str(tmp_path / "ckpt")))
    assert saved["ranks"][0]["carry"] is None


def test_skip_then_training_goes_on(data, tmp_path, monkeypatch):
    poison(monkeypatch, "loss", BAD_STEP)
    state = pretrain.run(tiny_config(data, tmp_path / "ckpt"))
    assert state.step == 6 and state.skipped_steps == 1
    weights = state.model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    adam_steps = [s["step"] for s in state.optimizers[-1].state_dict()["state"].values()]
    assert all(float(s) == 6 - 1 for s in adam_steps)  # 6 steps, one skipped


@pytest.mark.parametrize("where", ["loss", "sparse_grad"])
def test_async_metrics_run_equals_waited_run(data, tmp_path, monkeypatch, capsys, where):
    """`async_metrics` (read each step's outcome one step late; the GPU default) changes nothing: with a
    poisoned step, the run ends with the same weights, optimizer state, metric lines and warning as a run
    that waits for every step. The skipped step restarts the carry on the device, not by the host."""
    runs = {}
    for mode in ("false", "true"):
        monkeypatch.undo()
        poison(monkeypatch, where, BAD_STEP)
        path = tmp_path / f"async_{mode}"
        runs[mode] = pretrain.run(tiny_config(data, path, f"async_metrics={mode}"))
        warnings = [line for line in capsys.readouterr().err.splitlines() if "non-finite" in line]
        assert warnings == [f"warning: step {BAD_STEP}: non-finite loss or gradients, update skipped (nonfinite=skip)"]
        assert runs[mode].step == 6 and runs[mode].skipped_steps == 1
    assert_same_state(runs["true"], runs["false"])
    lines = {mode: metric_records(tmp_path / f"async_{mode}" / "metrics.jsonl") for mode in runs}
    assert len(lines["true"]) > 6 and lines["true"] == lines["false"]


def test_async_metrics_refuses_options_that_need_each_step_at_once(data, tmp_path):
    for extra in ("nonfinite=stop", "early_stop_train_accuracy=0.5"):
        with pytest.raises(ValueError, match="config key 'async_metrics'"):
            tiny_config(data, tmp_path, "async_metrics=true", extra)


def test_stop_saves_train_state_and_names_the_step(data, clean_before_bad_step, tmp_path, monkeypatch):
    poison(monkeypatch, "loss", BAD_STEP)
    with pytest.raises(train_step.NonFiniteError, match=rf"^non-finite loss or gradients at step {BAD_STEP} "):
        pretrain.run(tiny_config(data, tmp_path / "ckpt", "nonfinite=stop"))
    path = ckpt.find_latest_train_state(str(tmp_path / "ckpt"))
    assert path is not None and path.endswith(f"train_state_step_{BAD_STEP:06d}.pt")
    saved = train_state.read_train_state(path)
    expected = clean_before_bad_step.model.state_dict()
    for key, value in expected.items():
        assert torch.equal(saved["model"][key], value), key
    # The saved state resumes (the poisoned batch is consumed) and finishes the run.
    monkeypatch.undo()
    resumed = pretrain.run(tiny_config(data, tmp_path / "ckpt", "resume=auto"))
    assert resumed.step == 6


# Runs the real command line with a poisoned loss head (the NaN cannot come from a config).
POISON_DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import pretrain
    from models.losses import ACTLossHead

    forward, calls = ACTLossHead.forward, [0]

    def poisoned_forward(self, *args, **kwargs):
        carry, loss, *rest = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == {step}:
                loss = loss * float("nan")
        return carry, loss, *rest

    ACTLossHead.forward = poisoned_forward
    pretrain.main()
    """
)

CLI_BASE = [
    *TINY_ARCH,
    "project_name=test",
    "run_name=tiny",
    "global_batch_size=4",
    "epochs=4",
    "eval_interval=2",
    "lr_warmup_steps=2",
    "use_wandb=false",
    "device=cpu",
]


def run_driver(tmp_path, driver_text, *overrides):
    driver = tmp_path / "driver.py"
    driver.write_text(driver_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(driver), *CLI_BASE, *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    return errors


def test_stop_from_command_line_exits_3_with_one_line(data, tmp_path):
    result = run_driver(
        tmp_path,
        POISON_DRIVER.format(repo=str(REPO), step=BAD_STEP),
        f"data_path={data}",
        f"checkpoint_path={tmp_path / 'ckpt'}",
        "nonfinite=stop",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: non-finite loss or gradients at step {BAD_STEP} (nonfinite=stop)")
    assert str(tmp_path / "ckpt") in line
    assert (tmp_path / "ckpt" / f"train_state_step_{BAD_STEP:06d}.pt").is_file()


def test_bad_nonfinite_value_is_a_config_error(data, tmp_path):
    with pytest.raises(ValueError, match="config key 'nonfinite'"):
        tiny_config(data, tmp_path, "nonfinite=ignore")


# ------------------------------------------------------------------ checkpoint writes that fail


@pytest.mark.parametrize(
    "target, failure",
    [
        ("torch.save", OSError(errno.ENOSPC, "No space left on device")),
        ("os.replace", OSError(errno.EACCES, "Permission denied")),
        ("os.fsync", OSError(errno.EIO, "Input/output error")),
    ],
)
def test_failed_write_keeps_previous_file(tmp_path, monkeypatch, target, failure):
    path = tmp_path / "train_state_step_000001.pt"
    ckpt.atomic_torch_save({"w": torch.arange(4)}, str(path))
    before = path.read_bytes()

    module_name, attr = target.split(".")
    module = {"torch": torch, "os": os}[module_name]
    original = getattr(module, attr)

    def failing(*args, **kwargs):
        if attr == "save":  # fail mid-write: some bytes reach the temporary file first
            args[1].write(b"partial")
        raise failure

    monkeypatch.setattr(module, attr, failing)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        ckpt.atomic_torch_save({"w": torch.arange(8)}, str(path))
    monkeypatch.setattr(module, attr, original)
    assert str(info.value) == f"cannot write checkpoint to {tmp_path}: {failure.strerror}"
    assert info.value.errno == failure.errno
    assert path.read_bytes() == before  # untouched
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))


class FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails every write with ENOSPC, as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)


STATE = {"w": torch.arange(2000, dtype=torch.float32), "b": torch.ones(3)}


def torch_save_error(room: int) -> type:
    try:
        torch.save(STATE, FullDisk(io.BytesIO(), room))
    except Exception as e:
        return type(e)
    return type(None)


@pytest.mark.parametrize("room", [0, 100, 1000, 4000, 8100])
def test_torch_save_onto_a_full_disk_is_a_checkpoint_write_error(tmp_path, room):
    path = tmp_path / "train_state_step_000001.pt"
    ckpt.atomic_torch_save({"w": torch.arange(4)}, str(path))
    before = path.read_bytes()
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        ckpt.atomic_write(str(path), lambda f: torch.save(STATE, FullDisk(f, room)))
    assert str(info.value) == f"cannot write checkpoint to {tmp_path}: No space left on device"
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def test_full_disk_cases_include_torch_hiding_the_os_error():
    # torch.save lets the OSError through at the archive's start, but mid-archive its C++ writer raises a
    # RuntimeError ("unexpected pos ...") instead: the cases above must cover both.
    assert {torch_save_error(room) for room in (0, 100, 1000, 4000, 8100)} == {OSError, RuntimeError}


def test_torch_writer_failure_without_an_os_error_is_a_checkpoint_write_error(tmp_path):
    def fail(f):
        f.write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(ckpt.CheckpointWriteError, match=r"^cannot write checkpoint to .*: write failed \(Pytorch"):
        ckpt.atomic_write(str(tmp_path / "step_1"), fail)
    assert os.listdir(tmp_path) == []


def test_other_errors_while_writing_are_not_disguised_as_write_failures(tmp_path):
    with pytest.raises(Exception) as info:  # a bug (an object that cannot be pickled) stays what it is
        ckpt.atomic_torch_save({"f": lambda: 0}, str(tmp_path / "step_1"))
    assert not isinstance(info.value, ckpt.CheckpointWriteError) and os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", r"not a readable torch checkpoint \(empty file\)"),
        (b"PK\x03\x04 half a zip", r"not a readable torch checkpoint \(RuntimeError: PytorchStreamReader failed"),
        (bytes(range(256)) * 4, r"not a readable torch checkpoint \(\w+: "),
        (pickle.dumps({"w": [1, 2]}), r"not a readable torch checkpoint \(\w+: "),
        ("torch:list", r"expected a state dict, found list"),
        ("torch:ints", r"expected a state dict of tensors, found key 'w' holding int"),
        ("folder", r"a folder, not a checkpoint file"),
    ],
)
def test_unreadable_weights_file_is_one_line_naming_it(tmp_path, recwarn, content, reason):
    path = tmp_path / "step_5"
    if content == "folder":
        path.mkdir()
    elif content == "torch:list":
        torch.save([torch.ones(1)], path)
    elif content == "torch:ints":
        torch.save({"w": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        ckpt.load_weights_file(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(reason, message), message
    assert not [w for w in recwarn if "torch" in str(w.filename)]  # torch's warnings about the file are dropped


def test_weights_file_without_read_permission(tmp_path):
    path = tmp_path / "step_5"
    torch.save({"w": torch.ones(2)}, path)
    os.chmod(path, 0)
    try:
        try:
            path.read_bytes()
            pytest.skip("running as a user that reads any file (root): the folder and corrupt-file cases cover it")
        except PermissionError:
            pass
        with pytest.raises(ValueError, match=rf"^{path}: not a readable torch checkpoint \(PermissionError"):
            ckpt.load_weights_file(str(path))
    finally:
        os.chmod(path, 0o644)


def test_read_only_directory(tmp_path):
    path = tmp_path / "step_1"
    ckpt.atomic_torch_save({"w": torch.ones(2)}, str(path))
    os.chmod(tmp_path, 0o555)
    try:
        try:  # root ignores the mode bits: then this case is covered by the simulated EACCES above
            (tmp_path / "probe").touch()
            (tmp_path / "probe").unlink()
            pytest.skip("running as a user that can write to a read-only folder (root)")
        except PermissionError:
            pass
        with pytest.raises(
            ckpt.CheckpointWriteError, match=rf"^cannot write checkpoint to {tmp_path}: Permission denied$"
        ):
            ckpt.atomic_torch_save({"w": torch.zeros(2)}, str(path))
    finally:
        os.chmod(tmp_path, 0o755)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))


# Fails every train-state write after the first `{ok}` ones with ENOSPC, like a disk filling up.
DISK_FULL_DRIVER = textwrap.dedent(
    """
    import errno, sys
    sys.path.insert(0, {repo!r})
    import pretrain
    from utils import checkpointing as ckpt

    original, writes = ckpt.atomic_torch_save, [0]

    def filling_disk(obj, path):
        if "train_state_step_" in path:
            writes[0] += 1
            if writes[0] > {ok}:
                def fail(f):
                    f.write(b"partial")
                    raise OSError(errno.ENOSPC, "No space left on device")
                return ckpt.atomic_write(path, fail)
        return original(obj, path)

    ckpt.atomic_torch_save = filling_disk
    pretrain.main()
    """
)


def test_full_disk_from_command_line_exits_4_and_keeps_previous_state(data, tmp_path):
    run_dir = tmp_path / "ckpt"
    result = run_driver(
        tmp_path,
        DISK_FULL_DRIVER.format(repo=str(REPO), ok=2),
        f"data_path={data}",
        f"checkpoint_path={run_dir}",
        "checkpoint_interval_steps=1",
    )
    assert result.returncode == 4, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line == f"error: cannot write checkpoint to {run_dir}: No space left on device"
    # The second save (step 2) is the newest complete state; it loads, and no temporary file remains.
    latest = ckpt.find_latest_train_state(str(run_dir))
    assert latest is not None and latest.endswith("train_state_step_000002.pt")
    assert train_state.read_train_state(latest)["step"] == 2
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]


def limit_file_size(max_bytes: int):
    def set_limit():
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as a full disk fails with ENOSPC:
        # the real kernel error reaches the real torch.save, which hides it in a RuntimeError.
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return set_limit


def test_kernel_write_failure_in_torch_save_exits_4_and_keeps_previous_state(data, tmp_path):
    run_dir = tmp_path / "ckpt"
    first = subprocess.run(
        [sys.executable, str(REPO / "pretrain.py"), *CLI_BASE, f"data_path={data}", f"checkpoint_path={run_dir}",
         "checkpoint_interval_steps=1", "stop_at_step=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    state = run_dir / "train_state_step_000001.pt"
    before = state.read_bytes()
    assert len(before) > 200_000  # the limit below lets small files through but not a train state
    resumed = subprocess.run(
        [sys.executable, str(REPO / "pretrain.py"), *CLI_BASE, f"data_path={data}", f"checkpoint_path={run_dir}",
         "checkpoint_interval_steps=1", "resume=auto"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=limit_file_size(200_000),
    )  # fmt: skip
    assert resumed.returncode == 4, resumed.stderr[-3000:]
    (line,) = error_lines(resumed.stderr)
    assert line == f"error: cannot write checkpoint to {run_dir}: File too large"
    assert state.read_bytes() == before and ckpt.find_latest_train_state(str(run_dir)) == str(state)
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]


# ------------------------------------------------------------------ temporary files


def test_temporary_files_are_never_taken_for_checkpoints(data, tmp_path):
    run_dir = tmp_path / "ckpt"
    pretrain.run(tiny_config(data, run_dir, "stop_at_step=1"))
    # What a writer killed mid-write leaves: a truncated temporary of a newer step.
    stale = run_dir / ".train_state_step_000002.pt.k1ll3d.tmp"
    stale.write_bytes(b"PK\x03\x04 truncated")
    latest = ckpt.find_latest_train_state(str(run_dir))
    assert latest is not None and latest.endswith("train_state_step_000001.pt")
    # Resuming picks the complete state, and its next save removes the stale temporary.
    state = pretrain.run(tiny_config(data, run_dir, "resume=auto", "stop_at_step=2"))
    assert state.step == 2
    assert not stale.exists()
    assert ckpt.find_latest_train_state(str(run_dir)).endswith("train_state_step_000002.pt")


def test_remove_stale_temp_files_touches_only_train_state_temporaries(tmp_path):
    names = [
        ".train_state_step_000007.pt.abc123.tmp",  # stale: removed
        "train_state_step_000006.pt",  # a checkpoint
        ".step_6.xyz.tmp",  # a weights temporary (another writer's business)
        "notes.tmp",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert ckpt.remove_stale_temp_files(str(tmp_path)) == [names[0]]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


# ------------------------------------------------------------------ every rank agrees


AGREE_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    from utils.distributed import all_reduce_sum_flat_and_check_finite_

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {{}}
    for case in ("finite", "nan_grad_rank0", "inf_local_rank1"):
        grads = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 10.0 * (rank + 1))]
        local = [torch.tensor(0.5), torch.zeros(2, 4)]
        if case == "nan_grad_rank0" and rank == 0:
            grads[1][1, 0] = float("nan")
        if case == "inf_local_rank1" and rank == 1:
            local[1][0, 3] = float("inf")
        ok = all_reduce_sum_flat_and_check_finite_(grads, local)
        results[case] = {{"ok": bool(ok), "g0": grads[0].tolist()}}
    print(json.dumps({{"rank": rank, **results}}), flush=True)
    dist.destroy_process_group()
    """
)


@pytest.mark.multiprocess
def test_all_ranks_reach_the_same_skip_decision(tmp_path):
    driver = tmp_path / "agree.py"
    driver.write_text(AGREE_DRIVER.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["WORLD_SIZE"] = "2"
    procs = [
        subprocess.Popen(
            [sys.executable, str(driver)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outputs:
        assert out["finite"] == {"ok": True, "g0": [3.0, 3.0, 3.0]}  # summed over ranks: 1 + 2
        assert out["nan_grad_rank0"]["ok"] is False  # rank 1's own values were all finite
        assert out["inf_local_rank1"]["ok"] is False  # rank 0's own values were all finite
