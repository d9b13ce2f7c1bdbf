# mypy: allow-untyped-defs, disable-error-code="no-any-return,index"
"""Live state from device events, applied in batches against a real PostgreSQL; and the map."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from common.contracts.device import DevicePresence, DeviceReport, DeviceTelemetry
from common.events import Envelope, new_event
from fleet import handlers

pytestmark = pytest.mark.stack

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def presence(device_id: str, t: float, state: str = "online", **kw: Any) -> Envelope[Any]:
    data = DevicePresence(device_id=device_id, received_at=at(t), state=state, **kw)
    return new_event(type="device.presence", data=data, source="test", key=device_id)


def telemetry(device_id: str, t: float, **kw: Any) -> Envelope[Any]:
    data = DeviceTelemetry(device_id=device_id, received_at=at(t), ts=at(t), **kw)
    return new_event(type="device.telemetry", data=data, source="test", key=device_id)


def sessions_of(api: Any) -> Any:
    return api.client._transport.app.state.infra.sessions


async def detail(api: Any, h: Any, device_id: str) -> dict[str, Any]:
    response = await api.client.get(f"/api/v1/devices/{device_id}", headers=api.as_(h.admin()))
    assert response.status_code == 200, response.text
    return response.json()


async def registered(api: Any, h: Any, **overrides: Any) -> str:
    device_id = h.unique("LIVE")
    response = await api.client.post(
        "/api/v1/devices",
        json=h.registration(device_id, "dealer-live", **overrides),
        headers=api.as_(h.admin()),
    )
    assert response.status_code == 201, response.text
    return device_id


async def test_presence_moves_only_forward_and_reports_firmware(api, h):
    device_id = await registered(api, h)
    sessions = sessions_of(api)
    await handlers.apply_presence(sessions, [presence(device_id, 10, fw="2.5.0")])
    state = await detail(api, h, device_id)
    assert state["connection"] == "live"
    assert state["firmware_version"] == "2.5.0"
    assert state["last_seen_at"] == at(10).isoformat().replace("+00:00", "Z")

    # A late, older offline event and a redelivery change nothing.
    await handlers.apply_presence(sessions, [presence(device_id, 5, "offline")])
    await handlers.apply_presence(sessions, [presence(device_id, 10, fw="2.5.0")])
    assert (await detail(api, h, device_id))["connection"] == "live"

    # Within one batch the newest wins, whatever the record order.
    await handlers.apply_presence(
        sessions,
        [presence(device_id, 30, "offline", will=True), presence(device_id, 20, fw="2.6.0")],
    )
    state = await detail(api, h, device_id)
    assert state["connection"] == "offline"
    assert state["firmware_version"] == "2.5.0", "the older online record lost to the will"
    assert state["last_seen_at"].startswith("2026-03-01T12:00:10"), "a Last Will is not a sighting"


async def test_telemetry_sets_run_state_position_history_and_attention(api, h):
    device_id = await registered(api, h)
    sessions = sessions_of(api)
    history = api.settings.position_history
    for step in range(history + 5):
        await handlers.apply_telemetry(
            sessions,
            [telemetry(device_id, 100 + step, run_state="running", fuel_pct=80, battery_v=13.1,
                       lat=30.0 + step / 1000, lon=-97.0)],
            history=history,
        )  # fmt: skip
    state = await detail(api, h, device_id)
    assert state["connection"] == "live"
    assert state["run_state"] == "running"
    assert state["attention"] is False
    last = history + 4
    assert state["position"]["lat"] == pytest.approx(30.0 + last / 1000)

    response = await api.client.get(
        f"/api/v1/devices/{device_id}/positions", headers=api.as_(h.admin())
    )
    items = response.json()["items"]
    assert len(items) == history, "the history is bounded per device"
    assert items[0]["lat"] == pytest.approx(30.0 + last / 1000)

    # An older reading changes nothing; a newer one without GPS keeps the position.
    await handlers.apply_telemetry(
        sessions, [telemetry(device_id, 50, run_state="stopped", lat=1.0, lon=1.0)], history=history
    )
    assert (await detail(api, h, device_id))["run_state"] == "running"
    await handlers.apply_telemetry(
        sessions, [telemetry(device_id, 1000, run_state="stopped", fuel_pct=5)], history=history
    )
    state = await detail(api, h, device_id)
    assert state["run_state"] == "stopped"
    assert state["position"]["lat"] == pytest.approx(30.0 + last / 1000)
    assert state["attention"] is True, "low fuel is an alarm"


async def test_reports_count_as_sightings(api, h):
    device_id = await registered(api, h)
    report = DeviceReport(device_id=device_id, received_at=at(7), kind="ack", command_id="c1",
                          status="accepted")  # fmt: skip
    event = new_event(type="device.report", data=report, source="test", key=device_id)
    await handlers.apply_reports(sessions_of(api), [event])
    state = await detail(api, h, device_id)
    assert state["connection"] == "live"
    assert state["last_seen_at"].startswith("2026-03-01T12:00:07")


async def test_events_for_unknown_devices_are_ignored(api, h):
    sessions = sessions_of(api)
    await handlers.apply_presence(sessions, [presence("NEVER-REGISTERED", 1)])
    await handlers.apply_telemetry(
        sessions, [telemetry("NEVER-REGISTERED", 1, lat=1, lon=1)], history=5
    )
    response = await api.client.get("/api/v1/devices/NEVER-REGISTERED", headers=api.as_(h.admin()))
    assert response.status_code == 404


async def test_map_shows_gps_devices_in_scope_inside_the_box_with_markers(api, h):
    sessions = sessions_of(api)
    dealer_id = f"dealer-map-{h.unique()}"
    ids = {}
    customer = f"{h.unique('c').lower()}@farm.test"
    for name, gps in (("ok", True), ("alarm", True), ("away", True), ("nogps", False)):
        ids[name] = h.unique("MAP")
        # The alarm unit is the customer's: the map's scope is bound like the search's.
        email = customer if name == "alarm" else None
        response = await api.client.post(
            "/api/v1/devices",
            json=h.registration(ids[name], dealer_id, gps=gps, customer_email=email),
            headers=api.as_(h.admin()),
        )
        assert response.status_code == 201
    now = datetime.now(UTC)

    def reading(device_id: str, lat: float, lon: float, **kw: Any) -> Envelope[Any]:
        data = DeviceTelemetry(device_id=device_id, received_at=now, ts=now, lat=lat, lon=lon, **kw)
        return new_event(type="device.telemetry", data=data, source="test", key=device_id)

    await handlers.apply_telemetry(
        sessions,
        [
            reading(ids["ok"], 10.5, 20.5, battery_v=13.0),
            reading(ids["alarm"], 10.6, 20.6, battery_v=9.0),
            reading(ids["away"], 50.0, 20.5),
            reading(ids["nogps"], 10.5, 20.5),
        ],
        history=5,
    )
    response = await api.client.get(
        "/api/v1/map/devices", params={"bbox": "20,10,21,11"}, headers=api.as_(h.dealer(dealer_id))
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "FeatureCollection"
    features = {f["properties"]["id"]: f for f in body["features"]}
    assert set(features) == {ids["ok"], ids["alarm"]}
    assert features[ids["ok"]]["geometry"] == {"type": "Point", "coordinates": [20.5, 10.5]}
    assert features[ids["ok"]]["properties"]["marker"] == "green"
    assert features[ids["alarm"]]["properties"]["marker"] == "red"
    assert set(features[ids["ok"]]["properties"]) == {
        "id", "name", "marker", "connection", "last_seen_at"
    }  # fmt: skip

    other = await api.client.get(
        "/api/v1/map/devices", params={"bbox": "20,10,21,11"}, headers=api.as_(h.dealer("other"))
    )
    assert other.json()["features"] == []

    async def seen_on_map(principal: Any) -> set[str]:
        response = await api.client.get(
            "/api/v1/map/devices", params={"bbox": "20,10,21,11"}, headers=api.as_(principal)
        )
        assert response.status_code == 200, response.text
        return {f["properties"]["id"] for f in response.json()["features"]}

    assert await seen_on_map(h.customer(dealer_id, customer)) == {ids["alarm"]}
    restricted = h.dealer(dealer_id, device_ids=frozenset({ids["ok"], ids["away"]}))
    assert await seen_on_map(restricted) == {ids["ok"]}

    for bbox in ("20,10,21", "a,b,c,d", "-181,0,0,1", "0,-91,1,0", "21,10,20,11", "nan,0,1,1"):
        bad = await api.client.get(
            "/api/v1/map/devices", params={"bbox": bbox}, headers=api.as_(h.admin())
        )
        assert bad.status_code == 422, bbox
        assert bad.json()["detail"].startswith("bbox:")
