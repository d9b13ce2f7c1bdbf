"""The gateway's use cases: device credentials and command delivery (one transaction each)."""

import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.contracts import commands
from common.events import Envelope, new_event
from common.idempotency import first_delivery
from common.outbox import add_event
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


async def deliver_command(
    *,
    sessions: async_sessionmaker[AsyncSession],
    bridge: Bridge,
    event: Envelope[commands.CommandDispatch],
) -> str:
    """Send a dispatched command to its device once, or report it expired; returns the outcome.

    The delivery record and the `sent` status commit together after the broker acknowledged the
    publish; a broker that cannot be reached raises ConnectionError and the record is read again.
    """
    command = event.data
    now = datetime.now(UTC)
    async with sessions.begin() as session:
        if not await first_delivery(
            session,
            store.processed_events,
            consumer=DISPATCH_CONSUMER,
            event_id=uuid.uuid5(_COMMAND_NS, command.command_id),
        ):
            return "duplicate"
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
        await add_event(
            session,
            store.outbox,
            commands.STATUS,
            new_event(
                type=commands.STATUS.event_type, data=status, source=SOURCE, key=command.device_id
            ),
        )
    logger.info(
        "command handled",
        extra={
            "command_id": command.command_id,
            "device_id": command.device_id,
            "outcome": outcome,
        },
    )
    return outcome
