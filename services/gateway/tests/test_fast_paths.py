"""The uplink hot path's pieces without a broker: envelope encoding, rate limit, MQTT parsing."""

import asyncio
import json
import struct
from datetime import UTC, datetime
from typing import Any

import pytest

from common.contracts import device
from common.events import encode, new_event
from gateway import protocol
from gateway.limits import DeviceRateLimiter
from gateway.mqtt import ConnectOptions, MqttConnection

NOW = datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
UPLINKS = [
    ("telemetry", {"ts": 1700000000.5, "run_state": "running", "battery_v": 12,
                   "fuel_pct": 40.5, "engine_hours": 3, "lat": 50.1, "lon": 14.4}),
    ("telemetry", {"ts": "2024-05-01T10:00:00+02:00", "run_state": "stopped",
                   "battery_v": 12.6, "fuel_pct": 0, "engine_hours": 0}),
    ("status", {"state": "offline", "fw": "1.2.3"}),
    ("status", {"state": "online", "fw": "1.2.3", "ts": 1700000000}),
    ("ack", {"command_id": "c-1", "status": "failed", "detail": "naïve \u2603 \"quoted\""}),
    ("ota", {"command_id": "c-2", "phase": "downloading", "progress_pct": 50}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "body"), UPLINKS)
def test_fast_envelope_is_the_pydantic_envelope(kind: str, body: dict[str, Any]) -> None:
    verdict = protocol.read_uplink(
        f"devices/D-1/up/{kind}", json.dumps(body).encode(), received_at=NOW, max_bytes=16384
    )
    assert isinstance(verdict, protocol.Accepted)
    fast = protocol.encode_event(verdict.topic.event_type, "gateway", "D-1", verdict.data, NOW)
    slow = encode(
        new_event(
            type=verdict.topic.event_type,
            data=verdict.data,
            source="gateway",
            key="D-1",
            occurred_at=NOW,
        )
    )
    fast_doc, slow_doc = json.loads(fast), json.loads(slow)
    assert fast_doc.pop("event_id") != slow_doc.pop("event_id")  # fresh ids, same shape
    assert fast_doc == slow_doc
    parsed = verdict.topic.parse(fast)  # what consumers do
    assert parsed.data == verdict.topic.data.model_validate(verdict.data.__dict__)


def test_dead_letter_envelope_parses() -> None:
    refused = protocol.read_uplink(
        "devices/D-1/up/telemetry", b"{nope", received_at=NOW, max_bytes=16384
    )
    assert isinstance(refused, protocol.Refused)
    assert refused.code == "json"
    letter = device.DeviceDeadLetter(
        mqtt_topic="devices/D-1/up/telemetry",
        device_id="D-1",
        reason=refused.reason,
        payload_b64="e25vcGU=",
        received_at=NOW,
    )
    raw = protocol.encode_event(device.DEADLETTER.event_type, "gateway", "D-1", letter, NOW)
    assert device.DEADLETTER.parse(raw).data == letter


@pytest.mark.parametrize(
    ("topic", "payload", "code"),
    [
        ("devices/D-1/down/command", b"{}", "topic"),
        ("devices/D-1/up/nope", b"{}", "kind"),
        ("devices/D-1/up/telemetry", b"x" * 20_000, "oversize"),
        ("devices/D-1/up/telemetry", b'{"ts": 1}', "schema"),
        ("devices/D-1/up/telemetry", b"\xff\xfe", "json"),
    ],
)
def test_refusals_carry_a_bounded_reason_class(topic: str, payload: bytes, code: str) -> None:
    refused = protocol.read_uplink(topic, payload, received_at=NOW, max_bytes=16384)
    assert isinstance(refused, protocol.Refused)
    assert refused.code == code


def test_rate_limit_allows_a_burst_then_the_rate() -> None:
    limiter = DeviceRateLimiter(rate_per_s=10, burst=5)
    assert [limiter.allow("A", now=0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("B", now=0.0)  # another device is not held up
    assert limiter.allow("A", now=0.1)  # one token back after 1/rate s
    assert not limiter.allow("A", now=0.1)


def test_rate_limit_off_and_memory_bounded() -> None:
    assert all(DeviceRateLimiter(rate_per_s=0, burst=1).allow("A", now=0.0) for _ in range(100))
    limiter = DeviceRateLimiter(rate_per_s=1, burst=2, max_devices=100)
    for n in range(1000):
        limiter.allow(f"D{n}", now=0.0)
    assert len(limiter) <= 100


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True


def _publish(topic: str, payload: bytes, packet_id: int, *, retain: bool = False) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", packet_id)
    body += b"\x00" + payload  # no properties
    length = len(body)
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes((0x32 | retain,)) + bytes(encoded) + body


async def test_publishes_split_anywhere_are_parsed_and_acked_in_one_write() -> None:
    got: list[tuple[str, bytes, int, int, bool]] = []
    conn = MqttConnection(
        ConnectOptions(host="x", port=1, client_id="c", username="u", password="p"),
        lambda _conn, *message: got.append(message),
    )
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    transport.written.clear()  # the CONNECT
    stream = _publish("devices/A/up/telemetry", b"x" * 300, 7) + _publish(
        "devices/B/up/status", b"{}", 8, retain=True
    )
    for n in range(0, len(stream), 5):  # five bytes at a time, lengths split too
        conn.data_received(stream[n : n + 5])
    assert got == [
        ("devices/A/up/telemetry", b"x" * 300, 7, 1, False),
        ("devices/B/up/status", b"{}", 8, 1, True),  # a retained message handed on subscribe
    ]
    conn.puback([7, 8])
    assert bytes(transport.written) == b"\x40\x02\x00\x07\x40\x02\x00\x08"
    assert not transport.aborted
    conn.connection_lost(None)
    assert conn.closed.done()
    await asyncio.sleep(0)
