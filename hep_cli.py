"""What every command of the project shares on its command line: the version, ``--version``,
``--log-level`` and the exit-code epilog.

Standard library only and no package imports, so ``--version`` and a usage error cost no
more than starting Python. The version lives here and nowhere else (``pyproject.toml`` reads
it from this file).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

__version__ = "0.1.0"

LOG_LEVELS = ("debug", "info", "warning", "error")


def version_line(prog: str) -> str:
    """``<command> <version>``, what ``--version`` prints."""
    return f"{prog} {__version__}"


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` gives it ($COLUMNS, stdout's
    terminal, 80), without importing shutil: argparse makes a formatter for every option it
    is given, and shutil (with bz2 and lzma) was ~1.7 ms of every hep-exec job's start."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):  # not a terminal, or closed
            columns = 0
    return columns if columns > 0 else 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a text with line breaks (the exit codes) keeps them,
    each line wrapped under its own text."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _columns() - 2 if width is None else width  # (as argparse's own)
        super().__init__(prog, indent_increment, max_help_position, width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        import textwrap

        out = []
        for line in text.splitlines():
            margin = len(line) - len(line.lstrip())
            hang = indent + " " * (margin + 5 if margin else 0)  # under the text, past the code
            out.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=hang))
        return "\n".join(out) + "\n"


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """argparse's formatter that keeps the description and epilog as written."""


class ArgumentParser(argparse.ArgumentParser):
    """A usage error is one line on stderr (``<prog>: <what is wrong> (see <prog> --help)``)
    and exit 2, not argparse's usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    _argv: list[str] | None = None

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def unknown_options(self) -> list[str]:
        """Options of the command line this parser does not know (a typo like ``--sepc``
        is a better message than the ``--spec`` it made missing)."""
        known = self._option_string_actions
        out = []
        for arg in self._argv or []:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if name.startswith("--") and not any(k.startswith(name) for k in known):
                out.append(name)
        return out

    def usage_message(self, message: str) -> str:
        """argparse's complaint, or the unknown options when they are the cause."""
        unknown = self.unknown_options()
        if unknown and message.startswith("the following arguments are required"):
            message = f"unrecognized arguments: {' '.join(unknown)}"
        return f"{message} (see {self.prog} --help)"

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {self.usage_message(message)}\n")


def add_version(parser: argparse.ArgumentParser, prog: str) -> None:
    """``--version``: ``<command> <version>`` on stdout, exit 0."""
    parser.add_argument(
        "--version",
        action="version",
        version=version_line(prog),
        help="print the command's name and version and exit",
    )


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level``, spelled and explained alike in every command."""
    parser.add_argument(
        "--log-level",
        dest="log_level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=None,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)}: how much is said on stderr [warning]",
    )


def exit_codes(*codes: tuple[int, str]) -> str:
    """The ``--help`` epilog listing a command's exit codes, one per line."""
    return "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in codes)


def setup_logging(prog: str, level: str | None) -> None:
    """One ``<prog>: message`` line per record on stderr, at ``level`` (default warning)."""
    import logging

    logging.basicConfig(
        level=getattr(logging, (level or "warning").upper()), format=f"{prog}: %(message)s"
    )
