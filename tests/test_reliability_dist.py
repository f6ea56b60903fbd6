"""A rank that dies or hangs mid-run: the surviving rank exits (status 5) with one clear line, not a hang.

Two gloo ranks are launched by hand (the environment torchrun would set), so the bound tested is our own
process-group timeout, not torchrun's teardown of the other workers (documented in README "Reliability").
Rank 1 either exits abruptly before its third step (gloo sees the connection drop) or hangs there (rank 0
waits in the gradient all-reduce until `dist_timeout_s`).
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO, TINY_ARCH, free_port, make_tiny_dataset

TIMEOUT_S = 3

DRIVER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import pretrain

    original = pretrain.launch_train_step

    def launch_train_step(config, state, batch, global_batch_size, info):
        if info.rank == 1 and state.step == 2:  # about to run step 3
            if {mode!r} == "die":
                os._exit(9)
            time.sleep(600)
        return original(config, state, batch, global_batch_size, info)

    pretrain.launch_train_step = launch_train_step  # the name the train loop calls
    pretrain.main()
    """
)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_surviving_rank_exits_with_a_clear_message(tmp_path, mode):
    data = make_tiny_dataset(tmp_path / "data", num_groups=8)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), mode=mode))
    overrides = [
        *TINY_ARCH,
        f"data_path={data}",
        f"checkpoint_path={tmp_path / 'ckpt'}",
        "project_name=test",
        "run_name=dist",
        "global_batch_size=4",
        "epochs=2",
        "eval_interval=1",
        "use_wandb=false",
        "device=cpu",
        f"dist_timeout_s={TIMEOUT_S}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(driver), *overrides],
            cwd=tmp_path,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        # The bound: the timeout plus start-up; a hang would hit this limit and fail the test.
        _, stderr = procs[0].communicate(timeout=90)
    finally:
        if procs[1].poll() is None:  # the hung rank (a real job's scheduler or torchrun would kill it)
            procs[1].send_signal(signal.SIGKILL)
        procs[1].communicate(timeout=30)
    if mode == "die":
        assert procs[1].returncode == 9
    assert procs[0].returncode == 5, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert errors[0].startswith("error: rank 0 of 2: a collective failed (")
    assert errors[0].endswith(
        f"another rank died or did not answer within the process-group timeout (dist_timeout_s={TIMEOUT_S})"
    )
    if mode == "hang":
        assert "Timed out" in errors[0]
