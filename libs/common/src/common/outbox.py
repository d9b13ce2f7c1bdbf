"""Transactional outbox: events are written with the state change, a relay publishes them.

`add_event()` inserts the encoded envelope into the service's `outbox` table inside the caller's
transaction, together with the current trace context (`add_events()`: several in one statement).
`OutboxRelay` claims unpublished rows in id order (one statement takes the lock, marks them
published and returns them), publishes them with an idempotent acks=all producer, waits for
every ack, and only then commits the mark. A crash or error before that commit rolls the mark
back, so the rows are published again: consumers see a duplicate (same `event_id`), never a gap.
One relay per database publishes at a time (a transaction-scoped advisory lock), which keeps the
order across replicas of the service.

The relay polls every `poll_interval_s`. A table made with `outbox_table(..., wake_relay=True)`
also wakes it as soon as a transaction that added events commits: the relays of this process
at once (a session `after_commit` hook), and the relays of other processes on the same database
through PostgreSQL `NOTIFY` (sent by the transaction, so delivered only if it commits; the
relay `LISTEN`s on a connection of its own). A lost wake-up costs one poll interval, never an
event: the poll stays the safety net.

Events of a table's `eager_topics` (e.g. a command's dispatch, on its latency path) do not wait
for a relay round at all: a session's commit hands them to this process's relay, which sends
them at once, in commit order, and has them marked published once Kafka acknowledged them (off
the path: by the next round's claim statement, or by a statement of its own after
`EAGER_MARK_AFTER_S` without a round). At 50 commands a second the relay's round (lock and
claim, send, acks, commit) was busy most of the time, and a dispatch waited 5 ms p50 between its
commit and its send: for the round in progress, then for its own claim. A relay round leaves an
eager event alone for `EAGER_GRACE`, then publishes it as any other: an event whose process died
before its send or its mark, whose send failed, or that was written without a session (a bare
connection, an insert guarded by another statement's rows) goes out then, at least once as
before. Eager events are ordered by commit within a process only (the relay's lock orders the
rest across replicas), so only topics whose consumers do not need more belong there.
"""

import asyncio
import contextlib
import functools
import json
import logging
import uuid
import weakref
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import (
    ARRAY,
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    TextClause,
    Uuid,
    any_,
    bindparam,
    event,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from common.contracts.topic import Topic
from common.events import DataT, Envelope, encode
from common.kafka import needs_new_producer, replace_producer
from common.metrics import OUTBOX_PUBLISHED
from common.telemetry import current_trace_headers

logger = logging.getLogger(__name__)


# Session.info keys: outbox tables written in the open transaction, those already NOTIFYed, and
# the eager events staged (by table), sent once it commits.
_WRITTEN = "common.outbox.written"
_NOTIFIED = "common.outbox.notified"
_EAGER = "common.outbox.eager"
# How long a relay round leaves an eager event to its process's send (see the module docstring).
EAGER_GRACE = timedelta(seconds=3)
# How long acked eager events wait for a relay round to mark them (its claim statement does, at
# no extra round trip) before the relay marks them with a statement of its own.
EAGER_MARK_AFTER_S = 1.0
# This process's token in NOTIFY payloads: its own relays are woken in-process already.
_PROCESS_TOKEN = uuid.uuid4().hex
_relays: dict[str, "weakref.WeakSet[OutboxRelay]"] = {}


def outbox_table(
    metadata: MetaData, *, wake_relay: bool = False, eager_topics: Collection[str] = ()
) -> Table:
    """The `outbox` table, in the service's own metadata (and its own migrations).

    `wake_relay`: a commit that added events wakes the relays at once (see the module
    docstring) instead of leaving them to their next poll; for latency-sensitive paths.
    `eager_topics` (topic names): their events are sent by the committing process's relay
    right after the commit, without a relay round (see the module docstring).
    """
    return Table(
        "outbox",
        metadata,
        Column("id", BigInteger, Identity(always=True), primary_key=True),
        Column("event_id", Uuid, nullable=False, unique=True),
        Column("topic", String(200), nullable=False),
        Column("key", String(200), nullable=True),
        Column("payload", LargeBinary, nullable=False),
        Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("published_at", DateTime(timezone=True), nullable=True),
        Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
        info={"wake_relay": wake_relay, "eager_topics": frozenset(eager_topics)},
    )


def notify_channel(outbox: Table) -> str:
    """The PostgreSQL channel a table's relays LISTEN on."""
    return f"outbox_relay_{zlib.crc32(outbox.fullname.encode()):08x}"


@dataclass(frozen=True)
class OutboxEvent:
    """An event ready for the outbox, with the trace context of where it was made."""

    event_id: uuid.UUID
    topic: str
    key: str | None
    payload: bytes
    headers: str  # JSON


def outbox_event(topic: Topic[DataT], event: Envelope[DataT]) -> OutboxEvent:
    """`event` for `topic`, carrying the current trace context: make it where the event is
    made, even if it is written later with others (`add_events`)."""
    headers = current_trace_headers()
    headers["content-type"] = "application/json"
    headers["event-type"] = event.type
    return OutboxEvent(event.event_id, topic.name, event.key, encode(event), json.dumps(headers))


async def add_event(
    session: AsyncSession | AsyncConnection,
    outbox: Table,
    topic: Topic[DataT],
    event: Envelope[DataT],
) -> None:
    """Stage `event` for `topic` in the caller's transaction."""
    await add_events(session, outbox, [outbox_event(topic, event)])


async def add_events(
    session: AsyncSession | AsyncConnection, outbox: Table, events: Sequence[OutboxEvent]
) -> None:
    """Stage `events` in the caller's transaction, in this order, with one statement (which
    also sends the transaction's NOTIFY if the table wakes relays)."""
    if not events:
        return
    staged = staged_insert(session, outbox, events)
    await session.execute(statement(staged.ctes), staged.params)


@dataclass(frozen=True)
class StagedInsert:
    """The INSERT of some events as parts of a statement's WITH: a caller can write its own
    changes in the same statement (one round trip for all of a transaction's writes)."""

    ctes: tuple[str, ...]
    params: dict[str, Any]


def staged_insert(
    session: AsyncSession | AsyncConnection,
    outbox: Table,
    events: Sequence[OutboxEvent],
    *,
    owned: tuple[str, Sequence[str]] | None = None,
) -> StagedInsert:
    """`events` as WITH parts (data-modifying CTEs run once, whether read or not) with the
    transaction's NOTIFY if the table wakes relays; parameter names start with `outbox_`.
    Arrays, not a VALUES row each: one prepared statement whatever the count; identity ids
    follow the order of the arrays.

    `owned` (a CTE of the same statement with an `id` column, and each event's owner id): only
    the events whose owner that CTE returns are inserted, e.g. those of the rows an UPDATE
    guarded by a version did write. Which those are is known only after the statement, so
    their events are never sent eagerly: a relay round sends them (after `EAGER_GRACE` for an
    eager topic's)."""
    params: dict[str, Any] = {
        "outbox_event_ids": [e.event_id for e in events],
        "outbox_topics": [e.topic for e in events],
        "outbox_keys": [e.key for e in events],
        "outbox_payloads": [e.payload for e in events],
        "outbox_headers": [e.headers for e in events],
    }
    if owned is not None:
        params["outbox_owners"] = list(owned[1])
        if len(params["outbox_owners"]) != len(events):
            raise ValueError("one owner per event")
    if owned is None:
        _stage_eager(session, outbox, events)
    notify = _notify_payload(session, outbox)
    if notify is not None:
        # Queued by PostgreSQL until the commit, dropped by a rollback: exactly "events
        # committed".
        params.update(outbox_channel=notify_channel(outbox), outbox_notify=notify)
    ctes = _insert_ctes(
        outbox.fullname, notify=notify is not None, owners_in=owned[0] if owned else None
    )
    return StagedInsert(ctes, params)


def _stage_eager(
    session: AsyncSession | AsyncConnection, outbox: Table, events: Sequence[OutboxEvent]
) -> None:
    """Keep the eager topics' events of a session's transaction for its commit hook (a bare
    connection has none: a relay round sends them)."""
    eager = outbox.info.get("eager_topics")
    if not eager or not isinstance(session, AsyncSession):
        return
    picked = [e for e in events if e.topic in eager]
    if picked:
        session.info.setdefault(_EAGER, {}).setdefault(outbox.fullname, []).extend(picked)


def _notify_payload(session: AsyncSession | AsyncConnection, outbox: Table) -> str | None:
    """The NOTIFY payload this write must send, or None (no wake-ups, or sent already)."""
    if not outbox.info.get("wake_relay"):
        return None
    # A session wakes this process's relays itself after the commit (so their LISTEN skips the
    # NOTIFY with this process's token); a bare connection has no such hook: every relay
    # listening, this process's too, takes its NOTIFY.
    if not isinstance(session, AsyncSession):
        return ""
    info = session.info
    info.setdefault(_WRITTEN, set()).add(outbox.fullname)
    if outbox.fullname in info.setdefault(_NOTIFIED, set()):
        return None
    info[_NOTIFIED].add(outbox.fullname)
    return _PROCESS_TOKEN


def statement(ctes: Sequence[str], main: str = "SELECT 1") -> TextClause:
    """`WITH <ctes> <main>` (one cached clause per text)."""
    return _statement(tuple(ctes), main)


@functools.cache
def _statement(ctes: tuple[str, ...], main: str) -> TextClause:
    return text(f"WITH {', '.join(ctes)} {main}" if ctes else main)


@functools.cache
def _insert_ctes(table: str, *, notify: bool, owners_in: str | None = None) -> tuple[str, ...]:
    # Names of ours only (the table, a CTE of the caller's statement), never values.
    owner_array, owner_column, only_owned = "", "", ""
    if owners_in:
        owner_array, owner_column = ", CAST(:outbox_owners AS varchar[])", ", owner"
        only_owned = f" WHERE e.owner IN (SELECT id FROM {owners_in})"  # noqa: S608
    insert = (
        f"outbox_staged AS (INSERT INTO {table} (event_id, topic, key, payload, headers) "  # noqa: S608
        "SELECT e.event_id, e.topic, e.key, e.payload, e.headers::jsonb "
        "FROM unnest(CAST(:outbox_event_ids AS uuid[]), CAST(:outbox_topics AS varchar[]), "
        "CAST(:outbox_keys AS varchar[]), CAST(:outbox_payloads AS bytea[]), "
        f"CAST(:outbox_headers AS text[]){owner_array}) "
        f"WITH ORDINALITY AS e(event_id, topic, key, payload, headers{owner_column}, n)"
        f"{', outbox_wake' if notify else ''}{only_owned} ORDER BY e.n)"
    )
    if not notify:
        return (insert,)
    # Materialised: evaluated once, not once per row.
    wake = "outbox_wake AS MATERIALIZED (SELECT pg_notify(:outbox_channel, :outbox_notify))"
    return (wake, insert)


@event.listens_for(Session, "after_commit")
def _wake_after_commit(session: Session) -> None:
    for name, events in session.info.pop(_EAGER, {}).items():
        # One relay of the process sends them (any would do: they share nothing but the table).
        relay = next(iter(_relays.get(name, ())), None)
        if relay is not None:
            relay.send_eagerly(events)
    for name in session.info.pop(_WRITTEN, ()):
        for relay in list(_relays.get(name, ())):
            relay.wake()


@event.listens_for(Session, "after_transaction_end")
def _forget_transaction(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_WRITTEN, None)
        session.info.pop(_NOTIFIED, None)
        session.info.pop(_EAGER, None)


@dataclass
class RelayStats:
    """Counters for health, logs and the benchmark."""

    published: int = 0
    batches: int = 0
    errors: int = 0
    rounds: int = 0
    wakeups: int = 0
    eager: int = 0  # of `published`, sent right after their commit (no round)
    eager_marks: int = 0  # statements of the relay's own that marked eager events


class OutboxRelay:
    """Publishes a service's outbox to Kafka; run one per process, it elects itself per batch.
    With `eager` (and a table with eager topics) it also sends those topics' events as this
    process's commits hand them over (see the module docstring)."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        outbox: Table,
        bootstrap_servers: str,
        client_id: str,
        batch_size: int = 1000,
        poll_interval_s: float = 0.1,
        linger_ms: int = 5,
        retention: timedelta = timedelta(days=1),
        topic_prefix: str = "",
        eager: bool = True,
        mark_after_s: float = EAGER_MARK_AFTER_S,
    ) -> None:
        self._engine = engine
        self._outbox = outbox
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._retention = retention
        self._topic_prefix = topic_prefix
        self._lock_key = zlib.crc32(f"outbox-relay:{outbox.fullname}".encode())
        self._make_producer = functools.partial(
            AIOKafkaProducer,
            bootstrap_servers=bootstrap_servers,
            client_id=f"{client_id}-outbox",
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            max_batch_size=256 * 1024,
        )
        self._producer = self._make_producer()
        self.stats = RelayStats()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # `eager=False`: this relay sends the table's eager topics in its rounds, as the rest.
        self._eager_topics: frozenset[str] = (
            outbox.info.get("eager_topics", frozenset()) if eager else frozenset()
        )
        # Eager events committed and not yet sent, in commit order; the sent ones' ids, acked
        # and not yet marked published.
        self._to_send: list[OutboxEvent] = []
        self._to_mark: list[uuid.UUID] = []
        self._mark_after_s = mark_after_s
        self._acking: set[asyncio.Future[None]] = set()
        self._send_ready = asyncio.Event()
        self._mark_ready = asyncio.Event()

    def wake(self) -> None:
        """Events were committed: relay now instead of at the next poll (any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def send_eagerly(self, events: Sequence[OutboxEvent]) -> None:
        """These eager events were committed: send them now, in this order (any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self._eager_topics:
            return  # not running, or not eager: a relay round sends them
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._to_send.extend(events)
            self._send_ready.set()
        else:
            loop.call_soon_threadsafe(self.send_eagerly, events)

    async def start(self) -> None:
        """Connect the producer."""
        await self._producer.start()

    async def stop(self) -> None:
        """Flush and close the producer."""
        await self._producer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; errors are logged and retried, never fatal."""
        self._loop = asyncio.get_running_loop()
        waking = bool(self._outbox.info.get("wake_relay"))
        if waking or self._eager_topics:
            _relays.setdefault(self._outbox.fullname, weakref.WeakSet()).add(self)
        listener = CommitListener(self._engine, notify_channel(self._outbox), self.wake)
        sending = asyncio.create_task(self._send_eager(stop), name="outbox-eager-send")
        marking = asyncio.create_task(self._mark_eager(stop), name="outbox-eager-mark")
        try:
            await self._run(stop, listener if waking else None)
        finally:
            _relays.get(self._outbox.fullname, weakref.WeakSet()).discard(self)
            await listener.close()
            # Send what was handed over, wait for its acks, mark it: what is left after that
            # (Kafka or the database gone) goes out in a round after the grace.
            await asyncio.wait([sending], timeout=5)
            if self._acking:
                await asyncio.wait(self._acking, timeout=5)
            await asyncio.wait([marking], timeout=5)
            for task in (sending, marking, *self._acking):
                task.cancel()
            if self._to_mark:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._mark(), 5)

    async def _run(self, stop: asyncio.Event, listener: "CommitListener | None") -> None:
        # Purge on a clock, not every N rounds: wake-ups make rounds as frequent as commits.
        purge_every_s = 600 * self._poll_interval_s
        clock = asyncio.get_running_loop().time
        next_purge = clock() + purge_every_s
        while not stop.is_set():
            if listener is not None:
                await listener.ensure()
            # Cleared before reading: a commit after this point wakes the next round.
            self._wake.clear()
            try:
                count = await self.relay_once()
                self.stats.rounds += 1
                if clock() >= next_purge:
                    next_purge = clock() + purge_every_s
                    await self.purge()
            except Exception as exc:
                self.stats.errors += 1
                logger.exception("outbox relay failed; retrying")
                count = 0
                if needs_new_producer(exc):
                    # The rows stay unpublished and go out again on the new producer.
                    with contextlib.suppress(Exception):
                        self._producer = await replace_producer(self._producer, self._make_producer)
                await _wait(stop, min(5.0, self._poll_interval_s * 20))
            idle = self._idle_wait(listener)
            if count < self._batch_size and await _wait(stop, idle, self._wake):
                self.stats.wakeups += 1

    async def _send_eager(self, stop: asyncio.Event) -> None:
        """Send eager events as their commits hand them over, without waiting for the acks of
        those sent before (the producer keeps their order); stops when `stop` is set and
        nothing is left to send."""
        while not (stop.is_set() and not self._to_send):
            if not self._to_send:
                await _wait(stop, 3600, self._send_ready)
                self._send_ready.clear()
                continue
            events, self._to_send = self._to_send, []
            try:
                acks = [
                    await self._producer.send(
                        self._topic_prefix + e.topic,
                        value=e.payload,
                        key=e.key.encode() if e.key is not None else None,
                        headers=[(k, str(v).encode()) for k, v in json.loads(e.headers).items()],
                    )
                    for e in events
                ]
            except Exception:
                # Unsent, so unmarked: a relay round sends them after the grace (and replaces
                # a broken producer).
                logger.warning("eager outbox send failed; the relay sends later", exc_info=True)
                continue
            task = asyncio.ensure_future(self._acked(events, acks))
            self._acking.add(task)
            task.add_done_callback(self._acking.discard)
            task.add_done_callback(_log_failure)

    async def _acked(self, events: Sequence[OutboxEvent], acks: Sequence[Any]) -> None:
        results = await asyncio.gather(*acks, return_exceptions=True)
        sent = [e.event_id for e, r in zip(events, results, strict=True) if not _failed(r)]
        if len(sent) < len(events):
            logger.warning(
                "eager outbox events not acknowledged; the relay sends them later",
                extra={"unacknowledged": len(events) - len(sent)},
            )
        self.stats.published += len(sent)
        self.stats.eager += len(sent)
        OUTBOX_PUBLISHED.inc(len(sent))
        self._to_mark.extend(sent)
        self._mark_ready.set()

    async def _mark_eager(self, stop: asyncio.Event) -> None:
        """Mark acknowledged eager events published that no relay round marked within
        `mark_after_s` (rounds usually do: every commit with other events starts one), until
        `stop`."""
        while not stop.is_set():
            await _wait(stop, 3600, self._mark_ready)
            self._mark_ready.clear()
            await _wait(stop, self._mark_after_s)
            if self._to_mark and not stop.is_set() and not await self._mark():
                await _wait(stop, 1.0)

    async def _mark(self) -> bool:
        """Mark the acked eager events published; a failure leaves them to a relay round (a
        duplicate, never a gap)."""
        ids, self._to_mark = self._to_mark, []
        self.stats.eager_marks += 1
        try:
            async with self._engine.begin() as conn:
                await conn.execute(self._mark_acked, {"acked": ids})
        except Exception:
            logger.warning("eager outbox mark failed; a relay round sends them", exc_info=True)
            return False
        return True

    def _idle_wait(self, listener: "CommitListener | None") -> float:
        # While LISTENing, every commit anywhere wakes us: the poll is only the safety net for
        # a lost notification, so it can be slow (idle polling was ~8% of a gateway's CPU).
        if listener is not None and listener.listening:
            return max(self._poll_interval_s, LISTENING_POLL_INTERVAL_S)
        return self._poll_interval_s

    async def relay_once(self) -> int:
        """Publish one batch of unpublished events (and mark the acked eager events published
        in the same statement); returns how many."""
        acked, self._to_mark = self._to_mark, []
        try:
            async with self._engine.begin() as conn:
                params = {"acked": acked} if self._eager_topics else {}
                rows = (await conn.execute(self._claim, params)).all()
                if not rows:
                    return 0
                await self._publish(sorted(rows, key=lambda row: row.id))
                # Leaving the block commits the mark: only now, after every ack.
        except BaseException:
            self._to_mark[:0] = acked  # rolled back: still to be marked
            raise
        self.stats.published += len(rows)
        self.stats.batches += 1
        OUTBOX_PUBLISHED.inc(len(rows))
        return len(rows)

    @functools.cached_property
    def _mark_acked(self) -> Any:
        """Mark acked eager events published (`= ANY(array)`: one prepared statement whatever
        the number of ids, as the claim's own mark)."""
        outbox = self._outbox
        acked = bindparam("acked", type_=ARRAY(Uuid))
        return (
            update(outbox)
            .where(outbox.c.published_at.is_(None), outbox.c.event_id == any_(acked))
            .values(published_at=func.now())
        )

    @functools.cached_property
    def _claim(self) -> Any:
        """Lock, mark and read a batch in one statement (three round trips fewer a round than
        lock, select, mark): the advisory lock is taken once, in a materialised CTE; if another
        relay holds it, no row qualifies. RETURNING has no order: the caller sorts by id."""
        outbox = self._outbox
        lock = select(
            func.pg_try_advisory_xact_lock(literal(self._lock_key, BigInteger)).label("ok")
        ).cte("relay_lock")
        lock = lock.prefix_with("MATERIALIZED", dialect="postgresql")
        batch = (
            select(outbox.c.id)
            .select_from(outbox)
            .join(lock, lock.c.ok)
            .where(outbox.c.published_at.is_(None), *self._not_in_flight())
            .order_by(outbox.c.id)
            .limit(self._batch_size)
            .scalar_subquery()
        )
        claim = (
            update(outbox)
            .where(outbox.c.id.in_(batch))
            .values(published_at=func.now())
            .returning(*(outbox.c[name] for name in ("id", "topic", "key", "payload", "headers")))
        )
        if not self._eager_topics:
            return claim
        # The acked eager events' mark rides along (a data-modifying CTE runs whether read or
        # not); it does not need the lock. An empty array marks nothing.
        marked = self._mark_acked.returning(outbox.c.id).cte("eager_marked")
        return claim.add_cte(marked)

    def _not_in_flight(self) -> tuple[Any, ...]:
        """The claim's filter on eager events: only those past the grace (see the module
        docstring); the others are being sent by their process."""
        if not self._eager_topics:
            return ()
        outbox = self._outbox
        return (
            or_(
                outbox.c.topic.not_in(sorted(self._eager_topics)),
                outbox.c.created_at < func.now() - EAGER_GRACE,
            ),
        )

    async def _publish(self, rows: Any) -> None:
        futures = [
            await self._producer.send(
                self._topic_prefix + row.topic,
                value=row.payload,
                key=row.key.encode() if row.key is not None else None,
                headers=[(name, str(value).encode()) for name, value in row.headers.items()],
            )
            for row in rows
        ]
        await asyncio.gather(*futures)

    async def purge(self) -> int:
        """Delete published rows older than the retention window."""
        outbox = self._outbox
        async with self._engine.begin() as conn:
            result = await conn.execute(
                outbox.delete().where(
                    outbox.c.published_at < func.now() - self._retention,
                )
            )
        return int(result.rowcount or 0)

    async def pending(self) -> int:
        """How many events wait to be published."""
        outbox = self._outbox
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
            )
        return int(count or 0)


# The safety-net poll of a relay whose wake-ups arrive (see `_idle_wait`).
LISTENING_POLL_INTERVAL_S = 1.0


class CommitListener:
    """A connection of its own that LISTENs for other processes' commits of outbox events
    (asyncpg only): `wake()` is called for each. The relay uses it; so can anything else that
    follows another replica's writes (`ensure()` it now and then, `close()` it at the end)."""

    def __init__(self, engine: AsyncEngine, channel: str, wake: Callable[[], None]) -> None:
        self._engine = engine
        self._channel = channel
        self._wake = wake
        self._conn: AsyncConnection | None = None
        self._driver: Any = None
        self._retry_at = 0.0

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload != _PROCESS_TOKEN:
            self._wake()

    @property
    def listening(self) -> bool:
        """Whether notifications can reach us now."""
        return self._driver is not None and not self._driver.is_closed()

    async def ensure(self) -> None:
        """(Re)connect and LISTEN if not listening; failures fall back to polling."""
        if self._driver is not None and not self._driver.is_closed():
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            return
        await self.close()
        try:
            self._conn = await self._engine.connect()
            raw = await self._conn.get_raw_connection()
            driver: Any = raw.driver_connection
            if not hasattr(driver, "add_listener"):
                self._retry_at = float("inf")  # not asyncpg: the poll alone it is
                await self.close()
                return
            await driver.add_listener(self._channel, self._on_notify)
            self._driver = driver
        except Exception:
            logger.warning("outbox relay cannot LISTEN; polling meanwhile", exc_info=True)
            self._retry_at = loop.time() + 5.0
            await self.close()

    async def close(self) -> None:
        """Stop listening and give the connection back."""
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                # The pool resets the connection on return (asyncpg drops its listeners).
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()


def _failed(result: object) -> bool:
    return isinstance(result, BaseException)


def _log_failure(task: "asyncio.Future[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("eager outbox acknowledgement failed", exc_info=task.exception())


async def _wait(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> bool:
    """Sleep until `stop`, `wake` or the timeout; True if woken."""
    waits = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waits.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    return wake is not None and wake.is_set() and not stop.is_set()
