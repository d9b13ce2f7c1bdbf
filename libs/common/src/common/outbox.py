"""Transactional outbox: events are written with the state change, a relay publishes them.

`add_event()` inserts the encoded envelope into the service's `outbox` table inside the caller's
transaction, together with the current trace context. `OutboxRelay` reads unpublished rows in
id order, publishes them with an idempotent acks=all producer, waits for every ack, then marks
them published in the same database transaction. A crash between publish and mark rolls the
mark back, so the rows are published again: consumers see a duplicate (same `event_id`), never
a gap. One relay per database publishes at a time (a transaction-scoped advisory lock), which
keeps the order across replicas of the service.
"""

import asyncio
import contextlib
import logging
import zlib
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
    Uuid,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from common.contracts.topic import Topic
from common.events import DataT, Envelope, encode
from common.metrics import OUTBOX_PUBLISHED
from common.telemetry import current_trace_headers

logger = logging.getLogger(__name__)


def outbox_table(metadata: MetaData) -> Table:
    """The `outbox` table, in the service's own metadata (and its own migrations)."""
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
    )


async def add_event(
    session: AsyncSession | AsyncConnection,
    outbox: Table,
    topic: Topic[DataT],
    event: Envelope[DataT],
) -> None:
    """Stage `event` for `topic` in the caller's transaction."""
    headers = current_trace_headers()
    headers["content-type"] = "application/json"
    headers["event-type"] = event.type
    await session.execute(
        outbox.insert().values(
            event_id=event.event_id,
            topic=topic.name,
            key=event.key,
            payload=encode(event),
            headers=headers,
        )
    )


@dataclass
class RelayStats:
    """Counters for health, logs and the benchmark."""

    published: int = 0
    batches: int = 0
    errors: int = 0


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
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=f"{client_id}-outbox",
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            max_batch_size=256 * 1024,
        )
        self.stats = RelayStats()

    async def start(self) -> None:
        """Connect the producer."""
        await self._producer.start()

    async def stop(self) -> None:
        """Flush and close the producer."""
        await self._producer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; errors are logged and retried, never fatal."""
        purge_every = 600
        loops = 0
        while not stop.is_set():
            try:
                count = await self.relay_once()
                loops += 1
                if loops % purge_every == 0:
                    await self.purge()
            except Exception:
                self.stats.errors += 1
                logger.exception("outbox relay failed; retrying")
                count = 0
                await _wait(stop, min(5.0, self._poll_interval_s * 20))
            if count < self._batch_size:
                await _wait(stop, self._poll_interval_s)

    async def relay_once(self) -> int:
        """Publish one batch of unpublished events; returns how many."""
        outbox = self._outbox
        async with self._engine.begin() as conn:
            locked = await conn.scalar(select(func.pg_try_advisory_xact_lock(self._lock_key)))
            if not locked:
                return 0
            rows = (
                await conn.execute(
                    select(
                        outbox.c.id,
                        outbox.c.topic,
                        outbox.c.key,
                        outbox.c.payload,
                        outbox.c.headers,
                    )
                    .where(outbox.c.published_at.is_(None))
                    .order_by(outbox.c.id)
                    .limit(self._batch_size)
                )
            ).all()
            if not rows:
                return 0
            await self._publish(rows)
            await self._mark_published(conn, [row.id for row in rows])
        self.stats.published += len(rows)
        self.stats.batches += 1
        OUTBOX_PUBLISHED.inc(len(rows))
        return len(rows)

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

    async def _mark_published(self, conn: AsyncConnection, ids: list[int]) -> None:
        outbox = self._outbox
        await conn.execute(
            update(outbox).where(outbox.c.id.in_(ids)).values(published_at=func.now())
        )

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


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
