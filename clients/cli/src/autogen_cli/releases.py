"""`autogen releases`: firmware releases, by console and variant."""

from enum import StrEnum
from typing import Annotated

import typer

from autogen_cli import output
from autogen_cli.context import options
from autogen_cli.output import AllOption, Column, Format, LimitOption, OutputOption

app = typer.Typer(help="List firmware releases and show one.", no_args_is_help=True)


class Console(StrEnum):
    """Firmware consoles (API.md: GET /firmware/consoles)."""

    xpro = "xpro"
    unified = "unified"
    ultra = "ultra"


class Transport(StrEnum):
    """Device transports."""

    gsm = "gsm"
    wifi = "wifi"


COLUMNS: list[Column] = [
    ("id", lambda r: r.get("id")),
    ("console", lambda r: r.get("console")),
    ("version", lambda r: r.get("version")),
    ("models", lambda r: r.get("models")),
    ("engine", lambda r: r.get("engine")),
    ("transport", lambda r: r.get("transport")),
    ("validated", lambda r: r.get("validated")),
    ("withdrawn", lambda r: "WITHDRAWN" if r.get("withdrawn") else ""),
    ("created", lambda r: r.get("created_at")),
]


@app.command("list")
def list_releases(
    ctx: typer.Context,
    *,
    console: Annotated[
        Console | None, typer.Option("--console", help="xpro, unified or ultra.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="e.g. D100.")] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="e.g. gas, diesel.")] = None,
    transport: Annotated[Transport | None, typer.Option("--transport", help="gsm or wifi.")] = None,
    limit: LimitOption = 50,
    every: AllOption = False,
    fmt: OutputOption = Format.table,
) -> None:
    """List firmware releases, newest first (GET /firmware/releases).

    `validated` is per caller: whether the release passed a validation on a test device in
    your scope (deploying an unvalidated release is refused).
    """
    with options(ctx).client() as api:
        found = api.releases(
            console=console.value if console else None,
            model=model,
            engine=engine,
            transport=transport.value if transport else None,
            limit=None if every else limit,
        )
    output.listing(found, fmt, COLUMNS, what="releases")


@app.command("show")
def show_release(
    ctx: typer.Context,
    *,
    release_id: Annotated[
        str, typer.Argument(metavar="RELEASE_ID", help="Release id, e.g. rel-1a2b3c.")
    ],
    fmt: OutputOption = Format.table,
) -> None:
    """Show one release: variant, artifact, checksum, notes (GET /firmware/releases/{id})."""
    with options(ctx).client() as api:
        release = api.release(release_id)
    if fmt is Format.json:
        output.print_json(release)
        return
    output.details(
        [
            ("console", release.get("console")),
            ("version", release.get("version")),
            ("models", release.get("models")),
            ("engine", release.get("engine")),
            ("transport", release.get("transport")),
            ("validated", release.get("validated")),
            ("withdrawn", release.get("withdrawn")),
            ("artifact", release.get("artifact_url")),
            ("sha256", release.get("sha256")),
            ("size", release.get("size")),
            ("notes", release.get("notes")),
            ("created", release.get("created_at")),
        ],
        title=f"Release {release.get('id')}",
    )
