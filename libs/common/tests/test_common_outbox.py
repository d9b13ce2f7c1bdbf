"""The outbox relay's wake-up against real PostgreSQL and Kafka.

A table made with `wake_relay=True` is published as soon as the transaction that added an event
commits (its own process's relays at once, another process's through NOTIFY), not at the next
poll; a rolled back transaction wakes nobody and publishes nothing; a table without it behaves
as before (polling only). The relays here poll every 30 s, far beyond each test's deadline, so
only a wake-up can make a test pass. An eager topic's event goes out at its commit without a
relay round, and one its process did not send goes out in a round once its grace is over.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import OutOfOrderSequenceNumber
from pydantic import BaseModel
from sqlalchemy import MetaData, Table, func
from sqlalchemy.ext.asyncio import AsyncEngine

from common.contracts.topic import Topic
from common.db import make_engine, make_sessionmaker
from common.events import Envelope, new_event
from common.outbox import (
    EAGER_GRACE,
    OutboxRelay,
    add_event,
    add_events,
    notify_channel,
    outbox_event,
    outbox_table,
)
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses

pytestmark = pytest.mark.stack

POLL_S = 30.0


class Ping(BaseModel):
    """The test's event."""

    n: int


PINGS = Topic(
    name="test.outbox-ping.v1",
    data=Ping,
    event_type="test.outbox.ping",
    key="none",
    description="Pings of the outbox wake-up test.",
)


async def _engine_with(url: str, table: Table) -> AsyncEngine:
    engine = make_engine(url, pool_size=2)
    async with engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    return engine


async def _eventually(check: Callable[[], Awaitable[bool]], deadline_s: float = 10.0) -> None:
    async with asyncio.timeout(deadline_s):
        while not await check():
            await asyncio.sleep(0.02)


class Running:
    """A relay running in the background and a consumer of what it published."""

    def __init__(self, relay: OutboxRelay, consumer: AIOKafkaConsumer) -> None:
        self.relay = relay
        self.consumer = consumer
        self.seen: list[int] = []

    async def received(self, n: int) -> bool:
        """Whether the ping `n` arrived (the topic holds the other tests' pings too)."""
        batches = await self.consumer.getmany(timeout_ms=100)
        for records in batches.values():
            self.seen.extend(
                Envelope[Ping].model_validate_json(r.value or b"").data.n for r in records
            )
        return n in self.seen


@asynccontextmanager
async def _running(
    stack: StackAddresses,
    engine: AsyncEngine,
    table: Table,
    prefix: str,
    *,
    mark_after_s: float = 1.0,
) -> AsyncIterator[Running]:
    relay = OutboxRelay(
        engine=engine,
        outbox=table,
        bootstrap_servers=stack.kafka_bootstrap_servers,
        client_id=f"test-outbox-{uuid.uuid4().hex[:6]}",
        poll_interval_s=POLL_S,
        topic_prefix=prefix,
        mark_after_s=mark_after_s,
    )
    consumer = AIOKafkaConsumer(
        prefix + PINGS.name,
        bootstrap_servers=stack.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await relay.start()
    await consumer.start()
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    # The first round runs at start; from then on only wake-ups relay before the poll.
    await _eventually(lambda: _rounds(relay))
    try:
        yield Running(relay, consumer)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await consumer.stop()
        await relay.stop()


@pytest.fixture
async def world(
    stack: StackAddresses, fresh_database: Migrate, kafka_topics: KafkaTopics
) -> tuple[str, str]:
    await kafka_topics.create(PINGS.name, partitions=1)
    url = await fresh_database("outbox_wake")
    return url, kafka_topics.prefix


async def _rounds(relay: OutboxRelay) -> bool:
    return relay.stats.rounds > 0


async def _published(relay: OutboxRelay) -> bool:
    return relay.stats.published > 0


class _AbandonError(Exception):
    pass


async def _add(engine: AsyncEngine, table: Table, n: int, *, commit: bool = True) -> None:
    sessions = make_sessionmaker(engine)
    with contextlib.suppress(_AbandonError):
        async with sessions() as session, session.begin():
            event = new_event(type=PINGS.event_type, data=Ping(n=n), source="test")
            await add_event(session, table, PINGS, event)
            if not commit:
                raise _AbandonError


async def test_a_commit_wakes_the_relay_of_its_process(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    url, prefix = world
    table = outbox_table(MetaData(), wake_relay=True)
    engine = await _engine_with(url, table)
    try:
        async with _running(stack, engine, table, prefix) as run:
            await _add(engine, table, 1, commit=False)
            await _add(engine, table, 2)
            await _eventually(lambda: run.received(2))
            await _eventually(lambda: _published(run.relay))
            assert run.relay.stats.published == 1
            assert 1 not in run.seen  # the rolled back event never existed
            assert run.relay.stats.wakeups >= 1
    finally:
        await engine.dispose()


async def test_another_process_commit_wakes_the_relay_through_notify(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    url, prefix = world
    table = outbox_table(MetaData(), wake_relay=True)
    engine = await _engine_with(url, table)
    try:
        async with _running(stack, engine, table, prefix) as run:
            # Another replica: its own connection, its own process token in the payload.
            other = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
            try:
                event = new_event(type=PINGS.event_type, data=Ping(n=3), source="test")
                async with other.transaction():
                    await other.execute(
                        "INSERT INTO outbox (event_id, topic, key, payload) "
                        "VALUES ($1, $2, NULL, $3)",
                        event.event_id,
                        PINGS.name,
                        event.model_dump_json().encode(),
                    )
                    await other.execute(
                        "SELECT pg_notify($1, 'another-replica')", notify_channel(table)
                    )
            finally:
                await other.close()
            await _eventually(lambda: run.received(3))
            assert run.relay.stats.wakeups >= 1
    finally:
        await engine.dispose()


async def test_a_commit_on_a_bare_connection_wakes_the_relay_of_its_process(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    url, prefix = world
    table = outbox_table(MetaData(), wake_relay=True)
    engine = await _engine_with(url, table)
    try:
        async with _running(stack, engine, table, prefix) as run:
            async with engine.begin() as conn:  # no session, so only NOTIFY can wake
                event = new_event(type=PINGS.event_type, data=Ping(n=5), source="test")
                await add_event(conn, table, PINGS, event)
            await _eventually(lambda: run.received(5))
            assert run.relay.stats.wakeups >= 1
    finally:
        await engine.dispose()


async def test_a_table_without_wake_relay_waits_for_the_poll(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    url, prefix = world
    table = outbox_table(MetaData())
    engine = await _engine_with(url, table)
    try:
        async with _running(stack, engine, table, prefix) as run:
            await _add(engine, table, 4)
            assert await run.relay.pending() == 1
            assert not await run.received(4)
            assert run.relay.stats.wakeups == 0
            # What the poll would do, done by hand: the event was staged as before.
            assert await run.relay.relay_once() == 1
            await _eventually(lambda: run.received(4))
    finally:
        await engine.dispose()


class _StuckProducer:
    """A producer left unusable by a lost sequence, as aiokafka's is after a Kafka restart."""

    def __init__(self) -> None:
        self.stopped = False

    async def send(self, *args: object, **kwargs: object) -> None:
        raise OutOfOrderSequenceNumber()

    async def stop(self) -> None:
        self.stopped = True


async def test_a_producer_stuck_on_its_sequence_is_replaced_and_nothing_is_lost(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    url, prefix = world
    table = outbox_table(MetaData(), wake_relay=True)
    engine = await _engine_with(url, table)
    try:
        async with _running(stack, engine, table, prefix) as run:
            real, stuck = run.relay._producer, _StuckProducer()
            run.relay._producer = stuck
            await _add(engine, table, 6)
            await _eventually(lambda: _errors(run.relay))
            assert stuck.stopped
            assert run.relay._producer is not real  # a new one (a new producer id)
            await _add(engine, table, 7)  # wakes the relay: both go out now
            await _eventually(lambda: run.received(7))
            await _eventually(lambda: run.received(6))
            await real.stop()
    finally:
        await engine.dispose()


async def _errors(relay: OutboxRelay) -> bool:
    return relay.stats.errors > 0 and not isinstance(relay._producer, _StuckProducer)


async def test_events_added_together_go_out_in_their_order(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    url, prefix = world
    table = outbox_table(MetaData(), wake_relay=True)
    engine = await _engine_with(url, table)
    try:
        async with _running(stack, engine, table, prefix) as run:
            async with make_sessionmaker(engine).begin() as session:
                await add_events(
                    session,
                    table,
                    [
                        outbox_event(
                            PINGS, new_event(type=PINGS.event_type, data=Ping(n=n), source="test")
                        )
                        for n in (10, 11, 12)
                    ],
                )
                await add_event(
                    session,
                    table,
                    PINGS,
                    new_event(type=PINGS.event_type, data=Ping(n=13), source="test"),
                )
            await _eventually(lambda: run.received(13))
            assert [n for n in run.seen if n >= 10] == [10, 11, 12, 13]
            assert run.relay.stats.wakeups >= 1
    finally:
        await engine.dispose()


async def test_a_relay_publishes_nothing_while_another_holds_the_lock(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    url, prefix = world
    table = outbox_table(MetaData())
    engine = await _engine_with(url, table)
    try:
        async with _running(stack, engine, table, prefix) as run:
            await _add(engine, table, 20)
            other = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
            try:
                async with other.transaction():  # another replica's relay, mid-round
                    assert await other.fetchval(
                        "SELECT pg_try_advisory_xact_lock($1::bigint)", run.relay._lock_key
                    )
                    assert await run.relay.relay_once() == 0
                    assert await run.relay.pending() == 1
            finally:
                await other.close()
            assert await run.relay.relay_once() == 1
            await _eventually(lambda: run.received(20))
            assert await run.relay.pending() == 0
    finally:
        await engine.dispose()


@asynccontextmanager
async def _eager_relay(
    stack: StackAddresses, world: tuple[str, str], *, mark_after_s: float = 1.0
) -> AsyncIterator[tuple[AsyncEngine, Table, Running]]:
    """A running relay of a table whose pings are an eager topic (no wake-ups: only the
    commit's own send can beat the 30 s poll)."""
    url, prefix = world
    table = outbox_table(MetaData(), eager_topics=(PINGS.name,))
    engine = await _engine_with(url, table)
    try:
        async with _running(stack, engine, table, prefix, mark_after_s=mark_after_s) as run:
            yield engine, table, run
    finally:
        await engine.dispose()


async def test_an_eager_topic_goes_out_at_its_commit_without_a_relay_round(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    async with _eager_relay(stack, world) as (engine, table, run):
        rounds = run.relay.stats.rounds
        await _add(engine, table, 30, commit=False)
        await _add(engine, table, 31)
        await _eventually(lambda: run.received(31))
        assert run.relay.stats.rounds == rounds  # no round sent it
        assert run.relay.stats.eager == 1
        assert 30 not in run.seen  # the rolled back event was never sent
        # Marked published once acknowledged (no round came: by a statement of the relay's
        # own), so no round sends it again.
        await _eventually(lambda: _none_pending(run.relay))
        assert run.relay.stats.eager_marks == 1


async def _none_pending(relay: OutboxRelay) -> bool:
    return await relay.pending() == 0


async def test_the_next_relay_round_marks_acked_eager_events_in_its_own_statement(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    # The relay's own mark would come only after 30 s.
    async with _eager_relay(stack, world, mark_after_s=POLL_S) as (engine, table, run):
        await _add(engine, table, 33)
        await _eventually(lambda: run.received(33))
        await _eventually(lambda: _eager_sent(run.relay))
        assert await run.relay.pending() == 1  # sent, acknowledged, not marked yet
        assert await run.relay.relay_once() == 0  # nothing to send: the mark rides along
        assert await run.relay.pending() == 0
        assert run.relay.stats.eager_marks == 0
        assert [n for n in run.seen if n == 33] == [33]


async def _eager_sent(relay: OutboxRelay) -> bool:
    return relay.stats.eager > 0


async def test_an_eager_event_its_process_did_not_send_goes_out_in_a_round_after_the_grace(
    stack: StackAddresses, world: tuple[str, str]
) -> None:
    async with _eager_relay(stack, world) as (engine, table, run):
        # A bare connection has no commit hook: as if its process died right after the
        # commit, before the send.
        async with engine.begin() as conn:
            event = new_event(type=PINGS.event_type, data=Ping(n=32), source="test")
            await add_event(conn, table, PINGS, event)
        # Within the grace a round leaves it to its process.
        assert await run.relay.relay_once() == 0
        assert await run.relay.pending() == 1
        async with engine.begin() as conn:
            await conn.execute(
                table.update().values(created_at=func.now() - EAGER_GRACE - EAGER_GRACE)
            )
        assert await run.relay.relay_once() == 1
        await _eventually(lambda: run.received(32))
        assert run.relay.stats.eager == 0
        assert await run.relay.pending() == 0
