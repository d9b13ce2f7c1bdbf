"""The messaging foundation against real Kafka and PostgreSQL.

A producing service writes state and its event in one transaction (outbox); a consuming service
in another consumer group applies each event once; a relay killed between publish and mark
republishes, and the consumer ignores the duplicate; the trace runs unbroken from the HTTP
request to the consumer's span; a malformed record is dead-lettered and consumption goes on.
"""

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, SecretStr
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from common.contracts import platform
from common.contracts.topic import Topic
from common.events import Envelope, new_event
from common.idempotency import first_delivery, processed_events_table
from common.infra import Infra
from common.kafka import ConsumerStats, subscribe
from common.outbox import add_event, outbox_table
from common.settings import DatabaseSettings, service_config
from common.telemetry import instrument_app
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses

pytestmark = pytest.mark.stack


class WidgetCreated(BaseModel):
    """The event of the test's producing service."""

    widget_id: str
    name: str


WIDGETS = Topic(
    name="test.widget.v1",
    data=WidgetCreated,
    event_type="test.widget.created",
    key="widget id",
    description="Widgets created by the test producer.",
)

# Producer's tables.
producer_meta = MetaData()
widgets = Table(
    "widgets",
    producer_meta,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
)
producer_outbox = outbox_table(producer_meta)

# Consumer's tables.
consumer_meta = MetaData()
widget_copies = Table(
    "widget_copies",
    consumer_meta,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("applied", Integer, nullable=False),
)
consumer_processed = processed_events_table(consumer_meta)


class ProducerSettings(DatabaseSettings):
    model_config = service_config("TEST_PRODUCER_")


class ConsumerSettings(DatabaseSettings):
    model_config = service_config("TEST_CONSUMER_")


@dataclass
class Deliveries:
    """What the consumer's handler saw (every delivery, duplicates included)."""

    seen: list[uuid.UUID] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.seen) < count:
                self.arrived.clear()
                await self.arrived.wait()


def producer_app(infra: Infra) -> FastAPI:
    """A service whose one route writes a widget and its event in one transaction."""
    app = FastAPI()
    assert infra.sessions is not None
    sessions = infra.sessions

    @app.post("/widgets/{widget_id}")
    async def create(widget_id: str, name: str) -> dict[str, str]:
        async with sessions() as session, session.begin():
            await session.execute(widgets.insert().values(id=widget_id, name=name))
            event = new_event(
                type=WIDGETS.event_type,
                data=WidgetCreated(widget_id=widget_id, name=name),
                source="test-producer",
                key=widget_id,
            )
            await add_event(session, producer_outbox, WIDGETS, event)
        return {"event_id": str(event.event_id)}

    instrument_app(app, infra.tracer_provider)
    return app


@asynccontextmanager
async def consumer_service(
    infra: Infra, deliveries: Deliveries, prefix: str
) -> AsyncIterator[ConsumerStats]:
    """A service applying widget events idempotently to its own table."""
    assert infra.sessions is not None
    sessions = infra.sessions

    async def apply(event: Envelope[WidgetCreated]) -> None:
        deliveries.seen.append(event.event_id)
        deliveries.arrived.set()
        async with sessions() as session, session.begin():
            if not await first_delivery(
                session, consumer_processed, consumer="widget-copier", event_id=event.event_id
            ):
                return
            # Not idempotent by itself: a second application would count 2.
            insert = pg_insert(widget_copies).values(
                id=event.data.widget_id, name=event.data.name, applied=1
            )
            await session.execute(
                insert.on_conflict_do_update(
                    index_elements=[widget_copies.c.id],
                    set_={"applied": widget_copies.c.applied + 1},
                )
            )

    stats = subscribe(
        infra.broker,
        WIDGETS,
        group_id=f"{prefix}widget-copier",
        handler=apply,
        source="test-consumer",
        topic_prefix=prefix,
        retry_delay_s=0.2,
    )
    async with infra.running():
        yield stats


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def producer(
    stack: StackAddresses,
    fresh_database: Migrate,
    topic_prefix: str,
    kafka_topics: KafkaTopics,
    spans: InMemorySpanExporter,
) -> AsyncIterator[Infra]:
    await kafka_topics.create(WIDGETS.name, platform.DEADLETTER.name)
    url = await fresh_database("producer")
    settings = ProducerSettings(
        database_url=SecretStr(url),
        kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
        redis_url=SecretStr(stack.redis_url),
        kafka_topic_prefix=topic_prefix,
        outbox_poll_interval_s=0.05,
    )
    infra = Infra.build(
        settings, outbox=producer_outbox, span_processors=(SimpleSpanProcessor(spans),)
    )
    assert infra.engine is not None
    async with infra.engine.begin() as conn:
        await conn.run_sync(producer_meta.create_all)
    yield infra
    await infra.engine.dispose()


@pytest.fixture
async def consumer_infra(
    stack: StackAddresses,
    fresh_database: Migrate,
    topic_prefix: str,
    spans: InMemorySpanExporter,
) -> AsyncIterator[Infra]:
    url = await fresh_database("consumer")
    settings = ConsumerSettings(
        database_url=SecretStr(url),
        kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
        redis_url=SecretStr(stack.redis_url),
        kafka_topic_prefix=topic_prefix,
    )
    infra = Infra.build(settings, span_processors=(SimpleSpanProcessor(spans),))
    assert infra.engine is not None
    async with infra.engine.begin() as conn:
        await conn.run_sync(consumer_meta.create_all)
    yield infra
    await infra.engine.dispose()


async def post_widget(infra: Infra, widget_id: str, name: str) -> uuid.UUID:
    app = producer_app(infra)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://producer") as client:
        response = await client.post(f"/widgets/{widget_id}", params={"name": name})
    assert response.status_code == 200, response.text
    return uuid.UUID(response.json()["event_id"])


async def copies(infra: Infra) -> list[tuple[str, str, int]]:
    assert infra.engine is not None
    async with infra.engine.connect() as conn:
        rows = await conn.execute(select(widget_copies).order_by(widget_copies.c.id))
        return [(row.id, row.name, row.applied) for row in rows]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def test_event_written_with_state_reaches_other_service_once_with_unbroken_trace(
    producer: Infra,
    consumer_infra: Infra,
    spans: InMemorySpanExporter,
    topic_prefix: str,
) -> None:
    deliveries = Deliveries()
    assert producer.relay is not None
    relay = producer.relay
    await relay.start()
    try:
        async with consumer_service(consumer_infra, deliveries, topic_prefix) as stats:
            event_id = await post_widget(producer, "w-1", "first widget")

            # State and event were committed together; nothing is published yet.
            assert await relay.pending() == 1

            # Kill the relay between publish and the commit of its mark: it hangs once Kafka
            # has acknowledged the publish, then dies.
            marking = asyncio.Event()
            publish = relay._publish

            async def publish_then_hang(rows: Any) -> None:
                await publish(rows)
                marking.set()
                await asyncio.Event().wait()

            relay._publish = publish_then_hang  # type: ignore[method-assign]
            killed = asyncio.create_task(relay.relay_once())
            await asyncio.wait_for(marking.wait(), 10)
            await deliveries.wait_for(1)
            killed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await killed
            del relay._publish  # back to the real method

            # The mark never committed: the event is still pending and goes out again.
            assert await relay.pending() == 1
            assert await relay.relay_once() == 1
            assert await relay.pending() == 0
            await deliveries.wait_for(2)

            assert deliveries.seen == [event_id, event_id]
            await eventually(lambda: _handled(stats, 2))
            assert await copies(consumer_infra) == [("w-1", "first widget", 1)]
    finally:
        await relay.stop()

    finished = spans.get_finished_spans()
    server = [s for s in finished if s.kind is SpanKind.SERVER]
    consumer = [s for s in finished if s.kind is SpanKind.CONSUMER]
    assert server, "the HTTP request made no server span"
    assert len(consumer) >= 2, "the consumer made no span per delivery"
    request_trace = _trace_id(server[0])
    assert {_trace_id(span) for span in consumer} == {request_trace}


async def test_malformed_record_is_dead_lettered_and_consumer_goes_on(
    producer: Infra,
    consumer_infra: Infra,
    stack: StackAddresses,
    topic_prefix: str,
) -> None:
    deliveries = Deliveries()
    topic = topic_prefix + WIDGETS.name
    garbage = b'{"event_id": "not-a-uuid", "data": 42'
    wrong_data = json.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "type": "test.widget.created",
            "version": 1,
            "occurred_at": "2026-11-25T10:00:00Z",
            "source": "somebody",
            "key": "w-x",
            "data": {"widget_id": "w-x"},
        }
    ).encode()
    raw = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await raw.start()
    try:
        await raw.send_and_wait(topic, garbage, key=b"w-bad")
        await raw.send_and_wait(topic, wrong_data, key=b"w-x")
    finally:
        await raw.stop()

    assert producer.relay is not None
    await producer.relay.start()
    try:
        async with consumer_service(consumer_infra, deliveries, topic_prefix) as stats:
            good = await post_widget(producer, "w-2", "second widget")
            await producer.relay.relay_once()
            await eventually(lambda: _contains(deliveries, good))
            await eventually(lambda: _handled(stats, 1))
            assert stats.dead_lettered >= 2
    finally:
        await producer.relay.stop()

    letters = await _read_all(
        stack.kafka_bootstrap_servers, topic_prefix + platform.DEADLETTER.name
    )
    ours = [letter for letter in letters if letter["data"]["topic"] == topic]
    by_value = {base64.b64decode(letter["data"]["value_b64"]): letter["data"] for letter in ours}
    assert garbage in by_value, "the malformed record was not kept whole"
    assert "invalid record" in by_value[garbage]["reason"]
    assert by_value[garbage]["key"] == "w-bad"
    assert "data.name" in by_value[wrong_data]["reason"], by_value[wrong_data]["reason"]
    assert ("w-2", "second widget", 1) in await copies(consumer_infra)


async def _handled(stats: ConsumerStats, count: int) -> bool:
    return stats.handled >= count


async def _contains(deliveries: Deliveries, event_id: uuid.UUID) -> bool:
    return event_id in deliveries.seen


def _trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


async def _read_all(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=5000)
        return [json.loads(r.value) for records in batches.values() for r in records]
    finally:
        await consumer.stop()
