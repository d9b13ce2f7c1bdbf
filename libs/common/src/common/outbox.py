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
"""

import asyncio
import contextlib
import functools
import json
import logging
import uuid
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import (
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
    event,
    func,
    literal,
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


# Session.info keys: outbox tables written in the open transaction, and those already NOTIFYed.
_WRITTEN = "common.outbox.written"
_NOTIFIED = "common.outbox.notified"
# This process's token in NOTIFY payloads: its own relays are woken in-process already.
_PROCESS_TOKEN = uuid.uuid4().hex
_relays: dict[str, "weakref.WeakSet[OutboxRelay]"] = {}


def outbox_table(metadata: MetaData, *, wake_relay: bool = False) -> Table:
    """The `outbox` table, in the service's own metadata (and its own migrations).

    `wake_relay`: a commit that added events wakes the relays at once (see the module
    docstring) instead of leaving them to their next poll; for latency-sensitive paths.
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
        info={"wake_relay": wake_relay},
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
    guarded by a version did write."""
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
    notify = _notify_payload(session, outbox)
    if notify is not None:
        # Queued by PostgreSQL until the commit, dropped by a rollback: exactly "events
        # committed".
        params.update(outbox_channel=notify_channel(outbox), outbox_notify=notify)
    ctes = _insert_ctes(
        outbox.fullname, notify=notify is not None, owners_in=owned[0] if owned else None
    )
    return StagedInsert(ctes, params)


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
    for name in session.info.pop(_WRITTEN, ()):
        for relay in list(_relays.get(name, ())):
            relay.wake()


@event.listens_for(Session, "after_transaction_end")
def _forget_transaction(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_WRITTEN, None)
        session.info.pop(_NOTIFIED, None)


@dataclass
class RelayStats:
    """Counters for health, logs and the benchmark."""

    published: int = 0
    batches: int = 0
    errors: int = 0
    rounds: int = 0
    wakeups: int = 0


class OutboxRelay:
    """Publishes a service's outbox to Kafka; run one per process, it elects itself per batch."""

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
        if waking:
            _relays.setdefault(self._outbox.fullname, weakref.WeakSet()).add(self)
        listener = CommitListener(self._engine, notify_channel(self._outbox), self.wake)
        try:
            await self._run(stop, listener if waking else None)
        finally:
            _relays.get(self._outbox.fullname, weakref.WeakSet()).discard(self)
            await listener.close()

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

    def _idle_wait(self, listener: "CommitListener | None") -> float:
        # While LISTENing, every commit anywhere wakes us: the poll is only the safety net for
        # a lost notification, so it can be slow (idle polling was ~8% of a gateway's CPU).
        if listener is not None and listener.listening:
            return max(self._poll_interval_s, LISTENING_POLL_INTERVAL_S)
        return self._poll_interval_s

    async def relay_once(self) -> int:
        """Publish one batch of unpublished events; returns how many."""
        async with self._engine.begin() as conn:
            rows = (await conn.execute(self._claim)).all()
            if not rows:
                return 0
            await self._publish(sorted(rows, key=lambda row: row.id))
            # Leaving the block commits the mark: only now, after every ack.
        self.stats.published += len(rows)
        self.stats.batches += 1
        OUTBOX_PUBLISHED.inc(len(rows))
        return len(rows)

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
            .where(outbox.c.published_at.is_(None))
            .order_by(outbox.c.id)
            .limit(self._batch_size)
            .scalar_subquery()
        )
        return (
            update(outbox)
            .where(outbox.c.id.in_(batch))
            .values(published_at=func.now())
            .returning(*(outbox.c[name] for name in ("id", "topic", "key", "payload", "headers")))
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
