"""Checkpoint files: the reference's weights layout plus a resumable train state.

Design choices:
- Two kinds of file in `checkpoint_path`. `step_{N}` holds the loss head's state dict exactly as
  the reference writes it (keys `model.inner....`), readable by our and the reference's
  evaluate.py; `all_config.yaml` and copies of the model and loss source files sit beside it.
  `train_state_step_{N:06d}.pt` holds everything needed to continue bit-exactly: weights, every
  optimizer, step, data-loader position, ACT carry and RNG states of every rank, config.
- Every file is written atomically (utils/files.py: temporary sibling, fsync, rename), so a crash
  mid-write leaves the previous checkpoint intact and a failed write is one `CheckpointWriteError`
  line. The latest train state is found by its zero-padded step in the name; temporary files
  (`.<name>.<random>.tmp`) never match that pattern, and the ones a killed writer left behind are
  removed by the next train-state save.
- The ACT carry is stored as plain nested dicts of CPU tensors and rebuilt into a template carry made
  by the model (training/carry.py), so a checkpoint never pickles model classes.
- Weights load with or without the `_orig_mod.` prefix that `torch.compile` adds; a key or shape
  mismatch is one ValueError line naming the first offending key. A file that is not a state dict
  of tensors (empty, truncated, random bytes, a folder, a pickle of something else, unreadable) is
  one ValueError line naming the file; warnings torch prints while failing on such a file are
  dropped, those of a file that loads are shown as before. The same reader serves the saved outputs
  of an evaluation (`step_N_all_preds.{rank}`, a dict of tensors too: utils/saved_outputs.py).
"""

import os
import re
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from utils.files import (  # noqa: F401  (written atomically: utils/files.py; named here for the checkpoint code)
    CheckpointWriteError,
    _first_line,
    _write_error,
    atomic_write,
    writable_folder,
)

TRAIN_STATE_PATTERN = re.compile(r"^train_state_step_(\d+)\.pt$")
TRAIN_STATE_TEMP_PATTERN = re.compile(r"^\.train_state_step_\d+\.pt\..*\.tmp$")
COMPILE_PREFIX = "_orig_mod."


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
