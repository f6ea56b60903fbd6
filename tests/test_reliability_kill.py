"""SIGKILL at random moments: a loadable train state always remains, and `resume=auto` ends bit-identical.

A tiny CPU run (48 steps, a train state after every step, an evaluation and a weights file every 12)
is killed 5 times at random moments (mid-step, mid-write, mid-evaluation, ...). After each kill the
newest complete train state must load, and temporaries of an interrupted write must never be taken for
one. Restarting with `resume=auto` after every kill must reach the same final weights and optimizer
state, bit for bit, as one uninterrupted run of the same command.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import REPO, TINY_ARCH, make_tiny_dataset
from training.train_state import read_train_state
from utils.checkpointing import TRAIN_STATE_TEMP_PATTERN, find_latest_train_state

TOTAL_STEPS = 48  # epochs=32 x 6 groups / global batch 4
KILLS = 5
STEPS_PER_LIFE = TOTAL_STEPS // (KILLS + 2)  # at most this many steps between a restart and its kill (about)


def command(data, run_dir, *extra):
    overrides = [
        *TINY_ARCH,
        f"data_path={data}",
        f"checkpoint_path={run_dir}",
        "project_name=test",
        "run_name=kill",
        "global_batch_size=4",
        "epochs=32",
        "eval_interval=8",
        "lr=1e-3",
        "lr_warmup_steps=4",
        "use_wandb=false",
        "device=cpu",
        "checkpoint_interval_steps=1",
        *extra,
    ]
    return [sys.executable, str(REPO / "pretrain.py"), *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def latest_step(run_dir) -> int:
    path = find_latest_train_state(str(run_dir))
    return int(os.path.basename(path)[len("train_state_step_") : -len(".pt")]) if path else 0


def start(cmd, cwd):
    # Own session: the kill takes the DataLoader worker with it, as a cluster scheduler would.
    return subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    reference = subprocess.run(
        command(data, tmp_path / "reference"), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "killed"
    rng = random.Random(6)
    kills, saved_step, temporaries_seen = 0, 0, 0
    for _attempt in range(3 * KILLS):
        if kills == KILLS:
            break
        proc = start(command(data, run_dir, "resume=auto"), tmp_path)
        # Wait for progress past the state we resumed from, then kill after a random delay.
        deadline = time.monotonic() + 120
        while latest_step(run_dir) <= saved_step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        # A random delay, cut short once this life has taken its share of the steps: on a fast machine 0.3 s is
        # many steps, and a run that finishes before the last kill tests less than it says.
        kill_at = time.monotonic() + rng.uniform(0.0, 0.3)
        while time.monotonic() < kill_at and latest_step(run_dir) < saved_step + STEPS_PER_LIFE and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is not None:
            break  # the run finished before the kill; checked below
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1

        # A loadable, complete train state remains; temporaries are never taken for one.
        names = os.listdir(run_dir)
        temporaries_seen += sum(bool(TRAIN_STATE_TEMP_PATTERN.match(n)) for n in names)
        path = find_latest_train_state(str(run_dir))
        assert path is not None, names
        payload = read_train_state(path)
        assert payload["step"] >= saved_step and payload["step"] == latest_step(run_dir)
        assert payload["ranks"][0]["rng"]["torch_cpu"].numel() > 0
        saved_step = payload["step"]
    assert kills == KILLS, f"the run finished after {kills} kills; lengthen it"

    final = subprocess.run(
        command(data, run_dir, "resume=auto"), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"{kills} kills, last at step {saved_step}; {temporaries_seen} stale temporaries seen after kills")

    got = torch.load(run_dir / f"step_{TOTAL_STEPS}", weights_only=True)
    want = torch.load(tmp_path / "reference" / f"step_{TOTAL_STEPS}", weights_only=True)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    opt = read_train_state(find_latest_train_state(str(run_dir)))["optimizers"]
    opt_want = read_train_state(find_latest_train_state(str(tmp_path / "reference")))["optimizers"]
    for group, group_want in zip(opt, opt_want, strict=True):
        for idx, st in group_want["state"].items():
            for name, value in st.items():
                assert torch.equal(torch.as_tensor(group["state"][idx][name]), torch.as_tensor(value)), (idx, name)
    # The last save removed whatever temporaries the kills left.
    assert not [n for n in os.listdir(run_dir) if TRAIN_STATE_TEMP_PATTERN.match(n)]

    # The metrics log holds each train step once, as the uninterrupted run's does (replayed steps replace
    # the lines logged after the last saved state).
    def train_steps(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return [r["step"] for r in map(json.loads, f) if "train/lm_loss" in r]

    assert train_steps(run_dir) == train_steps(tmp_path / "reference")
