"""What every command shares: the help flags and the one-line error exit."""
from __future__ import annotations

from typing import NoReturn

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: <message>` on stderr and exit with `code`."""
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)
