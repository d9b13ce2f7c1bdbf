"""Writing lifecycle steps: the rows, their transitions with time and reporter, and their status
events through the outbox, all in the caller's transaction; counted once the transaction commits.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

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
# commands it ended, whose waiting readers are woken then.
_MOVES = "commands.moves"
_ENDED = "commands.ended"


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for action, status in session.info.pop(_MOVES, ()):
        TRANSITIONS.labels(action, status).inc()
    ended = session.info.pop(_ENDED, None)
    if ended:
        waiting.committed(ended)


@event.listens_for(Session, "after_transaction_end")
def _forget_rolled_back(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_MOVES, None)
        session.info.pop(_ENDED, None)


@dataclass
class Writes:
    """A transaction's lifecycle writes, kept in order in memory and written by `flush` in one
    statement whatever their number (the rows, the transitions, the events): a batch of reports
    cost three or four statements per change before, and round trips to PostgreSQL were most
    of this service's CPU. A command changed twice is written once, in its last state."""

    _rows: dict[str, tuple[domain.Command, datetime]] = field(default_factory=dict)
    _transitions: list[store.TransitionRow] = field(default_factory=list)
    _events: list[OutboxEvent] = field(default_factory=list)
    _owners: list[str | None] = field(default_factory=list)  # the command of each event
    _moves: list[tuple[str, str, str]] = field(default_factory=list)  # id, action, status

    @property
    def staged(self) -> bool:
        """Whether a command's change waits to be written."""
        return bool(self._rows)

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
        self.event(contract.STATUS, evt, of=cmd.id)
        self._moves.append((cmd.id, cmd.action, cmd.status))

    def event(self, topic: Topic[DataT], evt: Envelope[DataT], *, of: str | None = None) -> None:
        """Stage another event (in order with the status events), of command `of`."""
        self._events.append(outbox_event(topic, evt))
        self._owners.append(of)

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
        staged = self._take()
        if insert is None and not (staged.rows or staged.steps or staged.events):
            return None
        events = staged_insert(session, store.outbox, staged.events) if staged.events else None
        # On the session's driver connection, in its transaction (`store.driver`).
        on = await store.driver(session, begin=begin)
        row = await store.write(on, list(staged.rows.values()), staged.steps, events, insert=insert)
        _on_commit(session, staged.moves)
        return row

    async def flush_unchanged(
        self, session: AsyncSession, read_versions: Mapping[str, int]
    ) -> set[str]:
        """Write what was staged for commands read without a lock, without a transaction (one
        statement, see `store.write_unchanged`), only if no one wrote them since they were read
        (`read_versions`); returns the ids that were not written."""
        staged = self._take()
        if not staged.rows:
            return set()
        owners = [owner for owner in staged.owners if owner is not None]
        if len(owners) != len(staged.events):
            raise ValueError("every event of an unlocked write must be of a command")
        events = (
            staged_insert(session, store.outbox, staged.events, owned=("saved", owners))
            if staged.events
            else None
        )
        on = await store.driver(session, begin=False)
        rows = list(staged.rows.values())
        saved = await store.write_unchanged(on, rows, staged.steps, events, read_versions)
        _on_commit(session, [move for move in staged.moves if move[0] in saved])
        return set(staged.rows) - saved

    def _take(self) -> "_Staged":
        staged = _Staged(self._rows, self._transitions, self._events, self._owners, self._moves)
        self._rows, self._transitions, self._events, self._owners, self._moves = {}, [], [], [], []
        return staged


class _Staged(NamedTuple):
    rows: dict[str, tuple[domain.Command, datetime]]
    steps: list[store.TransitionRow]
    events: list[OutboxEvent]
    owners: list[str | None]
    moves: list[tuple[str, str, str]]


def _on_commit(session: AsyncSession, moves: list[tuple[str, str, str]]) -> None:
    """Count `moves` (id, action, status), and wake the waiting readers of the commands they
    ended, once the session commits. A reader waits for the end only: a wake-up for `acked`
    cost it a read that answered nothing."""
    session.info.setdefault(_MOVES, []).extend((action, status) for _, action, status in moves)
    ended = {cid for cid, _, status in moves if status in domain.TERMINAL}
    session.info.setdefault(_ENDED, set()).update(ended)
