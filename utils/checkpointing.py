"""Checkpoint files: the reference's weights layout plus a resumable train state.

Design choices:
- Two kinds of file in `checkpoint_path`. `step_{N}` holds the loss head's state dict exactly as
  the reference writes it (keys `model.inner....`), readable by our and the reference's
  evaluate.py; `all_config.yaml` and copies of the model and loss source files sit beside it.
  `train_state_step_{N:06d}.pt` holds everything needed to continue bit-exactly: weights, every
  optimizer, step, data-loader position, ACT carry and RNG states of every rank, config.
- Every file is written atomically (temporary file in the same folder, fsync, rename, fsync of
  the folder), so a crash mid-write leaves the previous checkpoint intact and never a truncated
  one under the final name. The latest train state is found by its zero-padded step in the name;
  temporary files (`.<name>.<random>.tmp`) never match that pattern, and the ones a killed writer
  left behind are removed by the next train-state save.
- A write that fails (read-only folder, disk full, quota) removes its temporary file and raises
  `CheckpointWriteError`, one line naming the folder and the OS reason; the file it would have
  replaced is untouched. `torch.save` does not let the OS error through: when the file's `write`
  fails mid-archive its C++ writer raises a RuntimeError ("unexpected pos ...", "PytorchStreamWriter
  failed writing file ..."), with the OSError only as its context. So any exception of the write is
  searched (itself, its cause and context chain) for an OSError, whose reason is reported; a torch
  writer RuntimeError without one is a write failure too. Anything else (a bug, an object that
  cannot be pickled) propagates unchanged.
- The ACT carry is a tree of dataclasses, dicts and tensors; it is stored as plain nested dicts of
  CPU tensors and rebuilt into a template carry made by the model, so a checkpoint never pickles
  model classes.
- Weights load with or without the `_orig_mod.` prefix that `torch.compile` adds; a key or shape
  mismatch is one ValueError line naming the first offending key. A file that is not a state dict
  of tensors (empty, truncated, random bytes, a folder, a pickle of something else, unreadable) is
  one ValueError line naming the file; warnings torch prints while failing on such a file are
  dropped, those of a file that loads are shown as before. The same reader serves the saved outputs
  of an evaluation (`step_N_all_preds.{rank}`, a dict of tensors too: utils/saved_outputs.py).
"""

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

TRAIN_STATE_PATTERN = re.compile(r"^train_state_step_(\d+)\.pt$")
TRAIN_STATE_TEMP_PATTERN = re.compile(r"^\.train_state_step_\d+\.pt\..*\.tmp$")
COMPILE_PREFIX = "_orig_mod."


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


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def train_state_path(checkpoint_path: str, step: int) -> str:
    return os.path.join(checkpoint_path, f"train_state_step_{step:06d}.pt")


def weights_path(checkpoint_path: str, step: int) -> str:
    return os.path.join(checkpoint_path, f"step_{step}")


def find_latest_train_state(checkpoint_path: str) -> str | None:
    """The train-state file with the highest step in `checkpoint_path`, or None."""
    found = train_states_newest_first(checkpoint_path)
    return found[0] if found else None


def train_states_newest_first(checkpoint_path: str) -> list[str]:
    """The train-state files of `checkpoint_path`, highest step first (none when the folder does not exist)."""
    if not os.path.isdir(checkpoint_path):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(checkpoint_path) if (m := TRAIN_STATE_PATTERN.match(name))]
    return [os.path.join(checkpoint_path, name) for _, name in sorted(found, reverse=True)]


def remove_stale_temp_files(checkpoint_path: str) -> list[str]:
    """Delete train-state temporaries left by a writer that was killed mid-write; returns their names.

    Only rank 0 writes train states, one at a time, so any such file found between saves is stale.
    """
    if not os.path.isdir(checkpoint_path):
        return []
    stale = sorted(name for name in os.listdir(checkpoint_path) if TRAIN_STATE_TEMP_PATTERN.match(name))
    for name in stale:
        try:
            os.unlink(os.path.join(checkpoint_path, name))
        except FileNotFoundError:
            pass
    return stale


def step_from_filename(path: str) -> int:
    """`step_1234` → 1234 (the reference's weights name); anything else → 0."""
    m = re.match(r"^step_(\d+)$", os.path.basename(path))
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------- ACT carry


def carry_to_state(carry: Any) -> Any:
    """Carry (dataclasses / dicts / tensors) → nested plain dicts of CPU tensors."""
    if isinstance(carry, torch.Tensor):
        return carry.detach().cpu().clone()
    if dataclasses.is_dataclass(carry):
        return {f.name: carry_to_state(getattr(carry, f.name)) for f in dataclasses.fields(carry)}
    if isinstance(carry, Mapping):
        return {k: carry_to_state(v) for k, v in carry.items()}
    return carry


def carry_from_state(template: Any, state: Any, where: str = "carry") -> Any:
    """Fill `template` (a carry made by `initial_carry`) with the values of `state`, on the template's devices."""
    if isinstance(template, torch.Tensor):
        if not isinstance(state, torch.Tensor) or state.shape != template.shape:
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"train state: {where} has shape {got}, expected {tuple(template.shape)}")
        return state.to(device=template.device, dtype=template.dtype)
    if dataclasses.is_dataclass(template):
        values = {
            f.name: carry_from_state(getattr(template, f.name), state[f.name], f"{where}.{f.name}")
            for f in dataclasses.fields(template)
        }
        return dataclasses.replace(template, **values)
    if isinstance(template, Mapping):
        return {k: carry_from_state(v, state[k], f"{where}.{k}") for k, v in template.items()}
    return state


# ---------------------------------------------------------------- RNG


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["torch_mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
    if device.type == "mps" and "torch_mps" in state:
        torch.mps.set_rng_state(state["torch_mps"])


# ---------------------------------------------------------------- weights


def strip_compile_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in state_dict.items()}


def check_state_dict_matches(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise one ValueError line naming the first missing, unexpected or mis-shaped key."""
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(
            f"{source}: key {missing[0]!r} missing ({len(missing)} missing) — checkpoint of another model?"
        )
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key in expected:
        got, want = tuple(state_dict[key].shape), tuple(expected[key].shape)
        if got != want:
            raise ValueError(
                f"{source}: {key!r} has shape {list(got)} in the checkpoint but {list(want)} in the configured model"
            )


def read_tensor_dict(path: str, what: str, container: str, map_location: torch.device | str = "cpu") -> dict:
    """Read a torch-saved dict of tensors; any file that is not one is one line naming it (ValueError, or
    FileNotFoundError when absent). `what` names the file in messages ("checkpoint"), `container` what it holds
    ("state dict")."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder, not a {what} file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with warnings.catch_warnings(record=True) as caught:
        try:
            data = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises several types (EOFError, RuntimeError, UnpicklingError, ...)
            empty = os.path.isfile(path) and os.path.getsize(path) == 0
            reason = "empty file" if empty else f"{type(e).__name__}: {_first_line(e, sentence=True)}"
            raise ValueError(f"{path}: not a readable torch {what} ({reason})") from None
    for w in caught:  # the file loaded: its warnings are shown as without the recording
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a {container}, found {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: expected a {container} of tensors, found key {key!r} holding {type(value).__name__}"
            )
    return dict(data)


def load_weights_file(path: str, map_location: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a `step_N` weights file (ours or the reference's), without the `_orig_mod.` prefix."""
    return strip_compile_prefix(read_tensor_dict(path, "checkpoint", "state dict", map_location))


def load_model_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Check keys/shapes against `model` (uncompiled), then copy the weights in."""
    state_dict = strip_compile_prefix(state_dict)
    check_state_dict_matches(state_dict, model.state_dict(), source)
    model.load_state_dict(state_dict, strict=True)


def save_weights(model: torch.nn.Module, checkpoint_path: str, step: int) -> str:
    path = weights_path(checkpoint_path, step)
    atomic_torch_save(model.state_dict(), path)
    return path


def save_code_and_config(checkpoint_path: str, config_dict: dict[str, Any], source_files: list[str]) -> None:
    """Write `all_config.yaml` and copy the model/loss source files into the run folder."""
    import yaml

    try:
        os.makedirs(checkpoint_path, exist_ok=True)
        for src in source_files:
            if src and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(checkpoint_path, os.path.basename(src)))
    except OSError as e:
        raise _write_error(checkpoint_path, e) from e
    atomic_write(
        os.path.join(checkpoint_path, "all_config.yaml"),
        lambda f: yaml.safe_dump(config_dict, f, sort_keys=False),
        mode="w",
    )
