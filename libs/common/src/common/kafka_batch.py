"""Batch consumers for heavy topics: validate each record, hand the valid ones over at once.

`subscribe_batch()` is `common.kafka.subscribe()` for a whole poll of records (up to
`max_records`): each record is parsed as `Envelope[T]`; invalid ones go to the dead-letter topic
with the reason; the handler gets the valid list in record order and writes it in one go. The
offsets are committed only after the handler returned. A transient error (database or network
down) commits nothing and rewinds every partition of the batch, so the whole batch is read
again after a pause: handlers must be idempotent (e.g. only move state forward in event time).
Any other handler error dead-letters every record of the batch, so a poison batch never stalls
the consumer.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from common.contracts import platform
from common.contracts.topic import Topic
from common.events import DataT, Envelope
from common.kafka import TRANSIENT_ERRORS, ConsumerStats, _describe, dead_letter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _One:
    """One record of a batch, shaped like a message for `dead_letter()`."""

    raw_message: Any


@dataclass
class BatchStats(ConsumerStats):
    """`ConsumerStats` plus how many batches were written."""

    batches: int = 0


def subscribe_batch(
    broker: KafkaBroker,
    topic: Topic[DataT],
    *,
    group_id: str,
    handler: Callable[[Sequence[Envelope[DataT]]], Awaitable[None]],
    source: str,
    topic_prefix: str = "",
    max_records: int = 1000,
    batch_timeout_ms: int = 200,
    retry_delay_s: float = 1.0,
) -> BatchStats:
    """Register a batch consumer of `topic` in `group_id`; see the module docstring."""
    stats = BatchStats()
    name = topic_prefix + topic.name
    deadletter_topic = topic_prefix + platform.DEADLETTER.name

    async def bury(record: Any, reason: str) -> None:
        await dead_letter(
            broker,
            _One(record),
            reason=reason,
            consumer=group_id,
            source=source,
            topic=deadletter_topic,
        )
        stats.dead_lettered += 1

    async def consume(msg: KafkaMessage) -> None:
        raw = msg.raw_message
        records = raw if isinstance(raw, tuple) else (raw,)
        valid: list[Envelope[DataT]] = []
        parsed: list[Any] = []
        for record in records:
            try:
                valid.append(topic.parse(record.value))
                parsed.append(record)
            except ValidationError as exc:
                await bury(record, _describe(exc))
        if valid:
            try:
                await handler(valid)
            except TRANSIENT_ERRORS as exc:
                stats.retried += 1
                logger.warning(
                    "transient error, will re-read the batch",
                    extra={"topic": name, "consumer": group_id, "error": repr(exc)},
                )
                await asyncio.sleep(retry_delay_s)
                await msg.nack()
                return
            except Exception as exc:  # noqa: BLE001 - kept in the dead-letter topic, not lost
                reason = f"batch failed: {_describe(exc)}"
                for record in parsed:
                    await bury(record, reason)
                await msg.ack()
                return
            stats.handled += len(valid)
        stats.batches += 1
        await msg.ack()

    broker.subscriber(
        name,
        group_id=group_id,
        batch=True,
        max_records=max_records,
        batch_timeout_ms=batch_timeout_ms,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,
        title=f"{group_id}:{name}",
        description=topic.description,
    )(consume)
    return stats
