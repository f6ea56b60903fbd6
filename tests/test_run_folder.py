"""The run folder through the real command line: one run owns it, one process writes it, and its work survives.

- `overwrite=true` starts over in a folder holding another run: that run's files go (files no run writes stay),
  a new run id is written, each step is logged once.
- Two runs started together in one folder: one trains, the other stops with one line before writing anything;
  a lock held by another process is named with its pid; a lock file left by a dead process does not block.
- `resume=auto` with a damaged newest train state falls back to the previous good one (a warning line) and
  ends bit-identical to an uninterrupted run.
- A failure during an evaluation leaves the train state saved just before it; resuming runs that evaluation
  first and ends bit-identical to an uninterrupted run.
(The refusals, status 2, are rows of tests/test_bad_inputs.py.)
"""

import fcntl
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import REPO, make_tiny_dataset, metric_records, tiny_overrides
from training.run_folder import LOCK_FILE, RUN_ID_FILE
from training.train_state import read_train_state

TOTAL_STEPS = 6  # tiny_overrides: epochs=4, eval_interval=2, 6 groups, global batch 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def pretrain(cwd, data, run_dir, *extra, script=None, wait=True):
    cmd = [sys.executable, str(script or REPO / "pretrain.py"), *tiny_overrides(data, run_dir, *extra)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def last_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_same_weights(path, expected_path):
    got, want = (torch.load(p, map_location="cpu", weights_only=True) for p in (path, expected_path))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def train_steps(metrics_path):
    return [r["step"] for r in metric_records(metrics_path) if "train/lm_loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    data = make_tiny_dataset(root / "data")
    # Through the same command line (and thread count) as the runs compared with it: CPU float sums depend on
    # the number of threads, so an in-process reference would differ in the last bits.
    result = pretrain(root, data, root / "reference")
    assert result.returncode == 0, result.stderr[-3000:]
    return data, root / "reference"


def test_overwrite_starts_over_and_keeps_other_files(reference, tmp_path):
    data, ref = reference
    run_dir = tmp_path / "run"
    assert pretrain(tmp_path, data, run_dir, "stop_at_step=2").returncode == 0
    old_id = (run_dir / RUN_ID_FILE).read_text().strip()
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "train_state_step_000999.pt").write_bytes(b"an old run's state")

    result = pretrain(tmp_path, data, run_dir, "overwrite=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "overwrite=true: removed" in result.stdout
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert not (run_dir / "train_state_step_000999.pt").exists()
    new_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert new_id != old_id and read_train_state(str(run_dir / "train_state_step_000006.pt"))["run_id"] == new_id
    assert train_steps(run_dir / "metrics.jsonl") == list(range(1, TOTAL_STEPS + 1))
    assert_same_weights(run_dir / f"step_{TOTAL_STEPS}", ref / f"step_{TOTAL_STEPS}")


def test_two_runs_started_together_one_trains(reference, tmp_path):
    data, _ = reference
    run_dir = tmp_path / "run"
    procs = [pretrain(tmp_path, data, run_dir, "epochs=40", wait=False) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] in (2, 6), [r[1][-2000:] for r in results]
    loser = results[[p.returncode for p in procs].index(codes[1])][1]
    assert "Traceback" not in loser
    if codes[1] == 6:  # met the lock of the running one
        assert last_line(loser).startswith(f"error: checkpoint_path={run_dir} is in use by another run (pid ")
    else:  # started after the other had ended: its files are another run's
        assert "holds another run" in last_line(loser)
    assert train_steps(run_dir / "metrics.jsonl") == list(range(1, 61))  # each step once: 40 epochs x 6 groups / 4


def test_lock_held_elsewhere_is_named_and_nothing_is_written(reference, tmp_path):
    data, _ = reference
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / LOCK_FILE, "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"pid {os.getpid()} on testhost\n")
        lock.flush()
        result = pretrain(tmp_path, data, run_dir)
    assert result.returncode == 6, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr) == (
        f"error: checkpoint_path={run_dir} is in use by another run (pid {os.getpid()} on testhost); wait for it to "
        "end, or choose another checkpoint_path"
    )
    assert sorted(os.listdir(run_dir)) == [LOCK_FILE]
    # The same file, unlocked (its holder gone), blocks nothing.
    result = pretrain(tmp_path, data, run_dir, "stop_at_step=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "train_state_step_000001.pt").is_file()
    assert (run_dir / LOCK_FILE).read_text().startswith("pid ")


def test_damaged_newest_state_falls_back_to_the_previous(reference, tmp_path):
    data, ref = reference
    run_dir = tmp_path / "run"
    assert pretrain(tmp_path, data, run_dir, "stop_at_step=2").returncode == 0
    good = run_dir / "train_state_step_000002.pt"
    payload = torch.load(good, weights_only=False)
    del payload["ranks"]
    torch.save(payload, run_dir / "train_state_step_000004.pt")  # as if written by a version without the field

    result = pretrain(tmp_path, data, run_dir, "resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning: "))
    assert "train_state_step_000004.pt: damaged train state: field 'ranks' missing" in warning
    assert warning.endswith(f"resuming from the previous train state {good}")
    assert f"resumed from {good} at step 2" in result.stderr
    assert_same_weights(run_dir / f"step_{TOTAL_STEPS}", ref / f"step_{TOTAL_STEPS}")


FAILING_EVAL = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import pretrain

    def evaluate(*args, **kwargs):
        raise ValueError("evaluator broke")

    pretrain.evaluate = evaluate  # the name the train loop calls
    pretrain.main()
    """
)


def test_failure_at_evaluation_keeps_the_training_and_resume_evaluates_first(reference, tmp_path):
    data, ref = reference
    script = tmp_path / "failing_eval.py"
    script.write_text(FAILING_EVAL.format(repo=str(REPO)))
    run_dir = tmp_path / "run"
    result = pretrain(tmp_path, data, run_dir, script=script)
    assert result.returncode == 2 and last_line(result.stderr) == "error: evaluator broke", result.stderr[-3000:]
    saved = read_train_state(str(run_dir / "train_state_step_000003.pt"))  # the first evaluation's step
    assert saved["pending_eval"] == {"iter_id": 0, "early_stop": False}
    assert (saved["data_iters"], saved["data_batches"]) == (1, 0)

    result = pretrain(tmp_path, data, run_dir, "resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "at step 3" in result.stderr
    assert_same_weights(run_dir / f"step_{TOTAL_STEPS}", ref / f"step_{TOTAL_STEPS}")
    evals = [r["step"] for r in metric_records(run_dir / "metrics.jsonl") if "all/exact_accuracy" in r]
    assert evals == [3, 6]  # the evaluation that failed ran on resume, once
    want = {r["step"]: r for r in metric_records(ref / "metrics.jsonl") if "all/exact_accuracy" in r}
    got = {r["step"]: r for r in metric_records(run_dir / "metrics.jsonl") if "all/exact_accuracy" in r}
    assert got == want
    assert read_train_state(str(run_dir / "train_state_step_000006.pt"))["pending_eval"] is None
    json.dumps(saved["dataset"])  # the dataset record is plain data
