"""`common.kafka.subscribe` on FastStream's in-memory broker: typed delivery and dead letters.

`TestKafkaBroker` hands the consumer real aiokafka `ConsumerRecord`s (topic, partition 0,
offset 0, key, value, headers), so `msg.raw_message` works as with a real broker. It cannot
re-deliver: a nack is observed as a call, not as a second delivery; and its `ack` commits
nothing. Both are observed by spying on FastStream's `KafkaAckableMessage`.
"""

import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.message import KafkaAckableMessage
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError, OperationalError

from common.contracts import device, platform
from common.events import Envelope, encode, new_event
from common.kafka import ConsumerStats, PermanentError, make_broker, subscribe

GROUP = "fleet-presence"
SOURCE = "fleet"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

Presence = Envelope[device.DevicePresence]


def presence(device_id: str = "AG-0001") -> Presence:
    return new_event(
        type=device.PRESENCE.event_type,
        data=device.DevicePresence(device_id=device_id, received_at=NOW, state="online"),
        source="gateway",
        key=device_id,
    )


@dataclass
class Consumer:
    """One `subscribe()`d consumer on an in-memory broker, and what it did."""

    broker: KafkaBroker
    stats: ConsumerStats
    topic: str
    seen: list[Presence] = field(default_factory=list)
    letters: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)

    async def send(
        self, value: bytes | None, *, key: bytes = b"AG-0001", headers: dict[str, str] | None = None
    ) -> None:
        await self.broker.publish(value, self.topic, key=key, headers=headers)

    def letter(self) -> Envelope[platform.DeadLetter]:
        [record] = self.letters
        return platform.DEADLETTER.parse(record.value)


@pytest.fixture
def ack_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every ack/nack of a manually acknowledged message, then does it."""
    calls: list[str] = []
    real_ack = KafkaAckableMessage.ack
    real_nack = KafkaAckableMessage.nack

    async def ack(self: KafkaAckableMessage) -> None:
        calls.append("ack")
        await real_ack(self)

    async def nack(self: KafkaAckableMessage) -> None:
        calls.append("nack")
        await real_nack(self)

    monkeypatch.setattr(KafkaAckableMessage, "ack", ack)
    monkeypatch.setattr(KafkaAckableMessage, "nack", nack)
    return calls


Handler = Callable[[Presence], None]


@asynccontextmanager
async def consumer(
    acks: list[str], *, prefix: str = "", fail: Handler | None = None
) -> AsyncIterator[Consumer]:
    broker = make_broker(bootstrap_servers="kafka.invalid:9092", client_id="tests")
    seen: list[Presence] = []

    async def handle(event: Presence) -> None:
        seen.append(event)
        if fail is not None:
            fail(event)

    stats = subscribe(
        broker,
        device.PRESENCE,
        group_id=GROUP,
        handler=handle,
        source=SOURCE,
        topic_prefix=prefix,
        retry_delay_s=0,
    )
    letters: list[ConsumerRecord[bytes, bytes]] = []

    @broker.subscriber(prefix + platform.DEADLETTER.name, group_id="tests-deadletter-reader")
    async def read_deadletter(msg: KafkaMessage) -> None:
        letters.append(msg.raw_message)

    async with TestKafkaBroker(broker) as running:
        yield Consumer(
            broker=running,
            stats=stats,
            topic=prefix + device.PRESENCE.name,
            seen=seen,
            letters=letters,
            acks=acks,
        )


async def test_valid_envelope_reaches_the_handler_typed(ack_calls: list[str]) -> None:
    event = presence()
    async with consumer(ack_calls) as c:
        await c.send(encode(event), key=b"AG-0001")
    [delivered] = c.seen
    assert delivered == event
    assert isinstance(delivered, Envelope)
    assert isinstance(delivered.data, device.DevicePresence)
    assert delivered.data.state == "online"
    assert c.stats == ConsumerStats(handled=1, dead_lettered=0, retried=0)
    assert c.letters == []
    assert ack_calls == ["ack"]


async def test_topic_prefix_applies_to_the_subscription(ack_calls: list[str]) -> None:
    async with consumer(ack_calls, prefix="test-1a2b.") as c:
        assert c.topic == "test-1a2b.device.presence.v1"
        await c.send(encode(presence()))
        # The unprefixed topic is someone else's.
        await c.broker.publish(encode(presence()), device.PRESENCE.name)
    assert len(c.seen) == 1


@pytest.mark.parametrize("prefix", ["", "test-1a2b."])
async def test_invalid_record_is_dead_lettered_and_the_handler_not_called(
    ack_calls: list[str], prefix: str
) -> None:
    garbage = b'{"event_id": "not-a-uuid", "data": 4'
    async with consumer(ack_calls, prefix=prefix) as c:
        await c.send(garbage, key=b"AG-0042", headers={"traceparent": "00-abc-def-01"})

    assert c.seen == []
    assert c.stats == ConsumerStats(handled=0, dead_lettered=1, retried=0)
    [record] = c.letters
    assert record.topic == prefix + "platform.deadletter.v1"
    assert record.key == b"AG-0042"  # same partition as the original key's records
    headers = dict(record.headers)
    assert headers["event-type"] == b"platform.deadletter"
    assert headers["content-type"] == b"application/json"

    letter = c.letter()
    assert letter.type == platform.DEADLETTER.event_type
    assert letter.source == SOURCE
    assert letter.key == "AG-0042"
    data = letter.data
    assert data.topic == prefix + "device.presence.v1"
    assert data.partition == 0
    assert data.offset == 0
    assert data.key == "AG-0042"
    assert base64.b64decode(data.value_b64) == garbage
    assert data.headers["traceparent"] == "00-abc-def-01"
    assert data.consumer == GROUP
    assert data.reason.startswith("invalid record")
    assert data.failed_at.tzinfo is not None
    # The offset is committed: the consumer goes on.
    assert ack_calls == ["ack"]


async def test_dead_letter_reason_names_the_invalid_field(ack_calls: list[str]) -> None:
    value = json.loads(encode(presence()))
    value["data"]["state"] = "sleeping"
    async with consumer(ack_calls) as c:
        await c.send(json.dumps(value).encode())
    assert c.seen == []
    assert "data.state" in c.letter().data.reason


async def test_tombstone_is_dead_lettered(ack_calls: list[str]) -> None:
    async with consumer(ack_calls) as c:
        await c.send(None, key=b"AG-0001")
    assert c.seen == []
    assert c.stats.dead_lettered == 1
    letter = c.letter().data
    assert letter.value_b64 == ""
    assert letter.key == "AG-0001"


def raise_(exc: BaseException) -> Handler:
    def fail(_: Presence) -> None:
        raise exc

    return fail


def validation_error() -> ValidationError:
    try:
        device.DevicePresence.model_validate({})
    except ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (PermanentError("device AG-0001 is unknown"), "PermanentError: device AG-0001 is unknown"),
        (ValueError("bad unit"), "ValueError: bad unit"),
        # A handler's own ValidationError reads like the record's (see the report).
        (validation_error(), "invalid record: device_id: Field required"),
        (IntegrityError("INSERT INTO x", {}, Exception("dup")), "IntegrityError: "),
    ],
    ids=["PermanentError", "ValueError", "ValidationError", "IntegrityError"],
)
async def test_permanent_handler_error_is_dead_lettered(
    ack_calls: list[str], exc: Exception, reason: str
) -> None:
    async with consumer(ack_calls, fail=raise_(exc)) as c:
        await c.send(encode(presence()))
    assert len(c.seen) == 1  # the handler saw it, then gave up on it
    assert c.stats == ConsumerStats(handled=0, dead_lettered=1, retried=0)
    data = c.letter().data
    assert data.reason.startswith(reason)
    assert data.consumer == GROUP
    assert base64.b64decode(data.value_b64) == encode(c.seen[0])
    assert ack_calls == ["ack"]


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionError("broker down"),
        TimeoutError(),
        OperationalError("SELECT 1", {}, Exception("connection refused")),
    ],
    ids=["ConnectionError", "TimeoutError", "OperationalError"],
)
async def test_transient_handler_error_is_retried_not_dead_lettered(
    ack_calls: list[str], exc: Exception
) -> None:
    async with consumer(ack_calls, fail=raise_(exc)) as c:
        await c.send(encode(presence()))
    assert c.stats == ConsumerStats(handled=0, dead_lettered=0, retried=1)
    assert c.letters == []
    # Not committed: the record is read again (the in-memory broker cannot show the re-read).
    assert ack_calls == ["nack"]


async def test_stats_count_a_mixed_stream(ack_calls: list[str]) -> None:
    def fail(event: Presence) -> None:
        if event.data.device_id == "AG-BAD":
            raise PermanentError("unknown device")

    async with consumer(ack_calls, fail=fail) as c:
        for _ in range(3):
            await c.send(encode(presence()))
        await c.send(b"not json")
        await c.send(encode(presence("AG-BAD")), key=b"AG-BAD")
    assert c.stats == ConsumerStats(handled=3, dead_lettered=2, retried=0)
    assert len(c.letters) == 2
    assert ack_calls == ["ack"] * 5


async def test_long_reason_is_cut(ack_calls: list[str]) -> None:
    async with consumer(ack_calls, fail=raise_(PermanentError("x" * 10_000))) as c:
        await c.send(encode(presence()))
    assert len(c.letter().data.reason) == 2000


async def test_unclassified_handler_error_is_not_silently_skipped(ack_calls: list[str]) -> None:
    async with consumer(ack_calls, fail=raise_(RuntimeError("handler bug"))) as c:
        # The in-memory broker re-raises what a real consumer would only log.
        with contextlib.suppress(RuntimeError):
            await c.send(encode(presence()))
    assert ack_calls == ["nack"] or (c.stats.dead_lettered == 1 and ack_calls == ["ack"])


async def test_each_event_id_is_new_in_dead_letters(ack_calls: list[str]) -> None:
    async with consumer(ack_calls) as c:
        await c.send(b"one")
        await c.send(b"two")
    ids = {platform.DEADLETTER.parse(record.value).event_id for record in c.letters}
    assert len(ids) == 2
    assert all(isinstance(event_id, uuid.UUID) for event_id in ids)
