"""Metric loggers for the launchers (rank 0 only).

Design choices:
- One small interface, `log(metrics, step)` / `close()`, with four implementations: Weights &
  Biases, a JSON-lines file in the run folder, TensorBoard events in the run folder (optional, the
  `tensorboard` package), and a null logger; `MultiLogger` fans out. Tests and `use_wandb=false`
  never import or touch W&B.
- W&B never prompts: without credentials (env WANDB_API_KEY or a netrc entry for the W&B host)
  the run is logged offline with a one-line notice, and can be uploaded later with `wandb sync`.
  An explicit WANDB_MODE in the environment is respected as is.
- Every record carries its step, so the JSON lines can be plotted without W&B (tools/plot_metrics.py).
  JSON lines also carry `wall_time_s`, seconds since the run began logging, continued across resumes
  from the last record kept, so curves can be drawn against time (W&B and TensorBoard time their
  records themselves).
- A resumed run replays the steps after its train state; the JSON lines and the TensorBoard events
  logged past it before the stop are dropped (hidden, for TensorBoard), so each step appears once.
"""

import importlib.util
import json
import math
import netrc
import os
import sys
import time
from typing import Any, Protocol

WALL_TIME_KEY = "wall_time_s"


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _to_json_number(value: Any) -> Any:
    value = float(value)
    # JSON has no NaN/Infinity; write them as strings so the file stays parseable.
    return value if math.isfinite(value) else str(value)


class JsonlLogger:
    """Appends one `{"step": N, key: value, ...}` line per call to `path` (appending keeps a resumed run's history).

    A run resumed at step N (`resume_step=N`) replays the steps after N, so lines logged past N before the
    stop (a kill lands after the last saved train state) are dropped first: each step appears once.
    """

    def __init__(self, path: str, resume_step: int | None = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._start = time.monotonic()
        if resume_step is not None and os.path.exists(path):
            self._start -= _drop_lines_after_step(path, resume_step)  # wall time goes on from the last kept record
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, metrics: dict[str, float], step: int) -> None:
        elapsed = round(time.monotonic() - self._start, 3)
        record = {"step": int(step), WALL_TIME_KEY: elapsed, **{k: _to_json_number(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _drop_lines_after_step(path: str, step: int) -> float:
    """Rewrite `path` (atomically) without the records of steps > `step`; a torn last line is dropped too.
    Returns the largest wall time of the records kept (0 for files written before it was logged)."""
    kept, wall_time = [], 0.0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                record_step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
                wall_time = max(wall_time, float(record.get(WALL_TIME_KEY, 0.0)))
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return wall_time


def wandb_credentials_found() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger:
    def __init__(self, project: str, name: str, config: dict[str, Any]):
        import wandb  # only imported when W&B logging is on

        mode = os.environ.get("WANDB_MODE")
        if mode is None and not wandb_credentials_found():
            mode = "offline"
            print("W&B: no credentials found, logging offline (upload later with `wandb sync`)", file=sys.stderr)
        self._wandb = wandb
        self._run = wandb.init(project=project, name=name, config=config, mode=mode)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


def check_tensorboard_installed() -> None:
    """`use_tensorboard` needs the `tensorboard` package (torch.utils.tensorboard writes through it)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "config key 'use_tensorboard': the tensorboard package is not installed "
            '(pip install tensorboard, or the extra: pip install "hrm[tensorboard]")'
        )


class TensorBoardLogger:
    """The records of metrics.jsonl as TensorBoard scalars, event files in `log_dir` (the run folder)."""

    def __init__(self, log_dir: str, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # only imported when TensorBoard logging is on

        # Resumed at step N: events of steps > N (logged before the stop, replayed now) are purged.
        self._writer = SummaryWriter(log_dir, purge_step=None if resume_step is None else resume_step + 1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class MultiLogger:
    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def create_logger(
    *,
    is_main: bool,
    use_wandb: bool,
    project: str,
    run_name: str,
    config: dict[str, Any],
    jsonl_path: str | None,
    resume_step: int | None = None,
    tensorboard_dir: str | None = None,
) -> MetricLogger:
    """The logger for this rank: W&B, JSON lines and/or TensorBoard on rank 0, a null logger elsewhere.

    Every rank checks that TensorBoard can be imported, so all of them stop alike when it cannot."""
    if tensorboard_dir is not None:
        check_tensorboard_installed()
    if not is_main:
        return NullLogger()
    loggers: list[MetricLogger] = []
    if jsonl_path is not None:
        loggers.append(JsonlLogger(jsonl_path, resume_step=resume_step))
    if tensorboard_dir is not None:
        loggers.append(TensorBoardLogger(tensorboard_dir, resume_step=resume_step))
    if use_wandb:
        loggers.append(WandbLogger(project, run_name, config))
    return MultiLogger(loggers)
