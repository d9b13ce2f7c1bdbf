"""The device protocol checks, without a broker: what is accepted, and why the rest is refused."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from common.contracts import device
from common.contracts.commands import CommandDispatch
from gateway import protocol

NOW = datetime(2025, 1, 1, tzinfo=UTC)
GOOD = {
    "ts": 1700000000,
    "run_state": "stopped",
    "battery_v": 12.6,
    "fuel_pct": 50,
    "engine_hours": 3,
}


def read(topic: str, body: object) -> protocol.Accepted | protocol.Refused:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return protocol.read_uplink(topic, raw, received_at=NOW, max_bytes=16384)


def test_telemetry_becomes_the_contract_event() -> None:
    verdict = read("devices/D-1/up/telemetry", {**GOOD, "ts": "2024-05-01T10:00:00+02:00"})
    assert isinstance(verdict, protocol.Accepted)
    assert verdict.topic is device.TELEMETRY
    assert verdict.data.device_id == "D-1"
    assert verdict.data.ts == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert verdict.data.received_at == NOW


def test_will_is_an_offline_status_without_ts() -> None:
    will = read("devices/D-1/up/status", {"state": "offline", "fw": "1.0"})
    orderly = read("devices/D-1/up/status", {"state": "offline", "fw": "1.0", "ts": 1})
    assert isinstance(will, protocol.Accepted)
    assert will.data.will is True
    assert isinstance(orderly, protocol.Accepted)
    assert orderly.data.will is False


def test_a_retained_status_handed_to_a_new_subscription_keeps_the_devices_time() -> None:
    hour_ago = NOW - timedelta(hours=1)
    status = {"state": "offline", "fw": "1.0", "ts": hour_ago.timestamp()}
    raw = json.dumps(status).encode()
    live = protocol.read_uplink("devices/D-1/up/status", raw, received_at=NOW, max_bytes=999)
    replay = protocol.read_uplink(
        "devices/D-1/up/status", raw, received_at=NOW, max_bytes=999, retained=True
    )
    assert isinstance(live, protocol.Accepted)
    assert isinstance(replay, protocol.Accepted)
    assert (live.data.received_at, live.data.replayed) == (NOW, False)
    assert (replay.data.received_at, replay.data.replayed) == (hour_ago, True)
    # A device clock ahead of ours does not date it in the future; a Will has no time of its own.
    ahead = {**status, "ts": (NOW + timedelta(hours=1)).timestamp()}
    will = {"state": "offline"}
    for body, expected in ((ahead, NOW), (will, NOW)):
        verdict = protocol.read_uplink(
            "devices/D-1/up/status",
            json.dumps(body).encode(),
            received_at=NOW,
            max_bytes=999,
            retained=True,
        )
        assert isinstance(verdict, protocol.Accepted)
        assert verdict.data.received_at == expected


@pytest.mark.parametrize(
    ("topic", "body", "reason"),
    [
        ("devices/D-1/up/telemetry", {**GOOD, "extra": 1}, "extra"),
        ("devices/D-1/up/telemetry", {**GOOD, "battery_v": "12.6"}, "battery_v"),
        ("devices/D-1/up/telemetry", {**GOOD, "ts": True}, "ts"),
        ("devices/D-1/up/telemetry", {**GOOD, "ts": 1e30}, "out of range"),
        ("devices/D-1/up/telemetry", {**GOOD, "fuel_pct": 101}, "fuel_pct"),
        ("devices/D-1/up/ota", {"command_id": "c", "phase": "flashing"}, "phase"),
        ("devices/D-1/up/telemetry", b"[1, 2", "invalid telemetry"),
        ("devices/D-1/up/telemetry", b"x" * 16385, "exceeds"),
        ("devices/D-1/down/command", GOOD, "outside"),
        ("devices/D 1/up/telemetry", GOOD, "invalid device id"),
    ],
)
def test_refusals_name_the_reason(topic: str, body: object, reason: str) -> None:
    verdict = read(topic, body)
    assert isinstance(verdict, protocol.Refused)
    assert reason in verdict.reason


def test_command_payload_and_expiry() -> None:
    command = CommandDispatch(
        command_id="c1", device_id="D-1", action="stop", expires_at=NOW + timedelta(seconds=5)
    )
    assert json.loads(protocol.command_payload(command)) == {
        "command_id": "c1",
        "action": "stop",
        "params": {},
        "expires_at": "2025-01-01T00:00:05Z",
    }
    assert not protocol.is_expired(command, NOW)
    assert protocol.is_expired(command, NOW + timedelta(seconds=5))
