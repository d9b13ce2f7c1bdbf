"""Output: rich tables for people, plain JSON for scripts, messages and errors on stderr."""

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from autogen_cli.client import JSON, ApiError, Listing


class Format(StrEnum):
    """`--output`: a table (or detail view) for people, JSON for scripts."""

    table = "table"
    json = "json"


OutputOption = Annotated[
    Format,
    typer.Option(
        "--output",
        "-o",
        case_sensitive=False,
        help="table: for people; json: the API's objects on stdout, for scripts.",
    ),
]
LimitOption = Annotated[
    int,
    typer.Option(
        "--limit", "-n", min=1, help="Show at most this many (pages are followed as needed)."
    ),
]
AllOption = Annotated[
    bool, typer.Option("--all", "-a", help="Follow every page and show everything.")
]

# A column: its header and how to get its value from one API object.
Column = tuple[str, Callable[[JSON], Any]]
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]00:00)$")


def _console(*, stderr: bool) -> Console:
    # Tables piped to a file stay wide enough for ids instead of rich's 80-column default.
    width = None if os.environ.get("COLUMNS") or _isatty(stderr) else 200
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


def _isatty(stderr: bool) -> bool:
    stream = sys.stderr if stderr else sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def stdout() -> Console:
    """The console for results."""
    return _console(stderr=False)


def stderr() -> Console:
    """The console for progress, notes and errors (stdout stays clean for `-o json`)."""
    return _console(stderr=True)


def print_json(value: Any) -> None:
    """Exactly the JSON, indented, on stdout (no colour, no wrapping)."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    """A message for the person at the terminal, on stderr."""
    stderr().print(Text(message, style="dim"))


def text(value: Any) -> str:  # noqa: PLR0911 - one answer per kind of value
    """One value as a cell shows it: `-` for none, `yes`/`no`, lists joined, short times."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(text(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and (match := _TIMESTAMP.match(value)):
        return f"{match[1]} {match[2]}Z"
    return str(value)


def table(rows: Sequence[JSON], columns: Sequence[Column], *, title: str | None = None) -> None:
    """Rows of API objects as a table on stdout (values are never read as rich markup)."""
    grid = Table(title=title, header_style="bold", show_lines=False)
    for header, _ in columns:
        grid.add_column(header, overflow="fold")
    for row in rows:
        grid.add_row(*(Text(text(get(row))) for _, get in columns))
    stdout().print(grid)


def details(rows: Sequence[tuple[str, Any]], *, title: str | None = None) -> None:
    """One object as label / value lines on stdout."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(label, Text(text(value)))
    console = stdout()
    if title:
        console.print(Text(title, style="bold underline"))
    console.print(grid)


def listing(
    found: Listing, fmt: Format, columns: Sequence[Column], *, what: str, hint: str = "--all"
) -> None:
    """A list command's output: the items (JSON array or table) and whether more exist."""
    if fmt is Format.json:
        print_json(found.items)
    elif not found.items:
        note(f"No {what}.")
    else:
        table(found.items, columns)
    if found.more:
        note(f"{len(found.items)} {what} shown; more match (raise --limit or use {hint}).")


def show_api_error(error: ApiError) -> None:
    """The problem document: `Error: <title> (HTTP n)`, its detail, and the fields it names."""
    console = stderr()
    console.print(
        Text.assemble(("Error: ", "bold red"), (error.title, "bold"), f" (HTTP {error.status})")
    )
    console.print(Text(error.detail))
    for item in error.errors:
        field, message = item.get("field"), item.get("message")
        if field and message and message not in error.detail:
            console.print(Text(f"  {field}: {message}"))


def show_error(message: str) -> None:
    """A one-line error on stderr."""
    stderr().print(Text.assemble(("Error: ", "bold red"), message))
