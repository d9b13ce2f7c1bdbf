"""Kafka for services: a FastStream broker factory and typed, dead-lettering consumers.

A consumer registered with `subscribe()` receives a validated `Envelope[T]`. What it does with a
record decides the offset:
- invalid envelope or data, or any other error in the handler (a `PermanentError`, a bug):
  the record goes to `platform.deadletter.v1` with the reason, the offset is committed, the
  consumer goes on;
- a transient error (database or network down): nothing is committed, the record is read again
  after a pause, so nothing is lost and nothing runs twice without the idempotency guard;
- success: the offset is committed after the handler's transaction committed.
"""

import asyncio
import base64
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from common.contracts import platform
from common.contracts.topic import Topic
from common.events import DataT, Envelope, encode, new_event
from common.http import is_unavailable
from common.metrics import KAFKA_CONSUMED

logger = logging.getLogger(__name__)


class RetryLaterError(Exception):
    """A handler's verdict that this record came too early (what it refers to has not arrived
    from another topic yet): read it again after a backoff, like a transient error."""


# Errors worth waiting out: the record is read again instead of dead-lettered.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RetryLaterError,
    OperationalError,
    InterfaceError,
    ConnectionError,
    TimeoutError,
    OSError,
)


# Aiokafka's per-request timeout (default 40 s): a publish or a metadata fetch against an absent
# broker fails within this, so callers (a request, the dead-letter path) do not hang.
REQUEST_TIMEOUT_MS = 10_000


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: `base_s`, 2x per attempt, at most `cap_s`.

    Equal jitter (half the step fixed, half random): replicas that lost the same dependency
    spread their retries out, and none retries in a tight loop.
    """

    base_s: float = 0.5
    cap_s: float = 10.0
    attempt: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """The pause before the next attempt (grows until the cap)."""
        step = min(self.cap_s, self.base_s * float(2 ** min(self.attempt, 30)))
        self.attempt += 1
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        """After a success: the next failure starts from `base_s` again."""
        self.attempt = 0


# An idempotent aiokafka producer never gets over these by itself (the Java client bumps its
# epoch or takes a new producer id): once a broker outage timed a batch out, every later batch
# to that partition fails alike until a new producer replaces it (aio-libs/aiokafka#1017). Seen
# here after a Kafka restart: the gateway's uplinks failed for minutes, devices' acks with them.
PRODUCER_FATAL_ERRORS: tuple[type[BaseException], ...] = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)


def needs_new_producer(exc: BaseException | None) -> bool:
    """Did `exc` (or what caused it) leave the producer unusable, so it must be replaced?"""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PRODUCER_FATAL_ERRORS):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


async def replace_producer(
    old: AIOKafkaProducer, make: Callable[[], AIOKafkaProducer]
) -> AIOKafkaProducer:
    """Start a new producer (a new producer id, sequences from zero), then close the old one.

    Raises if the new one cannot start (Kafka away): the caller keeps the old one and tries
    again later. Whatever the old one still had in flight fails, and its owner resends it.
    """
    new = make()
    await new.start()
    logger.warning("kafka producer replaced after a fatal idempotence error")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(old.stop(), timeout=10)
    return new


class PermanentError(Exception):
    """A handler's verdict that this record can never be processed (dead-letter it)."""


def make_broker(
    *,
    bootstrap_servers: str,
    client_id: str,
    tracer_provider: TracerProvider | None = None,
    linger_ms: int = 5,
) -> KafkaBroker:
    """A broker whose producer waits for all in-sync replicas.

    Its producer only writes dead letters (events go through the outbox relays, uplinks through
    the gateway's own producer). It is not idempotent: a dead letter written twice harms no
    one, while an idempotent aiokafka producer can be left failing every send after a broker
    restart (see `PRODUCER_FATAL_ERRORS`), and a consumer that cannot dead-letter stalls.
    """
    middlewares = (
        (KafkaTelemetryMiddleware(tracer_provider=tracer_provider),) if tracer_provider else ()
    )
    return KafkaBroker(
        bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=False,
        linger_ms=linger_ms,
        compression_type=None,
        allow_auto_create_topics=False,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
        middlewares=middlewares,
        logger=logging.getLogger(f"faststream.{client_id}"),
        log_level=logging.DEBUG,
    )


@dataclass
class ConsumerStats:
    """What a consumer did since start; exposed for tests and health."""

    handled: int = 0
    dead_lettered: int = 0
    retried: int = 0


def subscribe(
    broker: KafkaBroker,
    topic: Topic[DataT],
    *,
    group_id: str,
    handler: Callable[[Envelope[DataT]], Awaitable[None]],
    source: str,
    topic_prefix: str = "",
    retry_delay_s: float = 1.0,
    retry_max_delay_s: float = 15.0,
) -> ConsumerStats:
    """Register a consumer of `topic` in consumer group `group_id`; see the module docstring.

    `topic_prefix` comes from the service's settings (`kafka_topic_prefix`): test sessions
    isolate their topics with it, and it applies to the dead-letter topic too. A transient
    error pauses the consumer for `retry_delay_s`, doubling (with jitter) up to
    `retry_max_delay_s` while the dependency stays away.
    """
    stats = ConsumerStats()
    backoff = Backoff(base_s=retry_delay_s, cap_s=max(retry_delay_s, retry_max_delay_s))
    name = topic_prefix + topic.name
    deadletter_topic = topic_prefix + platform.DEADLETTER.name
    handled = KAFKA_CONSUMED.labels(group_id, topic.name, "handled")
    dead_lettered = KAFKA_CONSUMED.labels(group_id, topic.name, "dead_lettered")
    retried = KAFKA_CONSUMED.labels(group_id, topic.name, "retried")

    async def reject(msg: KafkaMessage, exc: BaseException) -> None:
        """Keep the record in dead-letter with the reason, then move past it."""
        await dead_letter(
            broker,
            msg,
            reason=_describe(exc),
            consumer=group_id,
            source=source,
            topic=deadletter_topic,
        )
        stats.dead_lettered += 1
        dead_lettered.inc()
        await msg.ack()

    async def consume() -> None:
        msg: KafkaMessage = broker.context.get_local("message")
        record = msg.raw_message
        try:
            event = topic.parse(record.value)  # type: ignore[union-attr]
        except ValidationError as exc:
            await reject(msg, exc)
            return
        try:
            await handler(event)
        except TRANSIENT_ERRORS as exc:
            stats.retried += 1
            retried.inc()
            logger.warning(
                "transient error, will re-read the record",
                extra={"topic": name, "consumer": group_id, "error": repr(exc)},
            )
            await asyncio.sleep(backoff.next_delay())
            await msg.nack()
            return
        except Exception as exc:  # noqa: BLE001 - anything not transient is kept, not lost
            if is_unavailable(exc):  # e.g. asyncpg's "the database system is shutting down"
                stats.retried += 1
                retried.inc()
                await asyncio.sleep(backoff.next_delay())
                await msg.nack()
                return
            await reject(msg, exc)
            return
        backoff.reset()
        stats.handled += 1
        handled.inc()
        await msg.ack()

    broker.subscriber(
        name,
        group_id=group_id,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,
        title=f"{group_id}:{name}",
        description=topic.description,
        decoder=_undecoded,
    )(consume)
    return stats


async def _undecoded(message: Any) -> None:
    """No decoded body: `consume` parses the raw record by the topic's contract itself.

    Nor does `consume` take the message as a `KafkaMessage` parameter: FastDepends resolves
    such a context parameter with a synchronous function, in a worker thread, for every
    message (a thread hop per record); it reads it from the context instead."""
    return


async def dead_letter(
    broker: KafkaBroker,
    msg: Any,
    *,
    reason: str,
    consumer: str,
    source: str,
    topic: str = platform.DEADLETTER.name,
) -> None:
    """Publish the raw record and the reason to the dead-letter topic and wait for acks."""
    record = msg.raw_message
    key = record.key.decode(errors="replace") if record.key else None
    data = platform.DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key,
        value_b64=base64.b64encode(record.value or b"").decode(),
        headers={k: v.decode(errors="replace") for k, v in (record.headers or ())},
        consumer=consumer,
        reason=reason[:2000],
        failed_at=datetime.now(UTC),
    )
    event = new_event(type=platform.DEADLETTER.event_type, data=data, source=source, key=key)
    await broker.publish(
        encode(event),
        topic,
        key=record.key,
        headers={"content-type": "application/json", "event-type": event.type},
    )
    logger.warning(
        "record dead-lettered",
        extra={
            "topic": record.topic,
            "offset": record.offset,
            "consumer": consumer,
            "reason": reason[:200],
        },
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        parts = [
            f"{'.'.join(str(p) for p in err['loc']) or '(record)'}: {err['msg']}"
            for err in exc.errors()[:5]
        ]
        return f"invalid record: {'; '.join(parts)}"
    return f"{type(exc).__name__}: {exc}"
