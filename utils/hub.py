"""Checkpoints on the Hugging Face hub, for evaluate.py: `checkpoint=hf://owner/name[@revision][/path/in/repo]`.

Design choices:
- The spelling is huggingface_hub's own for paths in a repository (its `HfFileSystem`): the repository id,
  an optional `@revision` (branch, tag or commit) and an optional path inside the repository, a weights file
  or a folder holding one (TRM's ARC Prize verification repository keeps each run in its own folder).
- `snapshot_download` fetches it into the hub cache (`HF_HUB_CACHE` / `HF_HOME`, shared with every other
  tool that uses the hub) and the files are read there; with `HF_HUB_OFFLINE=1`, or without a network, a
  cached snapshot is used as it is. With a path, only that file (or folder) and the `all_config.yaml`
  beside it are fetched: a repository may hold several runs of gigabytes each.
- The weights file of a folder is its highest `step_N` (this library's and TRM's name), else `checkpoint`
  (the name in HRM's released repositories); the run's `all_config.yaml` sits beside it, as in a run folder.
- Whatever stops the download (not cached while offline, no network, an unknown repository or revision,
  a gated one) is one line naming the checkpoint, raised before any data is read.
"""

import os
import re
from dataclasses import dataclass

HUB_PREFIX = "hf://"
HUB_SPEC = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.+?))?/?$")
RELEASED_WEIGHTS_NAME = "checkpoint"  # HRM's released repositories: `checkpoint` beside `all_config.yaml`
STEP_NAME = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class HubCheckpoint:
    repo_id: str
    revision: str | None  # None: the default branch
    path: str  # inside the repository; "" for its root

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{revision}{'/' + self.path if self.path else ''}"

    def folder_name(self) -> str:
        """A one-level folder name for this checkpoint's evaluation outputs: owner--name[@revision][--path]."""
        name = self.repo_id.replace("/", "--") + (f"@{self.revision}" if self.revision else "")
        return "--".join([name, *filter(None, self.path.split("/"))])


@dataclass(frozen=True)
class ResolvedCheckpoint:
    file: str  # the weights file in the hub cache
    commit: str  # the commit of the snapshot it was read from


def parse_hub_checkpoint(spec: str) -> HubCheckpoint | None:
    """`hf://...` -> its parts; anything else (a local path) -> None."""
    if not spec.startswith(HUB_PREFIX):
        return None
    m = HUB_SPEC.match(spec)
    if m is None:
        raise ValueError(
            f"config key 'checkpoint': {spec!r} is not of the form hf://owner/name[@revision][/path/in/repo]"
        )
    return HubCheckpoint(m.group("repo"), m.group("revision"), m.group("path") or "")


def download_reason(error: BaseException) -> str:
    """Why `snapshot_download` failed, in one line."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, LocalEntryNotFoundError):
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        return f"not in the hub cache {constants.HF_HUB_CACHE} and {offline}"
    if isinstance(error, RevisionNotFoundError):
        return "no such revision in the repository"
    if isinstance(error, GatedRepoError):
        return "a gated repository: accept its terms on huggingface.co and log in (`hf auth login`)"
    if isinstance(error, RepositoryNotFoundError):
        return "no such model repository on the hub (or a private one: log in with `hf auth login`)"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def weights_file(folder: str, where: str) -> str:
    """The weights file of a snapshot folder: its highest `step_N`, else `checkpoint`."""
    names = sorted(os.listdir(folder))
    steps = [(int(m.group(1)), name) for name in names if (m := STEP_NAME.match(name))]
    if steps:
        return os.path.join(folder, max(steps)[1])
    if RELEASED_WEIGHTS_NAME in names:
        return os.path.join(folder, RELEASED_WEIGHTS_NAME)
    raise FileNotFoundError(
        f"{where}: no weights file (step_N or {RELEASED_WEIGHTS_NAME}) among {', '.join(names) or 'no files'}; "
        "name it: hf://owner/name/path/to/file"
    )


def resolve_hub_checkpoint(checkpoint: HubCheckpoint) -> ResolvedCheckpoint:
    """Download (or find in the cache) the snapshot holding `checkpoint`; its weights file and commit."""
    from huggingface_hub import snapshot_download

    patterns = None
    if checkpoint.path:  # that file or folder, and the run config beside it
        config = "/".join([*checkpoint.path.split("/")[:-1], "all_config.yaml"])
        patterns = [checkpoint.path, f"{checkpoint.path}/*", config]
    try:
        snapshot = snapshot_download(checkpoint.repo_id, revision=checkpoint.revision, allow_patterns=patterns)
    except (OSError, ValueError) as e:  # the hub's errors are OSErrors (HTTP, cache, offline) or ValueErrors (ids)
        raise FileNotFoundError(f"checkpoint {checkpoint}: {download_reason(e)}") from None
    target = os.path.join(snapshot, *checkpoint.path.split("/")) if checkpoint.path else snapshot
    commit = os.path.basename(os.path.normpath(snapshot))
    if os.path.isfile(target):
        return ResolvedCheckpoint(target, commit)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"checkpoint {checkpoint}: {checkpoint.path} is not in the snapshot (commit {commit})")
    return ResolvedCheckpoint(weights_file(target, f"checkpoint {checkpoint}"), commit)
