"""Batch consumers for heavy topics: validate each record, hand the valid ones over at once.

`subscribe_batch()` is `common.kafka.subscribe()` for a whole poll of records (up to
`max_records`): each record is parsed as `Envelope[T]`; invalid ones go to the dead-letter topic
with the reason; the handler gets the valid list in record order and writes it in one go. The
offsets are committed only after the handler returned, in the background (`_Committer`): the
next poll does not wait for the commit's round trip to Kafka (~6 ms here, on every hop of a
command's round trip before). A transient error (database or network
down) commits nothing and rewinds every partition of the batch, so the whole batch is read
again after a pause: handlers must be idempotent (e.g. only move state forward in event time).
Any other handler error dead-letters every record of the batch, so a poison batch never stalls
the consumer.

Heavy topics pay per record, so the batch path skips what FastStream would do per record and
nobody here reads: its own JSON decoding of every value (the envelope is parsed once, by the
contract) and a trace link and baggage per record (the batch's span carries the first
record's context only).
"""

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.message import AckStatus, StreamMessage
from pydantic import ValidationError

from common.contracts import platform
from common.contracts.topic import Topic
from common.events import DataT, Envelope
from common.http import is_unavailable
from common.kafka import TRANSIENT_ERRORS, ConsumerStats, _describe, _undecoded, dead_letter
from common.metrics import KAFKA_CONSUMED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _One:
    """One record of a batch, shaped like a message for `dead_letter()`."""

    raw_message: Any


@dataclass
class BatchStats(ConsumerStats):
    """`ConsumerStats` plus how many batches were written."""

    batches: int = 0


async def _first_record_context(
    records: Any, original: Callable[[Any], Awaitable[StreamMessage[Any]]]
) -> StreamMessage[Any]:
    """FastStream's batch message, tracing the batch by its first record only."""
    message = await original(records)
    message.batch_headers = message.batch_headers[:1]
    return message


# The shortest time between two offset commits of a group member (see `_Committer`).
COMMIT_INTERVAL_S = 0.1


class _Committer:
    """Commits a group member's offsets after its batches, one commit at a time, off the poll
    loop, at most every `interval_s`.

    A batch's offsets are handed over once its handler returned (its work is stored); the next
    poll goes on meanwhile. Commits never overlap, and one commits the newest offsets handed
    over so far (a later batch's offsets cover an earlier one's), so the committed position
    only moves forward. Under load many batches share a commit: each commit is a request Kafka
    writes to its offsets log, and one per small batch cost the broker and this client more CPU
    than the records. A commit that fails (a rebalance took the partition, Kafka went away), or
    one still pending when the process dies, only means those records are read again, by this
    member or the partition's next owner: batch handlers are idempotent.
    """

    def __init__(self, group_id: str, interval_s: float = COMMIT_INTERVAL_S) -> None:
        self._group_id = group_id
        self._interval_s = interval_s
        self._pending: dict[TopicPartition, int] = {}
        # The furthest offset handed over per partition: a commit never goes back behind it.
        self._furthest: dict[TopicPartition, int] = {}
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._last = float("-inf")

    def handled(self, consumer: Any, records: Sequence[Any]) -> None:
        """These records are stored: commit past them soon."""
        for record in records:
            partition = TopicPartition(record.topic, record.partition)
            if record.offset + 1 > self._furthest.get(partition, -1):
                self._pending[partition] = self._furthest[partition] = record.offset + 1
        self._consumer = consumer
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._commit(), name=f"commit {self._group_id}")

    async def _commit(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            wait_s = self._last + self._interval_s - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)  # what comes meanwhile goes in this commit
            self._last = loop.time()
            offsets, self._pending = self._pending, {}
            try:
                await self._consumer.commit(
                    {tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()}
                )
            except Exception as exc:  # noqa: BLE001 - the records are read again, see above
                for partition in offsets:  # whoever reads them again starts behind this
                    self._furthest.pop(partition, None)
                logger.info(
                    "offset commit failed; those records will be read again",
                    extra={"consumer": self._group_id, "error": repr(exc)[:300]},
                )

    async def flush(self) -> None:
        """Wait for the commits handed over so far (tests; a stopping consumer need not)."""
        if self._task is not None:
            await self._task


class _Commits:
    """A `_Committer` per group member (its aiokafka consumer): a member commits only the
    partitions it was given."""

    def __init__(self, group_id: str) -> None:
        self._group_id = group_id
        self._members: weakref.WeakKeyDictionary[Any, _Committer] = weakref.WeakKeyDictionary()

    def handled(self, consumer: Any, records: Sequence[Any]) -> None:
        """`consumer`'s batch of `records` is stored: commit past it soon."""
        committer = self._members.get(consumer)
        if committer is None:
            committer = self._members[consumer] = _Committer(self._group_id)
        committer.handled(consumer, records)


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
    consumers: int = 1,
) -> BatchStats:
    """Register a batch consumer of `topic` in `group_id`; see the module docstring.

    `consumers` > 1 runs that many group members in this process: the group splits the
    partitions between them, so one parses its batch while another waits for its write.
    Records with the same key stay in one partition, so concurrent batches never touch the
    same key (e.g. the same device row).
    """
    stats = BatchStats()
    name = topic_prefix + topic.name
    deadletter_topic = topic_prefix + platform.DEADLETTER.name
    handled = KAFKA_CONSUMED.labels(group_id, topic.name, "handled")
    dead_lettered = KAFKA_CONSUMED.labels(group_id, topic.name, "dead_lettered")
    retried = KAFKA_CONSUMED.labels(group_id, topic.name, "retried")
    # Resolved once: `Envelope[...]` looks its generic class up on every subscript.
    envelope = Envelope[topic.data]  # type: ignore[name-defined]

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
        dead_lettered.inc()

    commits = _Commits(group_id)

    async def consume() -> None:
        # From the context, not a parameter: see `common.kafka._undecoded`.
        msg: KafkaMessage = broker.context.get_local("message")
        raw = msg.raw_message
        records = raw if isinstance(raw, tuple) else (raw,)
        valid: list[Envelope[DataT]] = []
        parsed: list[Any] = []
        for record in records:
            try:
                valid.append(envelope.model_validate_json(record.value or b""))
                parsed.append(record)
            except ValidationError as exc:
                await bury(record, _describe(exc))
        if valid:
            try:
                await handler(valid)
            except Exception as exc:  # noqa: BLE001 - read again, or kept in the dead-letter topic
                # e.g. asyncpg's "the database system is shutting down" is unavailable too.
                if isinstance(exc, TRANSIENT_ERRORS) or is_unavailable(exc):
                    stats.retried += 1
                    retried.inc(len(valid))
                    logger.warning(
                        "transient error or dependency unavailable, will re-read the batch",
                        extra={"topic": name, "consumer": group_id, "error": repr(exc)[:300]},
                    )
                    await asyncio.sleep(retry_delay_s)
                    await msg.nack()
                    return
                reason = f"batch failed: {_describe(exc)}"
                for record in parsed:
                    await bury(record, reason)
                await msg.ack()
                return
            stats.handled += len(valid)
            handled.inc(len(valid))
        stats.batches += 1
        msg.committed = AckStatus.ACKED  # committed by the committer, not by FastStream
        commits.handled(msg.consumer, records)

    for member in range(consumers):
        subscriber = broker.subscriber(
            name,
            group_id=group_id,
            batch=True,
            max_records=max_records,
            batch_timeout_ms=batch_timeout_ms,
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.MANUAL,
            title=f"{group_id}:{name}" + (f"#{member + 1}" if member else ""),
            description=topic.description,
            parser=_first_record_context,
            decoder=_undecoded,
        )
        subscriber(consume)
        _poll_without_idle_sleep(subscriber)
    return stats


def record_traceparents(broker: KafkaBroker) -> dict[str, str]:
    """Event id → `traceparent` of the records of the batch being handled that carry one.

    FastStream's span of a batch continues its first record's trace only (and links the
    others'), so a handler that acts per record reads the records' own contexts here. Only a
    record with a trace context has its value parsed for its event id.
    """
    message = broker.context.get_local("message")
    raw = getattr(message, "raw_message", None)
    records = raw if isinstance(raw, tuple) else (() if raw is None else (raw,))
    found: dict[str, str] = {}
    for record in records:
        traceparent = next((v for k, v in record.headers or () if k == "traceparent"), None)
        if traceparent is None:
            continue
        try:
            event_id = json.loads(record.value)["event_id"]
            found[str(event_id)] = traceparent.decode()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # the batch consumer dead-letters what is not an event
    return found


# The poll's clock and sleep (tests move time themselves).
_clock = time.monotonic
_sleep = asyncio.sleep


def _poll_without_idle_sleep(subscriber: Any) -> None:
    """After a poll that found nothing, FastStream's batch subscriber sleeps `batch_timeout_ms`
    more on top of the poll's own wait of that long, so a record arriving meanwhile waited up to
    that long again (on every hop of a command's round trip). The sleep guards against a poll
    that comes back empty at once (aiokafka does while partitions are reassigned): that case
    (back before half the timeout) still waits out the rest, so the loop never spins."""
    timeout_s = subscriber.batch_timeout_ms / 1000

    async def get_msg(consumer: Any) -> tuple[Any, ...]:
        started = _clock()
        batches = await consumer.getmany(
            timeout_ms=subscriber.batch_timeout_ms, max_records=subscriber.max_records
        )
        if batches:
            return tuple(chain.from_iterable(batches.values()))
        rest = timeout_s - (_clock() - started)
        if rest > timeout_s / 2:
            await _sleep(rest)
        return ()

    subscriber.get_msg = get_msg
