# mypy: allow-untyped-defs, disable-error-code="no-any-return"
"""`autogen_fleet_devices{state}` on /metrics: live, offline and attention counts."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from common.contracts.device import DevicePresence, DeviceTelemetry
from common.events import new_event
from fleet import handlers, metrics

pytestmark = pytest.mark.stack

LONG_AGO = datetime.now(UTC) - timedelta(days=2)  # past every offline threshold


async def register(api: Any, h: Any) -> str:
    device_id = h.unique("MET")
    response = await api.client.post(
        "/api/v1/devices",
        json=h.registration(device_id, "dealer-metrics", transport="wifi", gps=False),
        headers=api.as_(h.admin()),
    )
    assert response.status_code == 201, response.text
    return device_id


def gauge(text: str, state: str) -> float:
    prefix = f'autogen_fleet_devices{{state="{state}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix))[len(prefix) :])


async def test_the_gauge_counts_devices_by_state(api, h):
    sessions = api.client._transport.app.state.infra.sessions
    before = await metrics.refresh(sessions, api.settings)
    live, lost, low_fuel = [await register(api, h) for _ in range(3)]
    now = datetime.now(UTC)

    def presence(device_id: str, state: str, at: datetime) -> Any:
        data = DevicePresence(device_id=device_id, received_at=at, state=state)
        return new_event(type="device.presence", data=data, source="test", key=device_id)

    await handlers.apply_presence(
        sessions,
        [presence(live, "online", now), presence(lost, "online", LONG_AGO),
         presence(low_fuel, "online", now)],
    )  # fmt: skip
    await handlers.apply_presence(
        sessions, [presence(lost, "offline", LONG_AGO + timedelta(seconds=1))]
    )
    reading = DeviceTelemetry(device_id=low_fuel, received_at=now, ts=now, fuel_pct=3.0)
    event = new_event(type="device.telemetry", data=reading, source="test", key=low_fuel)
    await handlers.apply_telemetry(sessions, [event], history=5)

    after = await metrics.refresh(sessions, api.settings)
    assert after["live"] - before["live"] == 2  # live and low_fuel
    assert after["offline"] - before["offline"] == 1  # lost
    assert after["attention"] - before["attention"] == 2  # lost (offline 2 days), low fuel
    scraped = (await api.client.get("/metrics")).text
    for state in ("live", "offline", "attention"):
        assert gauge(scraped, state) == after[state]
