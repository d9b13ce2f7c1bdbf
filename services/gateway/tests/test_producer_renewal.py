"""After a fatal idempotence error the bridge replaces its Kafka producer, and uplinks flow again.

aiokafka's idempotent producer does not recover from `OutOfOrderSequenceNumber` by itself
(aio-libs/aiokafka#1017): after a Kafka restart every later batch failed the same way and the
gateway forwarded nothing for minutes. Fakes stand in for the producer and the MQTT connection;
the fault suite's Kafka restart case covers the same path against the real servers.
"""

import asyncio
from typing import Any

from aiokafka.errors import KafkaConnectionError, OutOfOrderSequenceNumber

from common.kafka import needs_new_producer
from gateway.bridge import Bridge, _Uplink
from gateway.settings import GatewaySettings


class _Batch:
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def append(self, *, timestamp: Any, key: Any, value: bytes, headers: Any) -> object:
        self.records.append(value)
        return object()

    def close(self) -> None:
        pass


class _Producer:
    """Delivers, or fails every batch with `error`, like a producer stuck on a sequence."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.started = self.stopped = False
        self.delivered: list[bytes] = []

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int) -> Any:
        delivery = asyncio.get_running_loop().create_future()
        if self.error is not None:
            delivery.set_exception(self.error)
        else:
            self.delivered.extend(batch.records)
            delivery.set_result(None)
        return delivery


class _Connection:
    def __init__(self) -> None:
        self.acked: list[int] = []
        self.aborted = 0

    def puback(self, packet_ids: Any) -> None:
        self.acked.extend(packet_ids)

    def abort(self) -> None:
        self.aborted += 1


def _uplink(conn: _Connection, packet_id: int) -> _Uplink:
    return _Uplink("device.telemetry.v1", b"D1", b"{}", conn, packet_id, 1, "forwarded")  # type: ignore[arg-type]


async def test_a_stuck_producer_is_replaced_and_the_redelivery_goes_through() -> None:
    made = [_Producer(OutOfOrderSequenceNumber()), _Producer(None)]
    producers = iter(made)
    bridge = Bridge(GatewaySettings(), lambda: next(producers))
    await bridge.start_producer()
    conn = _Connection()

    await bridge._produce([_uplink(conn, 1)])
    await asyncio.sleep(0)  # the delivery callback
    # Not acked (the broker keeps it), the session dropped for a redelivery, renewal asked for.
    assert (conn.acked, conn.aborted) == ([], 1)
    assert bridge._renew_producer

    await bridge._replace_producer()
    assert made[0].stopped
    assert made[1].started
    assert bridge.stats.producer_renewals == 1
    await bridge._produce([_uplink(conn, 1)])  # the broker's redelivery
    await asyncio.sleep(0)
    assert conn.acked == [1]
    assert made[1].delivered == [b"{}"]


async def test_a_broker_that_is_away_does_not_replace_the_producer() -> None:
    made = [_Producer(KafkaConnectionError()), _Producer(None)]
    producers = iter(made)
    bridge = Bridge(GatewaySettings(), lambda: next(producers))
    conn = _Connection()
    await bridge._produce([_uplink(conn, 7)])
    await asyncio.sleep(0)
    assert conn.aborted == 1
    assert not bridge._renew_producer  # retriable: the same producer carries on


def test_fatal_errors_are_found_through_their_causes() -> None:
    outer = RuntimeError("relay round failed")
    outer.__cause__ = OutOfOrderSequenceNumber()
    assert needs_new_producer(outer)
    assert not needs_new_producer(KafkaConnectionError())
    assert not needs_new_producer(None)
