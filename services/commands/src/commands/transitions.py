"""Writing a lifecycle step: the row, its transition with time and reporter, and its status
event through the outbox, all in the caller's transaction; counted once the transaction commits.
"""

from datetime import datetime

from prometheus_client import Counter, Gauge
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from commands import domain, store
from common.contracts import commands as contract
from common.contracts.commands import CommandStatus
from common.events import new_event
from common.outbox import add_event

SOURCE = "commands"

TRANSITIONS = Counter(
    "autogen_commands_transitions_total",
    "Command lifecycle transitions committed, by action and the status entered.",
    ["action", "status"],
)
ACTIVE = Gauge(
    "autogen_commands_active",
    "Commands on their way (queued, sent, acked) by status, refreshed every few seconds.",
    ["status"],
)
# Session.info key: transitions of the open transaction, counted when (if) it commits.
_MOVES = "commands.moves"


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for action, status in session.info.pop(_MOVES, ()):
        TRANSITIONS.labels(action, status).inc()


@event.listens_for(Session, "after_transaction_end")
def _forget_rolled_back(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_MOVES, None)


async def record(session: AsyncSession, cmd: domain.Command, by: str, at: datetime) -> None:
    """Store `cmd`'s current status as a transition and publish it on `command.status.v1`."""
    await store.add_transition(
        session, cmd.id, status=cmd.status, detail=cmd.detail, reporter=by, at=at
    )
    status = CommandStatus(
        command_id=cmd.id,
        device_id=cmd.device_id,
        action=cmd.action,
        status=cmd.status,
        detail=cmd.detail,
        at=at,
        reporter="commands",
        correlation=cmd.correlation,
    )
    evt = new_event(type=contract.STATUS.event_type, data=status, source=SOURCE, key=cmd.device_id)
    await add_event(session, store.outbox, contract.STATUS, evt)
    session.info.setdefault(_MOVES, []).append((cmd.action, cmd.status))


async def apply(
    session: AsyncSession, change: domain.Change | None, by: str, now: datetime
) -> domain.Command | None:
    """Write `change` (a transition too if the status moved); returns the new command."""
    if change is None:
        return None
    await store.save(session, change.command, now)
    if change.moved:
        await record(session, change.command, by, now)
    return change.command
