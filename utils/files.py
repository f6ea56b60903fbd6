"""Files written whole or not at all, shared by every command (torch-free, so the dataset builders need no torch).

- `atomic_write(path, write)`: the file is written into a temporary sibling (`.<name>.<random>.tmp`), fsynced,
  renamed over `path`, and the rename made durable by an fsync of the folder: a crash mid-write leaves the
  previous file intact, never a truncated one under the final name. A write that fails (read-only folder, disk
  full, quota) removes its temporary file and raises `CheckpointWriteError`, one line naming the folder and the
  OS reason. torch.save hides the OS error in the context of a RuntimeError of its C++ writer, so the exception's
  cause and context chain is searched for one; a writer RuntimeError without one is a write failure too.
  Anything else (a bug, an object that cannot be pickled) propagates unchanged.
- `writable_folder(directory)`: checked before work that would be lost if its result could not be saved.
- `staged_output(output_dir, entries)`: a whole output folder, for the builders. The caller writes into a fresh
  hidden sibling `.<name>.partial-<host>-<pid>-<random>` (same file system, so renames are cheap and atomic);
  only a normal exit that wrote something renames it to `output_dir`. A previous folder there is renamed aside
  first and deleted after, so a failure leaves it untouched and a success replaces it whole. A folder holding
  anything the tool does not write (`entries`) is refused before any work, so a mistyped output folder never
  deletes unrelated files. Staging folders of a killed build (its pid gone on this host) are removed by the next
  build into the same folder; a previous folder it had renamed aside but not yet replaced is put back first.
"""

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written; the previous file of that name is intact."""

    exit_code = 4


TORCH_WRITER_FAILURE = re.compile(r"PytorchStreamWriter failed|unexpected pos|file write failed")


def _first_line(error: BaseException, sentence: bool = False) -> str:
    """The first line (or its first sentence) of `error`'s message, or its type name when it has none."""
    line = next(iter(str(error).strip().splitlines()), "")
    if sentence:  # torch's reader messages run on with advice after the first sentence
        line = line.split(". ")[0].rstrip(".")
    return line or type(error).__name__


def _write_error(directory: str, error: OSError, what: str = "checkpoint") -> CheckpointWriteError:
    reason = error.strerror or str(error) or type(error).__name__
    failure = CheckpointWriteError(f"cannot write {what} to {directory}: {reason}")
    failure.errno = error.errno  # set after construction: a two-argument OSError prefixes "[Errno N]" to the text
    return failure


def _write_failure(error: BaseException) -> OSError | None:
    """The OS error behind a failed write (torch.save hides it in the context of a RuntimeError), or None."""
    seen, cur = set(), error
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and not isinstance(cur, CheckpointWriteError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    if isinstance(error, RuntimeError) and TORCH_WRITER_FAILURE.search(str(error)):
        return OSError(None, f"write failed ({_first_line(error)})")
    return None


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write `path` via `write(file)` into a temporary sibling, fsync, then rename over `path`.

    Raises `CheckpointWriteError` when the folder or the file cannot be written (nothing is left behind).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise _write_error(directory, e) from e
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        # Make the rename itself durable.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        failure = _write_failure(e) if isinstance(e, Exception) else None  # Ctrl-C stays Ctrl-C
        if failure is not None:
            raise _write_error(directory, failure) from e
        raise


def writable_folder(directory: str, what: str = "checkpoint") -> None:
    """Create `directory` if needed and check that a file can be created in it (a nameless temporary one);
    `CheckpointWriteError` otherwise, naming `what` would be written there, before any work that would be lost."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise _write_error(directory, e, what) from e


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _clean_stale(parent: Path, name: str) -> None:
    """Remove staging folders of dead builds into `parent/name`; restore a previous folder renamed aside."""
    tag = _host_tag()
    stale = {"partial": [], "old": []}
    for entry in parent.iterdir():
        for kind in stale:
            prefix = f".{name}.{kind}-{tag}-"
            rest = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
            pid = rest.split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                stale[kind].append(entry)
    target = parent / name
    for old in stale["old"]:
        if not target.exists():  # killed between its two renames: the previous folder goes back
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for partial in stale["partial"]:
        shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def staged_output(output_dir: str, output_entries: Sequence[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside `output_dir`; on a normal exit it becomes `output_dir`."""
    target = Path(os.path.realpath(output_dir))  # a symlinked output folder: replace its target
    output_dir = str(Path(output_dir))  # as messages name it ('' is '.')
    if target.exists() and not target.is_dir():
        raise ValueError(f"{output_dir}: exists and is not a folder")
    if target.is_dir():
        foreign = sorted(e.name for e in target.iterdir() if e.name not in output_entries)
        if foreign:
            raise ValueError(
                f"{output_dir}: holds {foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, "
                f"which this tool does not write; refusing to replace the folder (use a new or empty --output-dir)"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target.parent, target.name)
    stem = f".{target.name}.{{}}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"
    staging = target.parent / stem.format("partial")
    staging.mkdir()  # plain mkdir: the folder gets the umask's mode, as the final one would
    try:
        yield staging
        if not any(staging.iterdir()):
            raise ValueError(f"{output_dir}: nothing was written")
        if target.is_dir():
            aside = target.parent / stem.format("old")
            os.rename(target, aside)
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(aside, target)
                raise
            shutil.rmtree(aside)
        else:
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # still there only if the build failed
