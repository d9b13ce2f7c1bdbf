"""`common.events` and `common.contracts`: the envelope, its wire form and each topic's data."""

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from common.contracts import ALL_TOPICS, Topic, commands, device, firmware, fleet, platform, tokens
from common.events import Envelope, encode, new_event

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

SAMPLES: dict[str, BaseModel] = {
    device.TELEMETRY.name: device.DeviceTelemetry(
        device_id="AG-0001",
        received_at=NOW,
        ts=NOW,
        run_state="running",
        battery_v=12.6,
        fuel_pct=55.5,
        engine_hours=1234.5,
        lat=48.2,
        lon=16.37,
    ),
    device.PRESENCE.name: device.DevicePresence(
        device_id="AG-0001", received_at=NOW, state="offline", fw="1.4.2", will=True
    ),
    device.REPORT.name: device.DeviceReport(
        device_id="AG-0001",
        received_at=NOW,
        kind="ota",
        command_id="cmd-1",
        phase="downloading",
        progress_pct=42,
    ),
    device.DEADLETTER.name: device.DeviceDeadLetter(
        mqtt_topic="devices/AG-0001/up/telemetry",
        device_id="AG-0001",
        reason="invalid JSON",
        payload_b64="e30=",
        received_at=NOW,
    ),
    fleet.DEVICE.name: fleet.FleetDevice(
        device_id="AG-0001",
        name="Pump house",
        model="D100",
        engine="diesel",
        transport="gsm",
        gps=True,
        dealer_id="dealer-1",
        customer_email="owner@example.com",
    ),
    commands.REQUEST.name: commands.CommandRequest(
        request_id="rollout-7:AG-0001",
        device_id="AG-0001",
        action="force_ota",
        params={"release_id": "rel-1"},
        requested_by="firmware:rollout-7",
        correlation={"rollout_id": "rollout-7"},
    ),
    commands.DISPATCH.name: commands.CommandDispatch(
        command_id="cmd-1",
        device_id="AG-0001",
        action="start",
        expires_at=NOW,
    ),
    commands.STATUS.name: commands.CommandStatus(
        command_id="cmd-1",
        device_id="AG-0001",
        action="start",
        status="sent",
        at=NOW,
        reporter="gateway",
    ),
    firmware.RELEASE.name: firmware.FirmwareRelease(
        release_id="rel-1",
        console="unified",
        version="2.4.1",
        models=["D100", "D180"],
        engine="diesel",
        transport="gsm",
        artifact_url="https://firmware.example/unified-2.4.1.bin",
        sha256="0" * 64,
        size=1_048_576,
        created_at=NOW,
    ),
    firmware.ROLLOUT.name: firmware.RolloutEvent(
        kind="device_state_changed",
        rollout_id="ro-1",
        release_id="rel-1",
        version="2.4.1",
        console="unified",
        scope="my_fleet",
        dealer_id="dealer-1",
        status="running",
        device_id="AG-0001",
        state="sent",
        previous_state="pending",
        attempt=1,
        counts={"pending": 9, "sent": 1},
        at=NOW,
    ),
    tokens.TOKEN.name: tokens.TokenEvent(
        kind="created",
        token_id="tok-1",
        name="dashboard",
        user_id="u-1",
        dealer_id="dealer-1",
        access="read",
        device_ids=["AG-0001"],
        expires_at=NOW,
        actor_user_id="u-2",
        at=NOW,
    ),
    platform.DEADLETTER.name: platform.DeadLetter(
        topic="device.telemetry.v1",
        partition=2,
        offset=41,
        key="AG-0001",
        value_b64="Z2FyYmFnZQ==",
        headers={"content-type": "application/json"},
        consumer="fleet-telemetry",
        reason="invalid record",
        failed_at=NOW,
    ),
}


def sample_event(topic: Topic[Any]) -> Envelope[Any]:
    return new_event(type=topic.event_type, data=SAMPLES[topic.name], source="tests", key="k-1")


def wire(topic: Topic[Any]) -> dict[str, Any]:
    """A valid record value of `topic`, as a dict to spoil."""
    value: dict[str, Any] = json.loads(encode(sample_event(topic)))
    return value


def test_new_event_makes_unique_ids_and_aware_timestamps() -> None:
    data = SAMPLES[fleet.DEVICE.name]
    before = datetime.now(UTC)
    events = [new_event(type="fleet.device", data=data, source="tests") for _ in range(50)]
    after = datetime.now(UTC)
    assert len({event.event_id for event in events}) == 50
    for event in events:
        assert event.occurred_at.tzinfo is not None
        assert event.occurred_at.utcoffset() == timedelta(0)
        assert before <= event.occurred_at <= after
        assert event.version == 1
        assert event.key is None


def test_new_event_keeps_an_explicit_time_and_refuses_a_naive_one() -> None:
    data = SAMPLES[fleet.DEVICE.name]
    stamped = new_event(type="fleet.device", data=data, source="tests", occurred_at=NOW)
    assert stamped.occurred_at == NOW
    with pytest.raises(ValidationError, match="occurred_at"):
        new_event(
            type="fleet.device",
            data=data,
            source="tests",
            occurred_at=datetime(2026, 3, 1, 12, 0),  # noqa: DTZ001 - the point of the test
        )


def test_every_topic_has_a_sample() -> None:
    assert {topic.name for topic in ALL_TOPICS} == set(SAMPLES)
    assert len({topic.name for topic in ALL_TOPICS}) == len(ALL_TOPICS)


@pytest.mark.parametrize("topic", ALL_TOPICS, ids=lambda topic: topic.name)
def test_encode_then_parse_round_trips(topic: Topic[Any]) -> None:
    event = sample_event(topic)
    raw = encode(event)
    assert isinstance(raw, bytes)
    parsed = topic.parse(raw)
    assert parsed == event
    assert isinstance(parsed.data, topic.data)
    assert parsed.data == SAMPLES[topic.name]
    # The str form of a record value parses the same.
    assert topic.parse(raw.decode()) == event


@pytest.mark.parametrize("topic", ALL_TOPICS, ids=lambda topic: topic.name)
def test_parse_rejects_a_naive_occurred_at(topic: Topic[Any]) -> None:
    value = wire(topic)
    value["occurred_at"] = "2026-03-01T12:00:00"
    with pytest.raises(ValidationError, match="occurred_at"):
        topic.parse(json.dumps(value))


@pytest.mark.parametrize("field", ["event_id", "type", "version", "occurred_at", "source", "data"])
def test_parse_rejects_a_missing_envelope_field(field: str) -> None:
    value = wire(fleet.DEVICE)
    del value[field]
    with pytest.raises(ValidationError, match=field):
        fleet.DEVICE.parse(json.dumps(value))


def test_parse_rejects_a_missing_data_field() -> None:
    value = wire(device.TELEMETRY)
    del value["data"]["device_id"]
    with pytest.raises(ValidationError, match=r"data\.device_id"):
        device.TELEMETRY.parse(json.dumps(value))


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("event_id",), "not-a-uuid"),
        (("version",), "one"),
        (("version",), 0),
        (("type",), ""),
        (("data", "gps"), "maybe"),
        (("data", "transport"), "carrier-pigeon"),
        (("data",), "a string"),
    ],
)
def test_parse_rejects_wrong_types(path: tuple[str, ...], bad: object) -> None:
    value = wire(fleet.DEVICE)
    target = value
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = bad
    with pytest.raises(ValidationError, match=r"\.".join(path)):
        fleet.DEVICE.parse(json.dumps(value))


def test_parse_rejects_a_record_that_is_not_json() -> None:
    with pytest.raises(ValidationError):
        fleet.DEVICE.parse(b'{"event_id": "x", "data": 4')


@pytest.mark.parametrize(
    "topic", [device.TELEMETRY, device.PRESENCE, device.REPORT], ids=lambda topic: topic.name
)
def test_device_events_ignore_fields_added_later_in_the_version(topic: Topic[Any]) -> None:
    value = wire(topic)
    value["data"]["surprise"] = 1
    parsed = topic.parse(json.dumps(value))
    assert not hasattr(parsed.data, "surprise")


def test_fleet_device_ignores_an_added_field_and_envelope_too() -> None:
    value = wire(fleet.DEVICE)
    value["data"]["added_later"] = "x"
    value["trace"] = "added later"
    parsed = fleet.DEVICE.parse(json.dumps(value))
    assert parsed.data == SAMPLES[fleet.DEVICE.name]


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("lat", 91),
        ("lat", -90.5),
        ("lon", 180.1),
        ("fuel_pct", 101),
        ("fuel_pct", -1),
        ("engine_hours", -0.1),
        ("run_state", "exploded"),
    ],
)
def test_telemetry_rejects_out_of_range_readings(field: str, bad: object) -> None:
    value = wire(device.TELEMETRY)
    value["data"][field] = bad
    with pytest.raises(ValidationError, match=rf"data\.{field}"):
        device.TELEMETRY.parse(json.dumps(value))


def test_telemetry_accepts_the_range_limits() -> None:
    value = wire(device.TELEMETRY)
    value["data"].update(lat=-90, lon=180, fuel_pct=100, engine_hours=0)
    parsed = device.TELEMETRY.parse(json.dumps(value))
    assert isinstance(parsed.data, device.DeviceTelemetry)
    assert parsed.data.lat == -90
    assert parsed.data.fuel_pct == 100


def test_envelope_is_immutable() -> None:
    event = sample_event(fleet.DEVICE)
    with pytest.raises(ValidationError):
        event.source = "someone else"  # type: ignore[misc]


def test_parse_keeps_the_event_id() -> None:
    event_id = uuid.uuid4()
    value = wire(fleet.DEVICE)
    value["event_id"] = str(event_id)
    assert fleet.DEVICE.parse(json.dumps(value)).event_id == event_id
