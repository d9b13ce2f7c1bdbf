"""`autogen commands`: send a command to a device and wait for its result."""

import json
import time
from enum import StrEnum
from typing import Annotated

import typer

from autogen_cli import output
from autogen_cli.client import JSON, Client
from autogen_cli.context import Exit, options
from autogen_cli.output import Format, OutputOption

app = typer.Typer(help="Send commands to devices and follow them.", no_args_is_help=True)

FINAL = {"succeeded", "failed", "expired"}


class Action(StrEnum):
    """What a device can be told to do (API.md, commands service)."""

    start = "start"
    stop = "stop"
    reboot = "reboot"
    fw_update = "fw_update"
    force_ota = "force_ota"
    set_setting = "set_setting"


TimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout", "-t", min=1, help="Seconds to wait for a final status (with --wait)."
    ),
]
IntervalOption = Annotated[
    float,
    typer.Option(
        "--interval",
        min=0.2,
        help="Longest time between status updates while waiting (at least 1 s against an API "
        "that answers when the command ends; the final status shows at once).",
    ),
]
# The longest single wait asked of the API: well within the client's HTTP timeout.
MAX_WAIT_S = 10


def parse_params(pairs: list[str]) -> JSON:
    """`key=value` pairs as a params object; values read as JSON when they are (30, true)."""
    params: JSON = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--param")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


@app.command("send")
def send(
    ctx: typer.Context,
    *,
    device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID", help="Device id, e.g. AG10000.")],
    action: Annotated[Action, typer.Argument(metavar="ACTION", help="What the device should do.")],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            metavar="KEY=VALUE",
            help="Parameter as key=value (repeatable; JSON values like 30 or true are typed). "
            "set_setting: -p key=telemetry_interval_s -p value=60.",
        ),
    ] = None,
    release: Annotated[
        str | None,
        typer.Option("--release", "-r", help="fw_update / force_ota: the release id to apply."),
    ] = None,
    ttl_s: Annotated[
        int | None, typer.Option("--ttl", min=1, help="Seconds the command stays deliverable.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Retry-safe key: the same key, the same command."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait for the final status; exit code tells it.")
    ] = False,
    timeout_s: TimeoutOption = 60.0,
    interval_s: IntervalOption = 0.5,
    fmt: OutputOption = Format.table,
) -> None:
    """Send a command to a device (POST /devices/{id}/commands).

    Without --wait it prints the queued command. With --wait it follows the command until it
    succeeded (exit 0), failed or expired (exit 4), or --timeout passed (exit 5; the command
    goes on and `autogen commands wait ID` picks it up again).
    """
    params = parse_params(param or [])
    if release:
        params["release_id"] = release
    with options(ctx).client() as api:
        queued = api.send_command(
            device_id, action.value, params, ttl_s=ttl_s, idempotency_key=idempotency_key
        )
        if not wait:
            _print(queued, fmt)
            return
        output.note(f"Command {queued.get('id')} queued; waiting up to {timeout_s:g}s.")
        _wait(api, str(queued.get("id")), timeout_s, interval_s, fmt)


@app.command("wait")
def wait_for(
    ctx: typer.Context,
    *,
    command_id: Annotated[str, typer.Argument(metavar="COMMAND_ID", help="Command id.")],
    timeout_s: TimeoutOption = 60.0,
    interval_s: IntervalOption = 0.5,
    fmt: OutputOption = Format.table,
) -> None:
    """Wait for a command's final status: exit 0 succeeded, 4 failed/expired, 5 timeout."""
    with options(ctx).client() as api:
        _wait(api, command_id, timeout_s, interval_s, fmt)


@app.command("show")
def show(
    ctx: typer.Context,
    *,
    command_id: Annotated[str, typer.Argument(metavar="COMMAND_ID", help="Command id.")],
    fmt: OutputOption = Format.table,
) -> None:
    """Show one command and its status (GET /commands/{id})."""
    with options(ctx).client() as api:
        _print(api.command(command_id), fmt)


def _wait(api: Client, command_id: str, timeout_s: float, interval_s: float, fmt: Format) -> None:
    """Follow until final or deadline, then print the command and exit with its outcome.

    Each GET asks the API to answer when the command ends (`Prefer: wait`), so the outcome
    shows at once and the spinner still gets the status in between. An API that answers at
    once without a final status (one that does not honour the preference) is polled every
    `interval_s` instead."""
    deadline = time.monotonic() + timeout_s
    chunk_s = max(1, min(MAX_WAIT_S, int(interval_s)))
    try:
        with output.stderr().status(f"Command {command_id}: queued") as spinner:
            while True:
                left = deadline - time.monotonic()
                asked = time.monotonic()
                current = api.command(command_id, wait_s=min(chunk_s, max(1, int(left))))
                status = str(current.get("status"))
                spinner.update(f"Command {command_id}: {status}")
                if status in FINAL or time.monotonic() >= deadline:
                    break
                if time.monotonic() - asked < chunk_s / 2:  # it did not wait
                    time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        output.note(f"Stopped waiting; the command goes on: autogen commands wait {command_id}")
        raise typer.Exit(Exit.INTERRUPTED) from None
    _print(current, fmt)
    if status == "succeeded":
        return
    if status in FINAL:
        output.show_error(f"the command {status}: {current.get('detail') or 'no detail'}")
        raise typer.Exit(Exit.OUTCOME)
    output.show_error(
        f"still {status} after {timeout_s:g}s; it goes on: autogen commands wait {command_id}"
    )
    raise typer.Exit(Exit.TIMEOUT)


def _print(command: JSON, fmt: Format) -> None:
    if fmt is Format.json:
        output.print_json(command)
        return
    progress = command.get("progress_pct")
    output.details(
        [
            ("id", command.get("id")),
            ("device", command.get("device_id")),
            ("action", command.get("action")),
            ("params", command.get("params") or None),
            ("status", command.get("status")),
            ("detail", command.get("detail")),
            ("ota", _ota(command, progress)),
            ("created", command.get("created_at")),
            ("updated", command.get("updated_at")),
            ("expires", command.get("expires_at")),
        ],
        title=f"Command {command.get('id')}",
    )


def _ota(command: JSON, progress: object) -> str | None:
    phase = command.get("ota_phase")
    if not phase:
        return None
    pct = f" {progress:g}%" if isinstance(progress, int | float) else ""
    return f"{command.get('ota_version') or ''} {phase}{pct}".strip()
