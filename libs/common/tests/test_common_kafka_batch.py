"""`common.kafka_batch`: how a batch consumer polls and commits (no servers needed)."""

import asyncio
from typing import Any, cast

import anyio
import pytest
from faststream.kafka import KafkaBroker

from common import kafka_batch
from common.contracts import device
from common.kafka_batch import subscribe_batch

TIMEOUT_MS = 20


class Clock:
    """`time.monotonic` and `asyncio.sleep` of the module, on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Consumer:
    """A consumer whose poll returns `batches` after `waits` seconds."""

    def __init__(self, clock: Clock, waits: float, batches: dict[str, list[str]]) -> None:
        self.clock, self.waits, self.batches = clock, waits, batches
        self.polls: list[dict[str, Any]] = []

    async def getmany(self, **kwargs: Any) -> dict[str, list[str]]:
        self.polls.append(kwargs)
        self.clock.now += self.waits
        return self.batches


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(kafka_batch, "_clock", fake.monotonic)
    monkeypatch.setattr(kafka_batch, "_sleep", fake.sleep)
    # FastStream's own poll sleeps with anyio: seen too, should it come back.
    monkeypatch.setattr(anyio, "sleep", fake.sleep)
    return fake


def poll() -> Any:
    broker = KafkaBroker("127.0.0.1:1")

    async def handler(_: Any) -> None:
        return None

    subscribe_batch(
        broker,
        device.TELEMETRY,
        group_id="g",
        handler=handler,
        source="tests",
        batch_timeout_ms=TIMEOUT_MS,
        max_records=7,
    )
    (subscriber,) = broker.subscribers
    return cast(Any, subscriber).get_msg


async def test_records_are_handed_over_at_once_as_one_batch(clock: Clock) -> None:
    consumer = Consumer(clock, waits=0.001, batches={"p0": ["a", "b"], "p1": ["c"]})
    assert await poll()(consumer) == ("a", "b", "c")
    assert consumer.polls == [{"timeout_ms": TIMEOUT_MS, "max_records": 7}]
    assert clock.slept == []


async def test_a_poll_that_waited_its_timeout_is_not_followed_by_another_wait(
    clock: Clock,
) -> None:
    # FastStream's own loop slept the timeout again here: a record arriving in that sleep
    # waited for it on every hop of a command's round trip.
    consumer = Consumer(clock, waits=TIMEOUT_MS / 1000, batches={})
    assert await poll()(consumer) == ()
    assert clock.slept == []


async def test_a_poll_that_came_back_empty_at_once_waits_out_the_rest(clock: Clock) -> None:
    # aiokafka does that while partitions are reassigned: the loop must not spin.
    consumer = Consumer(clock, waits=0.005, batches={})
    assert await poll()(consumer) == ()
    assert clock.slept == [pytest.approx(0.015)]


class Record:
    def __init__(self, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = "t", partition, offset


class CommittingConsumer:
    """Records each commit; a commit waits until the test lets it through."""

    def __init__(self) -> None:
        self.commits: list[dict[int, int]] = []
        self.gate = asyncio.Event()
        self.fail_next = False

    async def commit(self, offsets: dict[Any, Any]) -> None:
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("coordinator went away")
        self.commits.append({tp.partition: meta.offset for tp, meta in offsets.items()})


async def test_the_next_batch_does_not_wait_for_the_previous_commit() -> None:
    consumer = CommittingConsumer()
    committer = kafka_batch._Committer("g", interval_s=0)
    committer.handled(consumer, [Record(0, 5), Record(0, 6), Record(1, 2)])
    await asyncio.sleep(0)  # the first commit is in flight, held at the gate
    # Handing over the next batch returns at once, while that commit is still pending.
    committer.handled(consumer, [Record(0, 7)])
    committer.handled(consumer, [Record(1, 1)])  # older than what was handed over: no step back
    assert consumer.commits == []
    consumer.gate.set()
    await committer.flush()
    # One commit at a time, past the last record handled: the position only moves forward.
    assert consumer.commits == [{0: 7, 1: 3}, {0: 8}]


async def test_a_failed_commit_is_not_fatal_and_later_offsets_still_go() -> None:
    consumer = CommittingConsumer()
    consumer.fail_next = True
    consumer.gate.set()
    committer = kafka_batch._Committer("g", interval_s=0)
    committer.handled(consumer, [Record(0, 1)])
    await committer.flush()
    committer.handled(consumer, [Record(0, 2)])
    await committer.flush()
    assert consumer.commits == [{0: 3}]


async def test_under_load_batches_share_a_commit_at_most_every_interval() -> None:
    consumer = CommittingConsumer()
    consumer.gate.set()
    committer = kafka_batch._Committer("g", interval_s=0.2)
    committer.handled(consumer, [Record(0, 1)])
    await asyncio.sleep(0)  # the first goes at once
    for offset in range(2, 12):  # ten batches within the interval
        committer.handled(consumer, [Record(0, offset)])
        await asyncio.sleep(0.005)
    await committer.flush()
    assert consumer.commits == [{0: 2}, {0: 12}]
