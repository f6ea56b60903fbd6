"""One command-line system for every builder and generator: a pydantic config becomes flags.

Each field `some_name` of the config class is the flag `--some-name` (the reference's spelling),
typed from its annotation: `bool` is a switch, `list[...]` takes one or more values and
*replaces* the default (the reference's CLI library appends to it, a defect), `X | None`
accepts a value of type X. The parsed values are validated by the pydantic model itself.
`--help` shows each flag with its field's description and its default.

`run_cli` is the entry point wrapper, through utils/cli.py's error layer for flag-based commands:
ValueError and OSError (missing or unreadable source, full disk) from library code become
`error: <message>` on stderr and exit status 2, without a traceback. Flag errors (unknown flag,
ill-typed value) take the same one-line form instead of argparse's usage block.

No partial output: for a config with an `output_dir` field, `main` writes into a fresh hidden
sibling `.<name>.partial-<host>-<pid>-<random>` (same file system, so renames are cheap and atomic),
and only a build that returns normally and wrote something is renamed to `output_dir`. A previous
folder there is renamed aside first and deleted after, so a failed build leaves it untouched and a
successful one replaces it whole (no stale split of an older build survives). Error messages name
`output_dir`, not the staging folder. A folder that holds anything the tool does not write
(`output_entries`) is refused before any work, so a mistyped `--output-dir` never deletes unrelated
files. Staging folders of a killed build (its pid gone on this host) are removed by the next build
into the same folder; a previous folder it had renamed aside but not yet replaced is put back first.
"""

import argparse
import contextlib
import os
import re
import secrets
import shutil
import socket
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pydantic import BaseModel, ValidationError

from utils.cli import OneLineErrorParser, report_error, validation_error_line

# What a dataset builder writes into its output folder (dataset/common.py's layout); generators pass their own list.
DATASET_ENTRIES = ("train", "test", "identifiers.json")


def _base_type(annotation):
    """Strip `Optional[...]`/`X | None`; return (base type, is_list)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union annotation {annotation}")
        return _base_type(args[0])
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(annotation)[:1]
        return item, True
    return annotation, False


def build_parser(config_cls: type[BaseModel], description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        description=description or (config_cls.__doc__ or "").strip() or None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # every flag's help ends with its default
    )
    for name, field in config_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        base, is_list = _base_type(field.annotation)
        help_text = field.description or ""
        default = field.get_default(call_default_factory=True)
        if base is bool and not is_list:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        parser.add_argument(
            flag,
            dest=name,
            type=base,
            nargs="+" if is_list else None,
            default=default,
            required=field.is_required(),
            help=help_text,
        )
    return parser


def parse_config(config_cls: type[BaseModel], argv: Sequence[str] | None = None, description: str | None = None):
    args = build_parser(config_cls, description).parse_args(argv)
    try:
        return config_cls(**vars(args))
    except ValidationError as e:
        flag = "{field}: {msg}"  # `--num-aug: Input should be greater than or equal to 0`
        line = validation_error_line(
            e,
            lambda loc: "--" + loc[0].replace("_", "-") if loc else "?",
            unknown=flag,
            required=flag,
            invalid=flag,
            own=None,
        )
        raise ValueError(line) from None


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


def run_cli(
    main: Callable[[BaseModel], object],
    config_cls: type[BaseModel],
    argv: Sequence[str] | None = None,
    output_entries: Sequence[str] = DATASET_ENTRIES,
) -> int:
    """Parse flags into `config_cls`, call `main(config)`; report bad input as `error: ...`, exit 2.

    With an `output_dir` field, `main` writes into a staging folder that replaces `output_dir` only
    when it succeeds (module docstring); `output_entries` are the names it may find there to replace.
    """
    staging = None
    try:
        config = parse_config(config_cls, argv, description=(main.__doc__ or "").strip() or None)
        if "output_dir" not in config_cls.model_fields:
            main(config)
            return 0
        shown = str(Path(config.output_dir))
        with staged_output(config.output_dir, output_entries) as staging:
            main(config.model_copy(update={"output_dir": str(staging)}))
    except Exception as e:  # utils/cli.py's error layer: one line, status 2, the staging folder named as given
        return report_error(e, flag_command=True, shown={str(staging): shown} if staging is not None else None)
    return 0
