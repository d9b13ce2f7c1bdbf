"""The gateway's use cases: device credentials and command delivery (one transaction each)."""

import asyncio
import logging
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.contracts import commands
from common.events import Envelope, new_event
from common.idempotency import first_deliveries, forget_deliveries
from common.outbox import OutboxEvent, add_events, outbox_event
from gateway import protocol, store
from gateway.bridge import SOURCE, Bridge
from gateway.dynsec import DynsecAdmin

logger = logging.getLogger(__name__)
DISPATCH_CONSUMER = "gateway.dispatch"
# Delivery is remembered per command id (not per event id): a command dispatched twice, by a
# redelivery or a retry upstream, reaches the device once.
_COMMAND_NS = uuid.UUID("0b5c8a39-5d1e-4c52-9a6c-6f1d2a6c9e01")


@dataclass(frozen=True)
class IssuedCredentials:
    """A device's broker account with its new password (shown once, stored nowhere)."""

    device_id: str
    username: str
    client_id: str
    password: str


@dataclass(frozen=True)
class CredentialsState:
    """Whether a device holds broker credentials, and when they last changed."""

    device_id: str
    exists: bool
    rotated_at: datetime | None


async def issue_credentials(
    *, sessions: async_sessionmaker[AsyncSession], admin: DynsecAdmin, device_id: str
) -> IssuedCredentials:
    """Create the device's broker account, or rotate its password; returns the new password."""
    password = secrets.token_urlsafe(24)
    await admin.ensure_device(device_id, password)
    async with sessions.begin() as session:
        await store.record_issued(session, device_id, datetime.now(UTC))
    return IssuedCredentials(device_id, device_id, device_id, password)


async def revoke_credentials(
    *, sessions: async_sessionmaker[AsyncSession], admin: DynsecAdmin, device_id: str
) -> None:
    """Remove the device's broker account; the broker disconnects it at once."""
    await admin.remove_device(device_id)
    async with sessions.begin() as session:
        await store.record_revoked(session, device_id, datetime.now(UTC))


async def credentials_state(
    *, sessions: async_sessionmaker[AsyncSession], device_id: str
) -> CredentialsState:
    """What the gateway knows about a device's credentials."""
    async with sessions.begin() as session:
        found = await store.credentials_of(session, device_id)
    if found is None:
        return CredentialsState(device_id, exists=False, rotated_at=None)
    rotated_at, revoked_at = found
    return CredentialsState(device_id, exists=revoked_at is None, rotated_at=rotated_at)


async def deliver_commands(
    *,
    sessions: async_sessionmaker[AsyncSession],
    bridge: Bridge,
    events: Sequence[Envelope[commands.CommandDispatch]],
    traceparents: Mapping[str, str] | None = None,
    topic: str = commands.DISPATCH.name,
) -> dict[str, str]:
    """Send each dispatched command to its device once, or report it expired; returns the
    outcome per command id.

    One transaction for a poll of dispatches: the delivery records of all of them in one
    statement (a replica recording the same command waits for this commit, then finds it
    delivered), the publishes at once (their PUBACKs overlap), and the `sent`/`expired`
    statuses in one statement, committed with the records after the broker acknowledged the
    publishes. A publish that failed has its record taken back before the commit and raises
    afterwards (ConnectionError when the broker cannot be reached), so the batch is read again
    and only that command is sent again. `traceparents` (by event id) are the records' trace
    contexts: each command is published in its own trace.
    """
    traceparents = traceparents or {}
    first: dict[str, Envelope[commands.CommandDispatch]] = {}
    for event in events:
        first.setdefault(event.data.command_id, event)  # the same command twice: once
    marks = {cid: uuid.uuid5(_COMMAND_NS, cid) for cid in first}
    now = datetime.now(UTC)
    outcomes = dict.fromkeys(first, "duplicate")
    async with sessions.begin() as session:
        fresh = await first_deliveries(
            session, store.processed_events, consumer=DISPATCH_CONSUMER, event_ids=marks.values()
        )
        todo = [e for cid, e in first.items() if marks[cid] in fresh]
        results = await asyncio.gather(
            *(_deliver(bridge, e, now, traceparents.get(str(e.event_id)), topic) for e in todo),
            return_exceptions=True,
        )
        statuses: list[OutboxEvent] = []
        failures: list[BaseException] = []
        for event, result in zip(todo, results, strict=True):
            command_id = event.data.command_id
            if isinstance(result, BaseException):
                failures.append(result)
                del outcomes[command_id]
            else:
                outcomes[command_id], status = result
                statuses.append(status)
        await forget_deliveries(
            session,
            store.processed_events,
            consumer=DISPATCH_CONSUMER,
            event_ids=[marks[cid] for cid in first if cid not in outcomes],
        )
        await add_events(session, store.outbox, statuses)
    for command_id, outcome in outcomes.items():
        logger.info(
            "command handled",
            extra={
                "command_id": command_id,
                "device_id": first[command_id].data.device_id,
                "outcome": outcome,
            },
        )
    if failures:
        raise next((f for f in failures if not isinstance(f, ConnectionError)), failures[0])
    return outcomes


async def _deliver(
    bridge: Bridge,
    event: Envelope[commands.CommandDispatch],
    now: datetime,
    traceparent: str | None,
    topic: str,
) -> tuple[str, OutboxEvent]:
    """Publish one command (or find it expired) in its record's trace; its status event."""
    command = event.data
    with bridge.traces.consuming(f"{topic} process", traceparent):
        if protocol.is_expired(command, now):
            outcome, detail = "expired", "expired before the gateway could send it"
        else:
            await bridge.publish_command(
                command.device_id,
                protocol.command_payload(command),
                expires_at=command.expires_at,
                command_id=command.command_id,
            )
            outcome, detail = "sent", None
        status = commands.CommandStatus(
            command_id=command.command_id,
            device_id=command.device_id,
            action=command.action,
            status=outcome,
            detail=detail,
            at=datetime.now(UTC),
            reporter="gateway",
        )
        # Made here, so it carries the command's trace context.
        return outcome, outbox_event(
            commands.STATUS,
            new_event(
                type=commands.STATUS.event_type, data=status, source=SOURCE, key=command.device_id
            ),
        )
