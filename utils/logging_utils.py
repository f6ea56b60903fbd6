"""Metric loggers for the launchers (rank 0 only).

Design choices:
- One small interface, `log(metrics, step)` / `close()`, with three implementations: Weights &
  Biases, a JSON-lines file in the run folder, and a null logger; `MultiLogger` fans out. Tests
  and `use_wandb=false` never import or touch W&B.
- W&B never prompts: without credentials (env WANDB_API_KEY or a netrc entry for the W&B host)
  the run is logged offline with a one-line notice, and can be uploaded later with `wandb sync`.
  An explicit WANDB_MODE in the environment is respected as is.
- Every record carries its step, so the JSON lines can be plotted without W&B.
"""

import json
import math
import netrc
import os
import sys
from typing import Any, Protocol


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
        if resume_step is not None and os.path.exists(path):
            _drop_lines_after_step(path, resume_step)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": int(step), **{k: _to_json_number(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _drop_lines_after_step(path: str, step: int) -> None:
    """Rewrite `path` (atomically) without the records of steps > `step`; a torn last line is dropped too."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
) -> MetricLogger:
    """The logger for this rank: W&B and/or JSON lines on rank 0, a null logger elsewhere."""
    if not is_main:
        return NullLogger()
    loggers: list[MetricLogger] = []
    if jsonl_path is not None:
        loggers.append(JsonlLogger(jsonl_path, resume_step=resume_step))
    if use_wandb:
        loggers.append(WandbLogger(project, run_name, config))
    return MultiLogger(loggers)
