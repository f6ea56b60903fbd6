"""The run folder (`checkpoint_path`): one run owns it, and one process at a time writes it.

Design choices:
- A run has an id, a random hex string made when it starts, written to `run_id.txt` in its folder and
  into every train state; a resumed run keeps the id of its train state. A train state whose id is not
  the folder's (copied from another run's folder) is refused on resume.
- A fresh start (no `resume`) in a folder that holds a run's files (`run_id.txt`, train states, `step_N`
  weights, `metrics.jsonl`, `all_config.yaml`, `best`) is refused with one line naming the folder and the
  ways out: `resume=auto` to continue it, `overwrite=true` to start over (the previous run's files are
  deleted first; files that no run writes are left alone), or another `checkpoint_path`. `resume=auto`
  without a train state starts the run afresh in its folder, as it always did (a relaunch of a run that
  never saved one); its `metrics.jsonl` then starts over with it.
- The checks happen before anything is written. What they find is decided on rank 0 and sent to every
  rank, so all ranks leave with the same line or go on together.
- Rank 0 holds an exclusive lock on `checkpoint_path/.lock` for the whole run (POSIX `lockf`, which network
  file systems honour too; the kernel drops it when the process ends, however it ends, so a lock file left
  by a dead run never blocks). A second run in the same folder stops before writing anything: one line
  naming the folder and the holder's pid and host (which the holder writes into the lock file), exit
  status 6. The lock file itself stays in the folder.
"""

import fcntl
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from utils import checkpointing as ckpt
from utils.distributed import DistInfo, broadcast_object

RUN_ID_FILE = "run_id.txt"
LOCK_FILE = ".lock"

# Files and folders a run writes into its folder (the copies of the model's source files aside).
RUN_FILE_PATTERN = re.compile(
    r"^(run_id\.txt|all_config\.yaml|metrics\.jsonl|best|best\.json|train_state_step_\d+\.pt|step_\d+"
    r"|step_\d+_all_preds\.\d+|events\.out\.tfevents\..*)$"
)


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder's lock."""

    exit_code = 6


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_run_id(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, RUN_ID_FILE), encoding="utf-8") as f:
            return f.read().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def run_files(folder: str) -> list[str]:
    """The names in `folder` that a run wrote, sorted: train states, then weights, then the rest."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if RUN_FILE_PATTERN.match(n)]
    return sorted(names, key=lambda n: (not n.startswith("train_state_"), not n.startswith("step_"), n))


def _listed(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------ lock


def _acquire(folder: str) -> int:
    """Lock `folder` for this process (creating it), or raise RunFolderInUse / CheckpointWriteError."""
    path = os.path.join(folder, LOCK_FILE)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ckpt._write_error(folder, e) from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        with open(path, encoding="utf-8", errors="replace") as f:
            holder = f.read().strip() or "pid unknown"
        os.close(fd)
        raise RunFolderInUse(
            f"checkpoint_path={folder} is in use by another run ({holder}); wait for it to end, or choose another "
            "checkpoint_path"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def same_outcome_on_every_rank(outcome: Any, info: DistInfo) -> Any:
    """Rank 0's outcome (a value or an exception) on every rank: returned, or raised everywhere."""
    outcome = broadcast_object(outcome if info.is_main else None)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


@contextmanager
def locked(folder: str, info: DistInfo) -> Iterator[None]:
    """Collective: rank 0 holds the folder's lock within the block; every rank leaves with its error if taken."""
    fd, outcome = None, None
    if info.is_main:
        try:
            fd = _acquire(folder)
        except (RunFolderInUse, ckpt.CheckpointWriteError) as e:
            outcome = e
    try:
        same_outcome_on_every_rank(outcome, info)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


# ------------------------------------------------------------------------------------------ ownership


def check_owner(config: Any, resume_path: str | None, state_run_id: str | None) -> tuple[str, bool]:
    """(run id, whether the previous run's files are to be removed) for a run starting in its `checkpoint_path`;
    a ValueError line when the folder holds another run (module docstring). Reads only."""
    folder = config.checkpoint_path
    folder_id, held = read_run_id(folder), run_files(folder)
    ways = "continue it with resume=auto, start over with overwrite=true (deletes its files), or choose another checkpoint_path"
    if config.overwrite:
        if config.resume == "auto":
            raise ValueError(
                "config key 'overwrite': overwrite=true starts the run over, resume=auto continues it: give one"
            )
        if resume_path is not None and os.path.realpath(os.path.dirname(resume_path)) == os.path.realpath(folder):
            raise ValueError(
                f"config key 'overwrite': overwrite=true would delete {resume_path}, the train state resume= names"
            )
        return state_run_id or new_run_id(), bool(held)
    if resume_path is not None:
        if folder_id is not None and state_run_id is not None and folder_id != state_run_id:
            raise ValueError(
                f"config key 'resume': {resume_path} is a train state of run {state_run_id}, checkpoint_path={folder} "
                f"holds run {folder_id}; resume a train state of that run, or choose another checkpoint_path"
            )
        same_folder = os.path.realpath(os.path.dirname(resume_path)) == os.path.realpath(folder)
        if held and not same_folder and (folder_id is None or folder_id != state_run_id):
            raise ValueError(
                f"checkpoint_path={folder} holds another run ({_listed(held)}); resume its own train state, start over "
                "there with overwrite=true (deletes its files), or choose another checkpoint_path"
            )
        return state_run_id or folder_id or new_run_id(), False
    if config.resume == "auto":  # no train state: the run starts afresh in its folder
        return folder_id or new_run_id(), False
    if held:
        raise ValueError(f"checkpoint_path={folder} holds another run ({_listed(held)}): {ways}")
    return new_run_id(), False


def claim(folder: str, run_id: str, clear: bool) -> list[str]:
    """Rank 0, after every check passed: remove the previous run's files (`clear`), write `run_id.txt`; returns
    the names removed."""
    removed = run_files(folder) if clear else []
    try:
        for name in removed:
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    except OSError as e:
        raise ckpt._write_error(folder, e) from e
    ckpt.atomic_write(os.path.join(folder, RUN_ID_FILE), lambda f: f.write(f"{run_id}\n"), mode="w")
    return removed
