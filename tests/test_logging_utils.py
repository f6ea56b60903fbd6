"""JSON-lines metrics: a resumed run's file holds each step once."""

import json

from utils.logging_utils import JsonlLogger


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
