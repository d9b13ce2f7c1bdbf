"""A service's connections to the platform, built from its settings and run in its lifespan.

Two phases, because FastStream subscribers must be registered before the broker starts:
`Infra.build()` creates clients without connecting; the service registers its consumers on
`infra.broker`; `async with infra.running()` connects everything, runs the outbox relay and
closes it all in reverse order.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from faststream.kafka import KafkaBroker
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from redis.asyncio import Redis
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from common.db import make_engine, make_sessionmaker, ping
from common.health import Check
from common.kafka import make_broker
from common.metrics import CONSUMER_LAG, OUTBOX_PENDING
from common.outbox import OutboxRelay
from common.redis import make_redis
from common.settings import DatabaseSettings, ServiceSettings
from common.telemetry import instrument_engine, setup_tracing

logger = logging.getLogger(__name__)

# Each step of closing down (consumers, relay, producer, pools) gets at most this long, so a
# SIGTERM ends the process within the orchestrator's grace period even when a server is away.
SHUTDOWN_STEP_S = 5.0


@dataclass
class Infra:
    """Everything a service talks to, owned by its app's lifespan."""

    settings: ServiceSettings
    tracer_provider: TracerProvider
    broker: KafkaBroker
    redis: Redis
    engine: AsyncEngine | None = None
    sessions: async_sessionmaker[AsyncSession] | None = None
    relay: OutboxRelay | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def build(
        cls,
        settings: ServiceSettings,
        *,
        outbox: Table | None = None,
        span_processors: tuple[SpanProcessor, ...] = (),
    ) -> "Infra":
        """Create (not connect) the clients a service's settings call for."""
        name = type(settings).service_name
        provider = setup_tracing(
            name,
            exporter=settings.otel_exporter,
            endpoint=settings.otel_endpoint,
            extra_processors=span_processors,
        )
        broker = make_broker(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            client_id=settings.client_id,
            tracer_provider=provider,
            linger_ms=settings.kafka_linger_ms,
        )
        infra = cls(
            settings=settings,
            tracer_provider=provider,
            broker=broker,
            redis=make_redis(settings.redis_url.get_secret_value()),
        )
        if isinstance(settings, DatabaseSettings):
            infra.engine = make_engine(
                settings.database_url.get_secret_value(),
                pool_size=settings.database_pool_size,
                application_name=name,
            )
            instrument_engine(infra.engine, provider)
            infra.sessions = make_sessionmaker(infra.engine)
            if outbox is not None:
                infra.relay = OutboxRelay(
                    engine=infra.engine,
                    outbox=outbox,
                    bootstrap_servers=settings.kafka_bootstrap_servers,
                    client_id=settings.client_id,
                    batch_size=settings.outbox_batch_size,
                    poll_interval_s=settings.outbox_poll_interval_s,
                    eager=settings.outbox_eager,
                    linger_ms=settings.kafka_linger_ms,
                    topic_prefix=settings.kafka_topic_prefix,
                )
        return infra

    def health_checks(self) -> dict[str, Check]:
        """Readiness checks for the dependencies this service has."""
        checks: dict[str, Check] = {
            "kafka": self._kafka_ready,
            "redis": self.redis.ping,
        }
        if self.engine is not None:
            engine = self.engine

            async def database() -> None:
                await ping(engine)

            checks["database"] = database
        return checks

    async def _kafka_ready(self) -> None:
        if not await self.broker.ping(timeout=2.0):
            raise ConnectionError("Kafka broker does not answer")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["Infra"]:
        """Connect, start consumers and the relay; close everything on exit."""
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(_bounded, "redis", self._close_redis)
            if self.engine is not None:
                stack.push_async_callback(_bounded, "database pool", self.engine.dispose)
            await self.broker.start()
            stack.push_async_callback(_bounded, "kafka broker", self.broker.stop)
            if self.relay is not None:
                await self.relay.start()
                stack.push_async_callback(_bounded, "outbox relay producer", self.relay.stop)
                relay_task = asyncio.create_task(self.relay.run(self._stop), name="outbox-relay")
                stack.push_async_callback(self._stop_task, relay_task)
            gauges = asyncio.create_task(self._update_gauges(), name="metrics-gauges")
            stack.push_async_callback(self._stop_task, gauges)
            yield self

    async def _update_gauges(self, interval_s: float = 15.0) -> None:
        """Refresh gauges that need a query (outbox backlog, consumer lag) off the scrape path."""
        while not self._stop.is_set():
            try:
                if self.relay is not None:
                    OUTBOX_PENDING.set(await self.relay.pending())
                for (group, topic), lag in (await self.consumer_lag()).items():
                    CONSUMER_LAG.labels(group, topic).set(lag)
            except Exception:
                logger.debug("metrics refresh failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval_s)

    async def consumer_lag(self) -> dict[tuple[str, str], int]:
        """Records behind the partition ends, per (consumer group, topic), for this process."""
        lag: dict[tuple[str, str], int] = {}
        for subscriber in self.broker.subscribers:
            consumer = getattr(subscriber, "consumer", None)
            if consumer is None:
                continue
            group = str(getattr(consumer, "_group_id", None) or "-")
            for partition in consumer.assignment():
                end = consumer.highwater(partition)
                if end is None:
                    continue
                behind = max(0, end - await consumer.position(partition))
                key = (group, partition.topic)
                lag[key] = lag.get(key, 0) + behind
        return lag

    async def _stop_task(self, task: "asyncio.Task[None]") -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(task, timeout=10)
        except TimeoutError:
            task.cancel()
            logger.warning("outbox relay did not stop in time; cancelled")

    async def _close_redis(self) -> None:
        await self.redis.aclose()


async def _bounded(name: str, close: Callable[[], Awaitable[object]]) -> None:
    """Run one closing step for at most `SHUTDOWN_STEP_S`; a stuck step is abandoned, logged."""
    try:
        await asyncio.wait_for(close(), timeout=SHUTDOWN_STEP_S)
    except TimeoutError:
        logger.warning("shutdown: %s did not close within %.0fs", name, SHUTDOWN_STEP_S)
    except Exception:
        logger.warning("shutdown: closing %s failed", name, exc_info=True)
