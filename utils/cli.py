"""One-line errors for every command-line entry point: pretrain.py, evaluate.py, the dataset builders and
generators, ARC scoring, the tools and the quick start's report.

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
- Flag-based commands (the builders and generators, `evaluators.arc_scoring`, `tools.visualize`,
  `tools.plot_metrics`) parse with `OneLineErrorParser` and run through `run_flag_command` (the builders
  through `dataset/cli.py`'s `run_cli`, which calls `report_error`): a missing or ill-typed flag, bad input,
  an error of the OS (unreadable file, full disk) or a missing optional package is one `error:` line, exit
  status 2.
- pydantic validation errors become one line in one place, `validation_error_line`, in the words of the
  command that validated: `config key 'lr'` for the launchers, `--num-aug` for the builders, `option
  'pass_Ks'` for an evaluator's options, `field 'seq_len'` for a dataset.json.
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


def os_error_line(e: BaseException) -> str:
    """One line for an error the OS raised (`<file>: <reason>`), else the first line of the error's message."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename is not None else ""
        return f"{where}{e.strerror}"
    return next(iter(str(e).strip().splitlines()), "") or type(e).__name__


def describe_error(e: BaseException, flag_command: bool = False) -> tuple[str, int] | None:
    """(one-line message, exit status) for an error that is reported rather than raised; None otherwise.

    A flag-based command (`flag_command`: the builders, generators, ARC scoring, the tools) also reports what the
    OS raised (an unreadable file, a full disk) and a missing optional package (its message says what to
    install), and exits 2 for every reported error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    status = getattr(e, "exit_code", None)
    if flag_command and isinstance(e, (ValueError, OSError, ModuleNotFoundError)):
        return os_error_line(e), BAD_INPUT_STATUS
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


def report_error(e: BaseException, flag_command: bool = False, shown: dict[str, str] | None = None) -> int:
    """Print `error: <line>` for an error `describe_error` knows and return its exit status; re-raise any other.
    `shown`: paths in the message to name otherwise (a build's staging folder is named as its `--output-dir`)."""
    described = describe_error(e, flag_command)
    if described is None:
        raise e
    message, status = described
    for path, name in (shown or {}).items():
        message = message.replace(path, name)
    if not getattr(e, "quiet", False):  # e.g. a stop on a signal: said once, by rank 0
        print(f"{getattr(type(e), 'line_prefix', 'error')}: {message}", file=sys.stderr)
    return status


@contextmanager
def bad_input_exits() -> Iterator[None]:
    """Report the errors `describe_error` knows as `error: <line>` on stderr and exit with their status."""
    try:
        yield
    except Exception as e:
        sys.exit(report_error(e))


def run_flag_command(body: Callable[[], int | None]) -> int:
    """The error layer of a flag-based command's `main`: `body()`'s status (None: 0), or 2 after one `error:` line
    for bad flags, bad input and the OS's errors (`describe_error(..., flag_command=True)`)."""
    try:
        return body() or 0
    except Exception as e:
        return report_error(e, flag_command=True)


def validation_error_line(
    err: Any,
    field: Callable[[tuple[str, ...]], str],
    *,
    prefix: str = "",
    unknown: str = "unknown {field}",
    required: str = "{field} is required",
    invalid: str = "{field}: {msg} (got {input!r})",
    own: str | None = "{msg}",
    whole: str | None = None,
    count_others: bool = False,
    unknown_first: bool = False,
) -> str:
    """A pydantic `ValidationError` as one line, in the words of the command that validated: the first error
    (`unknown_first`: an unknown key first, since a misspelling explains the errors after it), its location named
    by `field(loc)` (`config key 'lr'`, `--num-aug`, `option 'pass_Ks' (item 0)`). Templates for an unknown key,
    a missing one, an invalid value, a message of our own validators (`own`; None: as an invalid value, the
    message kept as pydantic words it) and an error of the whole document (`whole`, where the location is empty);
    `count_others` appends how many more errors there were."""
    errors = err.errors()
    first = min(errors, key=lambda e: e["type"] != "extra_forbidden") if unknown_first else errors[0]
    loc = tuple(str(part) for part in first["loc"])
    values = {"msg": first["msg"], "input": first.get("input")}
    if whole is not None and not loc:
        template = whole
    elif first["type"] == "extra_forbidden":
        template = unknown
    elif first["type"] == "missing":
        template = required
    elif first["type"] == "value_error" and own is not None:
        template, values["msg"] = own, first["msg"].removeprefix("Value error, ")
    else:
        template = invalid
    line = prefix + template.format(field=field(loc) if loc or whole is None else "", **values)
    if count_others and err.error_count() > 1:
        line += f" (and {err.error_count() - 1} more errors)"
    return line


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
