"""The metric loggers: JSON lines (each step once after a resume, wall time), TensorBoard (the same records)."""

import json
import subprocess
import sys
import time

import pytest

import pretrain
from tests.helpers import REPO, TINY_ARCH, make_tiny_dataset, metric_records, tiny_config
from utils.logging_utils import WALL_TIME_KEY, JsonlLogger, TensorBoardLogger


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_lines_past_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(str(path))
    for step in range(6):
        logger.log({"train/loss": float(step)}, step=step)
    logger.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "train/lo')  # the kill cut the last line short

    resumed = JsonlLogger(str(path), resume_step=3)  # the newest train state was step 3
    for step in (4, 5):
        resumed.log({"train/loss": 10.0 + step}, step=step)
    resumed.close()

    assert _steps(path) == [0, 1, 2, 3, 4, 5]
    assert json.loads(path.read_text().splitlines()[4])["train/loss"] == 14.0  # the replayed value


def test_fresh_logger_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 9, "x": 1.0}\n')
    logger = JsonlLogger(str(path))
    logger.log({"x": 2.0}, step=10)
    logger.close()
    assert _steps(path) == [9, 10]


def test_wall_time_grows_and_continues_after_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, WALL_TIME_KEY: 100.0 * s, "x": 1.0} for s in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    resumed = JsonlLogger(str(path), resume_step=2)  # the records of steps 3 and 4 go, and their times
    resumed.log({"x": 2.0}, step=3)
    time.sleep(0.05)
    resumed.log({"x": 2.0}, step=4)
    resumed.close()
    times = [json.loads(line)[WALL_TIME_KEY] for line in path.read_text().splitlines()]
    assert times[:3] == [0.0, 100.0, 200.0]
    assert 200.0 <= times[3] < 210.0 and times[4] - times[3] >= 0.049  # rounded to milliseconds

    old = tmp_path / "old.jsonl"  # written before records carried a wall time: it starts from 0
    old.write_text('{"step": 1, "x": 1.0}\n')
    logger = JsonlLogger(str(old), resume_step=1)
    logger.log({"x": 2.0}, step=2)
    logger.close()
    assert 0.0 <= json.loads(old.read_text().splitlines()[1])[WALL_TIME_KEY] < 10.0


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_jsonl_records_of_a_run(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    pretrain.run(tiny_config(data, run_dir, "use_tensorboard=true"))
    records = metric_records(run_dir / "metrics.jsonl")
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], float(value)))
    scalars = tensorboard_scalars(run_dir)
    assert set(scalars) == set(expected) and "all/exact_accuracy" in scalars and "num_params" in scalars
    for key, points in expected.items():  # TensorBoard keeps float32
        assert [s for s, _ in scalars[key]] == [s for s, _ in points], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in points], rel=1e-6, nan_ok=True), key


def test_tensorboard_hides_steps_a_resumed_run_replays(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    for step in range(6):
        logger.log({"train/loss": float(step)}, step=step)
    logger.close()
    time.sleep(1.1)  # event file names carry the second they were opened in
    resumed = TensorBoardLogger(str(tmp_path), resume_step=3)
    for step in (4, 5):
        resumed.log({"train/loss": 10.0 + step}, step=step)
    resumed.close()
    assert tensorboard_scalars(tmp_path)["train/loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]


def test_tensorboard_missing_is_a_one_line_error_before_training(tmp_path):
    """`use_tensorboard=true` without the package: the real command line stops before the first step."""
    data = make_tiny_dataset(tmp_path / "data")
    overrides = [*TINY_ARCH, f"data_path={data}", f"checkpoint_path={tmp_path / 'run'}", "global_batch_size=4"]
    overrides += ["epochs=2", "eval_interval=1", "use_wandb=false", "device=cpu", "use_tensorboard=true"]
    script = "import sys; sys.modules['tensorboard'] = None; import pretrain; pretrain.main()"  # not installed
    done = subprocess.run(
        [sys.executable, "-c", script, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: config key 'use_tensorboard': the tensorboard package is not installed "
        '(pip install tensorboard, or the extra: pip install "hrm[tensorboard]")'
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
