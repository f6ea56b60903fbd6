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

No partial output: for a config with an `output_dir` field, `main` writes into a staging folder that only a
build that returns normally and wrote something turns into `output_dir` (utils/files.py `staged_output`); error
messages name `output_dir`, not the staging folder.
"""

import argparse
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ValidationError

from utils.cli import OneLineErrorParser, report_error, validation_error_line
from utils.files import staged_output

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
