"""One command-line system for every builder and generator: a pydantic config becomes flags.

Each field `some_name` of the config class is the flag `--some-name` (the reference's spelling),
typed from its annotation: `bool` is a switch, `list[...]` takes one or more values and
*replaces* the default (the reference's CLI library appends to it, a defect), `X | None`
accepts a value of type X. The parsed values are validated by the pydantic model itself.

`run_cli` is the entry point wrapper: ValueError / FileNotFoundError from library code become
`error: <message>` on stderr and exit status 2, without a traceback. Flag errors (unknown flag,
ill-typed value) take the same one-line form instead of argparse's usage block; `--help` is unchanged.
"""

import argparse
import sys
import types
import typing
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ValidationError


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


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(message)  # e.g. "argument --num-aug: invalid int value: 'x'"


def build_parser(config_cls: type[BaseModel], description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=description or (config_cls.__doc__ or "").strip() or None)
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
            help=f"{help_text} (default: {default})".strip(),
        )
    return parser


def parse_config(config_cls: type[BaseModel], argv: Sequence[str] | None = None, description: str | None = None):
    args = build_parser(config_cls, description).parse_args(argv)
    try:
        return config_cls(**vars(args))
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "?"
        raise ValueError(f"{flag}: {err['msg']}") from None


def run_cli(main: Callable[[BaseModel], object], config_cls: type[BaseModel], argv: Sequence[str] | None = None) -> int:
    """Parse flags into `config_cls`, call `main(config)`; report bad input as `error: ...`, exit 2."""
    try:
        config = parse_config(config_cls, argv, description=(main.__doc__ or "").strip() or None)
        main(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
