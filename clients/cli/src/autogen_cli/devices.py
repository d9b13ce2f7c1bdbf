"""`autogen devices`: search the fleet, show one device, its command history."""

from enum import StrEnum
from typing import Annotated

import typer

from autogen_cli import output
from autogen_cli.client import JSON
from autogen_cli.context import options
from autogen_cli.output import AllOption, Column, Format, LimitOption, OutputOption

app = typer.Typer(help="Search devices, show one, read its command history.", no_args_is_help=True)


class Connection(StrEnum):
    """`--connection` filter."""

    live = "live"
    offline = "offline"


ConnectionOption = Annotated[
    Connection | None, typer.Option("--connection", "-c", help="Only live or only offline units.")
]
ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="Controller model, e.g. D100, 'X Pro', Ultra.")
]
FirmwareOption = Annotated[
    str | None, typer.Option("--firmware", "-f", help="Reported firmware version, e.g. 2.4.1.")
]

COLUMNS: list[Column] = [
    ("id", lambda d: d.get("id")),
    ("name", lambda d: d.get("name")),
    ("model", lambda d: d.get("model")),
    ("engine", lambda d: d.get("engine")),
    ("transport", lambda d: d.get("transport")),
    ("firmware", lambda d: d.get("firmware_version")),
    ("connection", lambda d: d.get("connection")),
    ("run", lambda d: d.get("run_state")),
    ("attention", lambda d: "ATTENTION" if d.get("attention") else ""),
    ("customer", lambda d: d.get("customer_email")),
    ("last seen", lambda d: d.get("last_seen_at")),
]
HISTORY: list[Column] = [
    ("id", lambda c: c.get("id")),
    ("action", lambda c: c.get("action")),
    ("params", lambda c: c.get("params") or None),
    ("status", lambda c: c.get("status")),
    ("detail", lambda c: c.get("detail")),
    ("by", lambda c: c.get("requested_by_email") or c.get("requested_by")),
    ("created", lambda c: c.get("created_at")),
]


def _list(
    ctx: typer.Context,
    *,
    q: str | None,
    connection: Connection | None,
    model: str | None,
    firmware: str | None,
    limit: int,
    every: bool,
    fmt: Format,
) -> None:
    with options(ctx).client() as api:
        found = api.devices(
            q=q,
            connection=connection.value if connection else None,
            model=model,
            firmware=firmware,
            limit=None if every else limit,
        )
    output.listing(found, fmt, COLUMNS, what="devices")


@app.command("list")
def list_devices(
    ctx: typer.Context,
    *,
    q: Annotated[
        str | None,
        typer.Option("--query", "-q", help="Device id, customer email or name (partial)."),
    ] = None,
    connection: ConnectionOption = None,
    model: ModelOption = None,
    firmware: FirmwareOption = None,
    limit: LimitOption = 50,
    every: AllOption = False,
    fmt: OutputOption = Format.table,
) -> None:
    """List the devices in your scope, optionally filtered (GET /devices)."""
    _list(
        ctx,
        q=q,
        connection=connection,
        model=model,
        firmware=firmware,
        limit=limit,
        every=every,
        fmt=fmt,
    )


@app.command("search")
def search_devices(
    ctx: typer.Context,
    *,
    query: Annotated[
        str,
        typer.Argument(
            metavar="QUERY", help="Device id, customer email or device name (partial, any case)."
        ),
    ],
    connection: ConnectionOption = None,
    model: ModelOption = None,
    firmware: FirmwareOption = None,
    limit: LimitOption = 50,
    every: AllOption = False,
    fmt: OutputOption = Format.table,
) -> None:
    """Search devices by id, customer email or name, with the same filters as `list`."""
    _list(
        ctx,
        q=query,
        connection=connection,
        model=model,
        firmware=firmware,
        limit=limit,
        every=every,
        fmt=fmt,
    )


@app.command("show")
def show_device(
    ctx: typer.Context,
    *,
    device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID", help="Device id, e.g. AG10000.")],
    fmt: OutputOption = Format.table,
) -> None:
    """Show one device: identity, firmware, connection, run state, position (GET /devices/{id})."""
    with options(ctx).client() as api:
        device = api.device(device_id)
    if fmt is Format.json:
        output.print_json(device)
        return
    output.details(describe(device), title=f"Device {device.get('id')}")


def describe(device: JSON) -> list[tuple[str, object]]:
    """The label / value lines of `devices show`."""
    position = device.get("position")
    where = None
    if isinstance(position, dict):
        where = f"{position.get('lat')}, {position.get('lon')} at {output.text(position.get('at'))}"
    return [
        ("name", device.get("name")),
        ("model", device.get("model")),
        ("engine", device.get("engine")),
        ("transport", device.get("transport")),
        ("gps", device.get("gps")),
        ("firmware", device.get("firmware_version")),
        ("connection", device.get("connection")),
        ("last seen", device.get("last_seen_at")),
        ("run state", device.get("run_state")),
        ("needs attention", device.get("attention")),
        ("position", where),
        ("customer", device.get("customer_email")),
        ("dealer", device.get("dealer_id")),
        ("test device", device.get("test_device")),
    ]


@app.command("history")
def command_history(
    ctx: typer.Context,
    *,
    device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID", help="Device id.")],
    limit: LimitOption = 20,
    every: AllOption = False,
    fmt: OutputOption = Format.table,
) -> None:
    """A device's commands, newest first (GET /devices/{id}/commands)."""
    with options(ctx).client() as api:
        found = api.device_commands(device_id, limit=None if every else limit)
    output.listing(found, fmt, HISTORY, what="commands")
