"""One-line errors for every command-line entry point (pretrain.py, evaluate.py, the dataset builders).

Design choices:
- Bad input (config keys, files, flags) becomes `error: <one line>` on stderr and exit status 2, with no
  traceback: `ValueError` and `FileNotFoundError` raised anywhere in library code carry a message that
  names the key, file or line, and this module only prints it.
- A run that cannot go on leaves the same way with its own status: any exception with an `exit_code`
  attribute (3 non-finite loss with `nonfinite: stop`, 4 checkpoint not writable, 5 another rank died or
  timed out, 6 the run folder is in use by another run, 130 / 143 stopped by SIGINT / SIGTERM after saving;
  README "Reliability"). Its class may name another prefix than `error` (`line_prefix`: a stop on a signal
  is no error), and a `quiet` one is not printed (the ranks other than 0 of such a stop). This module imports nothing of the project, so every
  layer can raise such errors without importing the launchers.
- An operator that torch does not implement on Apple GPUs stops a `device=mps` run with one line naming
  it (status 2). The CPU fallback, `PYTORCH_ENABLE_MPS_FALLBACK=1`, is left to the user to set: silently
  moving operators to the CPU would make the run slow without saying why.
- Hydra and OmegaConf composition errors span several lines; only the first line of each part is kept,
  and the repeated "config:"-style prefixes are dropped.
- `--help` of the Hydra commands lists every key with its default and description, taken from where the
  key is defined (the YAML's trailing comments, the typed config's field descriptions), so no second copy
  of the texts exists.
- Flag-based commands (the builders, `utils.arc_scoring`, `utils.visualize`) parse with `OneLineErrorParser`:
  a missing or ill-typed flag is the same one `error:` line, exit status 2.
- The reference and TRM spell some overrides `+run_name=...` because their YAML lacks those keys, and ours
  lacks them too, so their command lines compose unchanged. On the command line either spelling works:
  `normalize_overrides` adds the `+` to a typed-config key the YAML does not list, and drops it from one
  it does list (where Hydra would refuse it: "already at").
"""

import argparse
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

BAD_INPUT_STATUS = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse for the flag-based commands (builders, scoring, visualiser): a bad flag raises ValueError, which
    the command reports as its one `error:` line, instead of argparse's usage block; `--help` is unchanged."""

    def error(self, message: str):
        raise ValueError(message)  # e.g. "argument --num-aug: invalid int value: 'x'"


def error_line(e: BaseException) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker (its text then holds the worker's
    traceback), the original message, which is the traceback's last line."""
    text = str(e).strip()
    if text.startswith("Caught ") and "DataLoader worker" in text.splitlines()[0]:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


def one_line_config_error(e: BaseException) -> str:
    """Hydra/OmegaConf composition errors span several lines: one line with what matters of each part.

    A parse error of an override keeps the parser's reason (`lr==1`: "extraneous input '='"), without the
    list of expected tokens and the link to the grammar; an OmegaConf error names its key.
    """
    if str(e).startswith(LEXER_ERROR):
        return unquoted_character_error(str(e))
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("See https://", "full_key:", "object_type="))]
    parts = [lines[0].rstrip(".")] if lines else [type(e).__name__]
    if type(e).__name__ == "OverrideParseException" and len(lines) > 1:
        parts.append(lines[1].split(" expecting ", 1)[0] + " (see Hydra's override grammar)")
    key = getattr(e, "full_key", None)
    if key and f"'{key}'" not in parts[0]:
        parts[0] += f" (key '{key}')"
    if e.__cause__ is not None and str(e.__cause__).strip():
        cause = str(e.__cause__).strip().splitlines()[0]
        if cause not in parts[0]:
            parts.append(cause)
    return ": ".join(parts)


LEXER_ERROR = "LexerNoViableAltException: "  # Hydra's lexer: the override, then a line with a caret under the character


def unquoted_character_error(text: str) -> str:
    """A character Hydra's override grammar takes only inside quotes (`é` of a path, most often): say which, and
    how to quote the value. The override is named as typed (`normalize_overrides` may have added a `+`)."""
    first, _, caret = text.partition("\n")
    override = first[len(LEXER_ERROR) :]
    position = caret.find("^") - len(LEXER_ERROR)
    character = f"character {override[position]!r}" if 0 <= position < len(override) else "a character"
    key, _, value = override.lstrip("+").partition("=")
    return (
        f"override '{key}={value}': {character} is not allowed in an unquoted value; quote the value for Hydra, "
        f"e.g. \"{key}='{value}'\""
    )


def describe_error(e: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for an error that is reported rather than raised; None otherwise."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    status = getattr(e, "exit_code", None)
    if isinstance(status, int):
        return str(e), status
    if isinstance(e, (HydraException, OmegaConfBaseException)):  # before ValueError: some are both
        return one_line_config_error(e), BAD_INPUT_STATUS
    if isinstance(e, (ValueError, FileNotFoundError)):
        return error_line(e), BAD_INPUT_STATUS
    missing = re.search(r"operator '([^']+)' is not currently implemented for the MPS device", str(e))
    if isinstance(e, NotImplementedError) and missing:
        return (
            f"device=mps: the operator '{missing.group(1)}' is not implemented for MPS in this torch "
            "(PYTORCH_ENABLE_MPS_FALLBACK=1 in the environment runs such operators on the CPU, slower)",
            BAD_INPUT_STATUS,
        )
    return None


@contextmanager
def bad_input_exits() -> Iterator[None]:
    """Report the errors `describe_error` knows as `error: <line>` on stderr and exit with their status."""
    try:
        yield
    except Exception as e:
        described = describe_error(e)
        if described is None:
            raise
        message, status = described
        if not getattr(e, "quiet", False):  # e.g. a stop on a signal: said once, by rank 0
            print(f"{getattr(type(e), 'line_prefix', 'error')}: {message}", file=sys.stderr)
        sys.exit(status)


def normalize_overrides(
    argv: list[str], listed: Iterable[str], fields: Iterable[str] = (), open_sections: Iterable[str] = ()
) -> list[str]:
    """Top-level overrides: `+key=value` → `key=value` for a key the YAML lists; `key=value` → `+key=value`
    for a key of the typed config (`fields`) the YAML does not list (see module docstring). Keys under an
    `open_sections` entry (`arch.halt_max_steps=64` for evaluate.py, whose `arch` starts empty) get `++`."""
    listed, fields, open_sections = set(listed), set(fields), tuple(f"{s}." for s in open_sections)
    out = []
    for arg in argv:
        if "=" in arg and not arg.startswith(("++", "~")):
            plus = arg.startswith("+")
            key = arg.removeprefix("+").split("=", 1)[0]
            if key.startswith(open_sections):
                arg = "++" + arg.removeprefix("+")
            elif plus and key in listed:
                arg = arg[1:]
            elif not plus and key in fields and key not in listed:
                arg = "+" + arg
        out.append(arg)
    return out


def override_text(value: Any) -> str:
    """A value as one writes it in an override: `null`, `true`, `[a, b]`, `{name: x}`, else as is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(override_text, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {override_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def field_entries(model: Any, skip: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(`key=default`, description) of each field of a pydantic model, for `format_help`."""
    return [
        (
            f"{name}=... (required)" if field.is_required() else f"{name}={override_text(field.default)}",
            field.description or "",
        )
        for name, field in model.model_fields.items()
        if name not in skip
    ]


def format_help(usage: str, summary: str, sections: Iterable[tuple[str, Iterable[tuple[str, str]]]]) -> str:
    """A command's `--help`: usage, summary, then each section's entries, a label (`key=default`) on its own
    line and its description wrapped below it."""
    width = min(shutil.get_terminal_size().columns, 120)
    parts = [f"usage: {os.path.basename(sys.argv[0])} {usage}", "", textwrap.fill(summary, width)]
    for title, entries in sections:
        parts += ["", f"{title}:"]
        for label, description in entries:
            parts.append(f"  {label}")
            parts += textwrap.wrap(description, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(parts)


def run_hydra_entry(
    entry: Callable[[], None],
    listed: Iterable[str] = (),
    fields: Iterable[str] = (),
    open_sections: Iterable[str] = (),
    help_text: Callable[[], str] | None = None,
) -> None:
    """Run a Hydra entry point with one-line composition errors (the entry handles its own errors).

    `-h`/`--help` prints `help_text()` (every key, its default and description) instead of Hydra's
    config dump; `--hydra-help` and `--cfg job` still reach Hydra."""
    if help_text is not None and any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(help_text())
        return
    # Let composition errors propagate to us instead of Hydra printing them over several lines.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv[1:] = normalize_overrides(sys.argv[1:], listed, fields, open_sections)
    with bad_input_exits():
        entry()
