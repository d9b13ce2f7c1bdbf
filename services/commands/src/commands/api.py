"""HTTP routes (thin): send a command, read one, read a device's history."""

import asyncio
import base64
import binascii
import contextlib
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from commands import domain, store, waiting
from commands.access import access_device, not_found
from commands.handlers import (
    CommandService,
    IdempotencyMismatchError,
    NewCommand,
    Requester,
    UnknownDeviceError,
)
from common.auth import CurrentPrincipal, Principal
from common.contracts.commands import Action, CommandState
from common.http import ProblemError

router = APIRouter(prefix="/api/v1", tags=["commands"])


class CommandIn(BaseModel):
    """`POST /devices/{id}/commands`."""

    model_config = ConfigDict(extra="forbid")

    action: Action
    params: dict[str, Any] = Field(default_factory=dict)
    ttl_s: int | None = Field(default=None, description="Seconds; limits depend on the action.")


class CommandAccepted(BaseModel):
    """The accepted command (`202`)."""

    id: str
    device_id: str
    action: Action
    status: CommandState
    created_at: AwareDatetime
    expires_at: AwareDatetime


class Transition(BaseModel):
    """One step of a command's lifecycle."""

    status: CommandState
    detail: str | None
    reporter: str
    at: AwareDatetime


class CommandOut(BaseModel):
    """A command and what became of it."""

    id: str
    device_id: str
    action: Action
    params: dict[str, Any]
    status: CommandState
    detail: str | None
    created_at: AwareDatetime
    updated_at: AwareDatetime
    expires_at: AwareDatetime
    requested_by: str
    requested_by_email: str | None
    ota_version: str | None = None
    ota_phase: str | None = None
    progress_pct: float | None = None
    correlation: dict[str, str] = Field(default_factory=dict)
    history: list[Transition] | None = None


class CommandPage(BaseModel):
    """A page of a device's command history, newest first."""

    items: list[CommandOut]
    next_cursor: str | None


def _service(request: Request) -> CommandService:
    service: CommandService = request.app.state.service
    return service


def _reads(request: Request) -> AsyncEngine:
    """The GET routes' engine: autocommit, so a read is its statements alone."""
    engine: AsyncEngine = request.app.state.reads
    return engine


@router.post("/devices/{device_id}/commands", status_code=202, response_model=CommandAccepted)
async def send_command(
    *,
    device_id: str,
    body: CommandIn,
    principal: CurrentPrincipal,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> CommandAccepted:
    """Queue a command for the device; the same Idempotency-Key returns the same command."""
    new = NewCommand(
        device_id=device_id,
        action=body.action,
        params=body.params,
        ttl_s=body.ttl_s,
        idempotency_key=idempotency_key,
    )
    who = Requester(
        user_id=principal.user_id,
        principal=principal,
        email=principal.email,
        token_id=principal.token_id,
    )
    try:
        accepted = await _service(request).accept(new, who)
    except UnknownDeviceError as exc:
        raise not_found(device_id) from exc
    except domain.InvalidCommandError as exc:
        raise _invalid(exc.field, exc.message) from exc
    except domain.CommandConflictError as exc:
        raise ProblemError(409, "Conflict", str(exc)) from exc
    except IdempotencyMismatchError as exc:
        raise _invalid(
            "Idempotency-Key", "this key was already used for a different request"
        ) from exc
    if accepted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    row = accepted.row
    # The answer to a replay is the answer the first request got.
    return CommandAccepted(
        id=row.id,
        device_id=row.device_id,
        action=row.action,
        status="queued",
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


# The longest `Prefer: wait` honoured (a longer one is cut to this): below the API gateway's
# read timeout (nginx: 60 s), so a waiting GET always gets its answer.
MAX_WAIT_S = 30

PREFER_DOC = (
    "`wait=N` (RFC 7240): answer when the command has ended (succeeded, failed, rejected or "
    f"expired) or after N seconds (at most {MAX_WAIT_S}), whichever comes first, instead of "
    "at once; the answer carries `Preference-Applied: wait=N`. Other preferences are ignored."
)


def preferred_wait(prefer: str | None) -> int | None:
    """The `wait=N` of a Prefer header, cut to MAX_WAIT_S; None without one. A value that is
    not delta-seconds is ignored, as RFC 7240 asks of preferences a server cannot read."""
    for item in (prefer or "").split(","):
        name, _, value = item.split(";", 1)[0].partition("=")
        if name.strip().lower() == "wait":
            value = value.strip().strip('"')
            return min(int(value), MAX_WAIT_S) if value.isdigit() else None
    return None


async def _visible_view(
    request: Request, principal: Principal, command_id: str
) -> store.CommandView:
    async with _reads(request).connect() as conn:
        view = await store.command_view(conn, command_id)
    if view is None or view.device is None:
        raise ProblemError(404, "Not found", f"no command {command_id!r}")
    try:
        access_device(principal, view.device, view.row.device_id, "read")
    except ProblemError as exc:
        raise ProblemError(404, "Not found", f"no command {command_id!r}") from exc
    return view


@router.get("/commands/{command_id}", response_model=CommandOut)
async def get_command(
    command_id: str,
    principal: CurrentPrincipal,
    request: Request,
    response: Response,
    prefer: Annotated[str | None, Header(description=PREFER_DOC)] = None,
) -> CommandOut:
    """One command with its history; with `Prefer: wait=N`, once it has ended (or N s)."""
    wait_s = preferred_wait(prefer)
    waiters: waiting.Waiters = request.app.state.waiters
    # Watching starts before the first read, so a change committed in between still wakes us.
    with waiters.watching(command_id) if wait_s else contextlib.nullcontext() as changed:
        view = await _visible_view(request, principal, command_id)
        if changed is not None and wait_s is not None:
            response.headers["Preference-Applied"] = f"wait={wait_s}"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            while (
                view.row.status not in domain.TERMINAL
                and loop.time() < deadline
                and not waiters.stopping
            ):
                await waiting.wait_for_change(changed, deadline - loop.time())
                changed.clear()
                view = await _visible_view(request, principal, command_id)
    out = _out(view.row)
    out.history = [
        Transition(status=s.status, detail=s.detail, reporter=s.reporter, at=s.at)
        for s in view.history
    ]
    return out


@router.get("/devices/{device_id}/commands", response_model=CommandPage)
async def list_commands(
    device_id: str,
    principal: CurrentPrincipal,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> CommandPage:
    """The device's command history, newest first."""
    after = _decode_cursor(cursor) if cursor else None
    async with _reads(request).connect() as conn:
        device = await store.get_device(conn, device_id)
        access_device(principal, device, device_id, "read")
        rows = await store.list_for_device(conn, device_id, limit=limit + 1, after=after)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return CommandPage(items=[_out(r) for r in rows], next_cursor=next_cursor)


def _out(row: Row[Any]) -> CommandOut:
    return CommandOut(
        id=row.id,
        device_id=row.device_id,
        action=row.action,
        params=dict(row.params),
        status=row.status,
        detail=row.detail,
        created_at=row.created_at,
        updated_at=row.updated_at,
        expires_at=row.expires_at,
        requested_by=row.requested_by,
        requested_by_email=row.requested_by_email,
        ota_version=row.ota_version,
        ota_phase=row.ota_phase,
        progress_pct=row.ota_progress,
        correlation=dict(row.correlation or {}),
    )


def _invalid(field: str, message: str) -> ProblemError:
    return ProblemError(
        422,
        "Invalid request",
        f"{field}: {message}",
        errors=[{"field": field, "message": message}],
    )


def _encode_cursor(created_at: datetime, command_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), command_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, command_id = json.loads(raw)
        at = datetime.fromisoformat(created)
        if at.tzinfo is None or not isinstance(command_id, str):
            raise ValueError("bad cursor")
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
        raise _invalid("cursor", "not a cursor this API returned") from exc
    return at, command_id
