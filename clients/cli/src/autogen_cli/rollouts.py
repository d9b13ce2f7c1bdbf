"""`autogen rollouts`: deploy a release, follow it live, pause, resume, clear."""

from enum import StrEnum
from typing import Annotated

import typer

from autogen_cli import output
from autogen_cli.client import JSON, Client, RolloutAction
from autogen_cli.context import Exit, options
from autogen_cli.follow import follow, summary
from autogen_cli.output import AllOption, Column, Format, LimitOption, OutputOption
from autogen_cli.releases import Transport

app = typer.Typer(
    help="Deploy firmware rollouts and watch, pause, resume or clear them.", no_args_is_help=True
)

RolloutId = Annotated[str, typer.Argument(metavar="ROLLOUT_ID", help="Rollout id, e.g. ro-1a2b3c.")]
TimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout", "-t", min=0, help="Stop following after this many seconds (0: no limit)."
    ),
]
IntervalOption = Annotated[
    float, typer.Option("--interval", min=0.2, help="Seconds between progress checks.")
]
StopOnPauseOption = Annotated[
    bool,
    typer.Option(
        "--stop-on-pause",
        help="Stop following (exit 4) when the rollout pauses, e.g. at its failure threshold.",
    ),
]


class Scope(StrEnum):
    """Whose devices: the caller's fleet, or every dealer's (admins)."""

    my_fleet = "my_fleet"
    global_ = "global"


class Status(StrEnum):
    """Rollout states."""

    running = "running"
    paused = "paused"
    cleared = "cleared"
    completed = "completed"


class DeviceState(StrEnum):
    """A device's state within a rollout."""

    pending = "pending"
    sent = "sent"
    updating = "updating"
    awaiting_return = "awaiting_return"
    confirmed = "confirmed"
    failed = "failed"
    cancelled = "cancelled"


def _release_of(rollout: JSON) -> JSON:
    release = rollout.get("release")
    return release if isinstance(release, dict) else {}


def _release(r: JSON) -> str:
    release = _release_of(r)
    return f"{release.get('console')} {release.get('version')}"


COLUMNS: list[Column] = [
    ("id", lambda r: r.get("id")),
    ("release", _release),
    ("scope", lambda r: r.get("scope")),
    ("status", lambda r: r.get("status")),
    ("progress", summary),
    ("created", lambda r: r.get("created_at")),
]
DEVICE_COLUMNS: list[Column] = [
    ("device", lambda d: d.get("device_id")),
    ("state", lambda d: d.get("state")),
    ("attempts", lambda d: d.get("attempts")),
    ("reported version", lambda d: d.get("reported_version")),
    ("last report", lambda d: d.get("last_report")),
    ("detail", lambda d: d.get("detail")),
    ("updated", lambda d: d.get("updated_at")),
]


@app.command("deploy")
def deploy(
    ctx: typer.Context,
    *,
    release_id: Annotated[
        str,
        typer.Argument(metavar="RELEASE_ID", help="The release to roll out (see releases list)."),
    ],
    scope: Annotated[
        Scope, typer.Option("--scope", help="my_fleet, or global (admins only).")
    ] = Scope.my_fleet,
    models: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", metavar="MODEL", help="Target model (repeatable)."),
    ] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="Target engine.")] = None,
    transport: Annotated[
        Transport | None, typer.Option("--transport", help="Target transport.")
    ] = None,
    device_ids: Annotated[
        list[str] | None,
        typer.Option(
            "--device", "-d", metavar="DEVICE_ID", help="Only these devices (repeatable)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="OTAs in flight at once, at most.")
    ] = None,
    max_per_minute: Annotated[
        int | None, typer.Option("--max-per-minute", min=1, help="Dispatch pace.")
    ] = None,
    failure_threshold_pct: Annotated[
        float | None,
        typer.Option(
            "--failure-threshold", min=0, max=100, help="Pause when failed % of finished exceeds."
        ),
    ] = None,
    dealer_id: Annotated[
        str | None, typer.Option("--dealer", help="Admins: whose fleet a my_fleet rollout is for.")
    ] = None,
    override_reason: Annotated[
        str | None,
        typer.Option("--override", help="Admins: deploy without a validation, giving the reason."),
    ] = None,
    supersede: Annotated[
        bool, typer.Option("--supersede", help="Admins: take over devices of another rollout.")
    ] = False,
    follow_it: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Follow with a live progress bar.")
    ] = True,
    timeout_s: TimeoutOption = 0,
    interval_s: IntervalOption = 2.0,
    stop_on_pause: StopOnPauseOption = False,
    fmt: OutputOption = Format.table,
) -> None:
    """Deploy a release as a rollout (POST /rollouts) and follow it until it ends.

    Following exits 0 when the rollout completed with no failed device, 4 when it completed
    with failures or was cleared (or paused, with --stop-on-pause), 5 at --timeout. Ctrl-C
    stops following only: the rollout goes on.
    """
    target: JSON = {"models": models or None, "engine": engine, "device_ids": device_ids or None}
    target["transport"] = transport.value if transport else None
    strategy = {
        "batch_size": batch_size,
        "max_per_minute": max_per_minute,
        "failure_threshold_pct": failure_threshold_pct,
    }
    body: JSON = {
        "release_id": release_id,
        "scope": scope.value,
        "target": {k: v for k, v in target.items() if v is not None},
        "strategy": {k: v for k, v in strategy.items() if v is not None},
    }
    if dealer_id:
        body["dealer_id"] = dealer_id
    if override_reason:
        body |= {"override": True, "override_reason": override_reason}
    if supersede:
        body["supersede"] = True
    with options(ctx).client() as api:
        created = api.create_rollout(body)
        if not follow_it:
            _print(created, fmt)
            return
        output.note(f"Rollout {created['id']} started; following (Ctrl-C stops following only).")
        _follow(
            api,
            str(created["id"]),
            timeout_s=timeout_s,
            interval_s=interval_s,
            stop_on_pause=stop_on_pause,
            fmt=fmt,
        )


@app.command("follow")
def follow_rollout(
    ctx: typer.Context,
    *,
    rollout_id: RolloutId,
    timeout_s: TimeoutOption = 0,
    interval_s: IntervalOption = 2.0,
    stop_on_pause: StopOnPauseOption = False,
    fmt: OutputOption = Format.table,
) -> None:
    """Follow a rollout with a live progress bar until it completes or is cleared."""
    with options(ctx).client() as api:
        _follow(
            api,
            rollout_id,
            timeout_s=timeout_s,
            interval_s=interval_s,
            stop_on_pause=stop_on_pause,
            fmt=fmt,
        )


def _follow(
    api: Client,
    rollout_id: str,
    *,
    timeout_s: float,
    interval_s: float,
    stop_on_pause: bool,
    fmt: Format,
) -> None:
    try:
        ended = follow(
            api,
            rollout_id,
            timeout_s=timeout_s or None,
            interval_s=interval_s,
            stop_on_pause=stop_on_pause,
        )
    except KeyboardInterrupt:
        output.note(f"Stopped following; the rollout goes on: autogen rollouts follow {rollout_id}")
        raise typer.Exit(Exit.INTERRUPTED) from None
    _print(ended.rollout, fmt)
    if ended.code is Exit.OK:
        output.note(ended.message)
        return
    output.show_error(ended.message)
    raise typer.Exit(ended.code)


@app.command("list")
def list_rollouts(
    ctx: typer.Context,
    *,
    status: Annotated[
        Status | None, typer.Option("--status", "-s", help="Only this state.")
    ] = None,
    limit: LimitOption = 50,
    every: AllOption = False,
    fmt: OutputOption = Format.table,
) -> None:
    """List rollouts in your scope, newest first (GET /rollouts)."""
    with options(ctx).client() as api:
        found = api.rollouts(
            status=status.value if status else None, limit=None if every else limit
        )
    output.listing(found, fmt, COLUMNS, what="rollouts")


@app.command("show")
def show(ctx: typer.Context, rollout_id: RolloutId, fmt: OutputOption = Format.table) -> None:
    """Show one rollout: release, target, strategy, state and device counts."""
    with options(ctx).client() as api:
        _print(api.rollout(rollout_id), fmt)


@app.command("devices")
def devices(
    ctx: typer.Context,
    *,
    rollout_id: RolloutId,
    state: Annotated[
        DeviceState | None, typer.Option("--state", help="Only devices in this state.")
    ] = None,
    limit: LimitOption = 50,
    every: AllOption = False,
    fmt: OutputOption = Format.table,
) -> None:
    """Per-device state of a rollout: attempts, last report, reported version."""
    with options(ctx).client() as api:
        found = api.rollout_devices(
            rollout_id, state=state.value if state else None, limit=None if every else limit
        )
    output.listing(found, fmt, DEVICE_COLUMNS, what="devices")


def _act(ctx: typer.Context, rollout_id: str, action: RolloutAction, fmt: Format) -> None:
    with options(ctx).client() as api:
        changed = api.act_on_rollout(rollout_id, action)
    if fmt is Format.json:
        output.print_json(changed)
        return
    output.note(f"Rollout {rollout_id}: {changed.get('status')}.")


@app.command("pause")
def pause(ctx: typer.Context, rollout_id: RolloutId, fmt: OutputOption = Format.table) -> None:
    """Pause: no new dispatches; devices already updating finish."""
    _act(ctx, rollout_id, "pause", fmt)


@app.command("resume")
def resume(ctx: typer.Context, rollout_id: RolloutId, fmt: OutputOption = Format.table) -> None:
    """Resume a paused rollout."""
    _act(ctx, rollout_id, "resume", fmt)


@app.command("clear")
def clear(ctx: typer.Context, rollout_id: RolloutId, fmt: OutputOption = Format.table) -> None:
    """Clear: cancel everything not yet sent and end the rollout."""
    _act(ctx, rollout_id, "clear", fmt)


def _print(rollout: JSON, fmt: Format) -> None:
    if fmt is Format.json:
        output.print_json(rollout)
        return
    release = _release_of(rollout)
    output.details(
        [
            ("release", f"{_release(rollout)} ({release.get('id')})"),
            ("scope", rollout.get("scope")),
            ("dealer", rollout.get("dealer_id")),
            ("status", rollout.get("status")),
            ("reason", rollout.get("status_reason")),
            ("progress", summary(rollout)),
            ("skipped", rollout.get("skipped")),
            ("target", rollout.get("target")),
            ("strategy", rollout.get("strategy")),
            ("override", rollout.get("override_reason")),
            ("created", rollout.get("created_at")),
            ("finished", rollout.get("finished_at")),
        ],
        title=f"Rollout {rollout.get('id')}",
    )
