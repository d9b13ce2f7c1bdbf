"""Writing lifecycle steps: the rows, their transitions with time and reporter, and their status
events through the outbox, all in the caller's transaction; counted once the transaction commits.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from commands import domain, store, waiting
from common.contracts import commands as contract
from common.contracts.commands import CommandStatus
from common.contracts.topic import Topic
from common.events import DataT, Envelope, new_event
from common.outbox import OutboxEvent, outbox_event, staged_insert

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
# Session.info keys: transitions of the open transaction, counted when (if) it commits, and the
# commands it wrote, whose waiting readers are woken then.
_MOVES = "commands.moves"
_CHANGED = "commands.changed"


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for action, status in session.info.pop(_MOVES, ()):
        TRANSITIONS.labels(action, status).inc()
    changed = session.info.pop(_CHANGED, None)
    if changed:
        waiting.committed(changed)


@event.listens_for(Session, "after_transaction_end")
def _forget_rolled_back(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_MOVES, None)
        session.info.pop(_CHANGED, None)


@dataclass
class Writes:
    """A transaction's lifecycle writes, kept in order in memory and written by `flush` in one
    statement whatever their number (the rows, the transitions, the events): a batch of reports
    cost three or four statements per change before, and round trips to PostgreSQL were most
    of this service's CPU. A command changed twice is written once, in its last state."""

    _rows: dict[str, tuple[domain.Command, datetime]] = field(default_factory=dict)
    _transitions: list[store.TransitionRow] = field(default_factory=list)
    _events: list[OutboxEvent] = field(default_factory=list)
    _moves: list[tuple[str, str]] = field(default_factory=list)

    def apply(self, change: domain.Change | None, by: str, now: datetime) -> domain.Command | None:
        """Stage `change` (a transition too if the status moved); returns the new command."""
        if change is None:
            return None
        cmd = change.command
        self._rows[cmd.id] = (cmd, now)
        if change.moved:
            self.record(cmd, by, now)
        return cmd

    def record(self, cmd: domain.Command, by: str, at: datetime) -> None:
        """Stage `cmd`'s current status as a transition and its `command.status.v1` event (made
        now, so it carries the current trace context)."""
        self._transitions.append(store.TransitionRow(cmd.id, cmd.status, cmd.detail, by, at))
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
        evt = new_event(
            type=contract.STATUS.event_type, data=status, source=SOURCE, key=cmd.device_id
        )
        self.event(contract.STATUS, evt)
        self._moves.append((cmd.action, cmd.status))

    def event(self, topic: Topic[DataT], evt: Envelope[DataT]) -> None:
        """Stage another event (in order with the status events)."""
        self._events.append(outbox_event(topic, evt))

    async def flush(
        self,
        session: AsyncSession,
        *,
        insert: Mapping[str, Any] | None = None,
        begin: bool = True,
    ) -> store.Fetched | None:
        """Write what was staged, in the caller's transaction; counted once it commits. With
        `insert`, the values of a new command the staged steps are about: inserted in the same
        statement, its row returned. `begin=False`: the session has no transaction on purpose
        (`store.driver`), the one statement commits on its own, still counted by the session's
        commit."""
        rows, self._rows = self._rows, {}
        steps, self._transitions = self._transitions, []
        events, self._events = self._events, []
        moves, self._moves = self._moves, []
        if insert is None and not (rows or steps or events):
            return None
        staged = staged_insert(session, store.outbox, events) if events else None
        # On the session's driver connection, in its transaction (`store.driver`).
        on = await store.driver(session, begin=begin)
        row = await store.write(on, list(rows.values()), steps, staged, insert=insert)
        session.info.setdefault(_MOVES, []).extend(moves)
        session.info.setdefault(_CHANGED, set()).update(rows)
        return row
