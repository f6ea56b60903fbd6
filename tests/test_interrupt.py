"""SIGINT / SIGTERM through the real command line: the run finishes its step, saves a train state, prints one line,
exits 130 / 143 without a traceback (its DataLoader worker, which gets the signal too, prints none either), and
`resume=auto` from that state ends bit-identical to an uninterrupted run: one process, and two gloo ranks launched
by hand whose whole process group gets SIGTERM (as a scheduler or torchrun's agent sends it).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import REPO, TINY_ARCH, free_port, make_tiny_dataset, metric_records
from training.train_state import read_train_state
from utils.checkpointing import find_latest_train_state

TOTAL_STEPS = 96  # epochs=64 x 6 groups / global batch 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def command(data, run_dir, *extra):
    overrides = [
        *TINY_ARCH,
        f"data_path={data}",
        f"checkpoint_path={run_dir}",
        "project_name=test",
        "run_name=interrupt",
        "global_batch_size=4",
        "epochs=64",
        "eval_interval=16",
        "lr=1e-3",
        "lr_warmup_steps=4",
        "use_wandb=false",
        "device=cpu",
        *extra,
    ]
    return [sys.executable, str(REPO / "pretrain.py"), *overrides]


def start(cmd, cwd, env=ENV, group=None):
    """In a session of its own (or the process group `group`, 0: a new one), so a signal to the group reaches the
    loader workers too."""
    kwargs = {"process_group": group} if group is not None else {"start_new_session": True}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_steps(run_dir, steps, proc, timeout=180):
    """Until metrics.jsonl holds `steps` train records (the run is mid-training)."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if path.is_file() and sum('"train/lm_loss"' in line for line in path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not reach its steps")


def assert_same_final_state(run_dir, expected_dir):
    got, want = (read_train_state(find_latest_train_state(str(d))) for d in (run_dir, expected_dir))
    assert got["step"] == want["step"] == TOTAL_STEPS
    for key in want["model"]:
        assert torch.equal(got["model"][key], want["model"][key]), key
    for group, group_want in zip(got["optimizers"], want["optimizers"]):
        for idx, st in group_want["state"].items():
            for name, value in st.items():
                assert torch.equal(torch.as_tensor(group["state"][idx][name]), torch.as_tensor(value)), name
    train = [r for r in metric_records(run_dir / "metrics.jsonl") if "train/lm_loss" in r]
    train_want = [r for r in metric_records(expected_dir / "metrics.jsonl") if "train/lm_loss" in r]
    assert train == train_want  # every step once, with the same values


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("interrupt") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt_ref")
    result = subprocess.run(command(data, root / "ref"), cwd=root, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "ref"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_train_state_and_resume_is_bit_identical(data, reference, tmp_path, signum):
    run_dir = tmp_path / "run"
    proc = start(command(data, run_dir), tmp_path)
    wait_for_steps(run_dir, 3, proc)
    os.killpg(proc.pid, signum)  # the training process and its loader worker, as Ctrl-C in a terminal
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"interrupted: {name}: stopped at step "), lines[-1]
    assert sum(line.startswith("interrupted:") for line in lines) == 1
    step = int(lines[-1].split("stopped at step ")[1].split(",")[0])
    assert 3 <= step < TOTAL_STEPS
    saved = find_latest_train_state(str(run_dir))
    assert saved.endswith(f"train_state_step_{step:06d}.pt") and f"saved in {run_dir}" in lines[-1]

    resumed = subprocess.run(
        command(data, run_dir, "resume=auto"), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved} at step {step}" in resumed.stderr
    assert_same_final_state(run_dir, reference)


def test_second_sigint_exits_at_once(data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(command(data, run_dir, "epochs=4000", "eval_interval=4000"), tmp_path)
    wait_for_steps(run_dir, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    # Either the second signal came while the step was still running (exit at once), or after the save.
    assert last.startswith(("interrupted: second SIGINT: exiting without saving", "interrupted: SIGINT: stopped")), last


@pytest.mark.multiprocess
def test_sigterm_to_two_gloo_ranks_saves_once_and_resume_is_bit_identical(data, tmp_path):
    def launch(run_dir, *extra):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
        rank0 = start(command(data, run_dir, *extra), tmp_path, {**env, "RANK": "0", "LOCAL_RANK": "0"}, 0)
        rank1 = start(command(data, run_dir, *extra), tmp_path, {**env, "RANK": "1", "LOCAL_RANK": "1"}, rank0.pid)
        return rank0, rank1

    def finish(procs):
        return [p.communicate(timeout=300)[1] for p in procs]

    reference = launch(tmp_path / "ref")
    errs = finish(reference)
    assert [p.returncode for p in reference] == [0, 0], [e[-2000:] for e in errs]

    run_dir = tmp_path / "run"
    procs = launch(run_dir)
    wait_for_steps(run_dir, 3, procs[0])
    os.killpg(procs[0].pid, signal.SIGTERM)  # both ranks and their loader workers
    errs = finish(procs)
    assert [p.returncode for p in procs] == [143, 143], [e[-3000:] for e in errs]
    for err in errs:
        assert "Traceback" not in err, err[-3000:]
    lines0 = [line for line in errs[0].splitlines() if line.strip()]
    assert lines0[-1].startswith("interrupted: SIGTERM: stopped at step "), lines0[-1]
    assert not any(line.startswith("interrupted:") for line in errs[1].splitlines())  # said once, by rank 0
    step = int(lines0[-1].split("stopped at step ")[1].split(",")[0])
    saved = read_train_state(find_latest_train_state(str(run_dir)))
    assert saved["step"] == step and saved["world_size"] == 2

    resumed = launch(run_dir, "resume=auto")
    errs = finish(resumed)
    assert [p.returncode for p in resumed] == [0, 0], [e[-2000:] for e in errs]
    assert_same_final_state(run_dir, tmp_path / "ref")
