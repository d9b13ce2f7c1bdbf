"""The simulated device's rules, without a broker."""

import random
from datetime import UTC, datetime

import pytest

from gateway.simulator.__main__ import assign_faults, generated
from gateway.simulator.model import Command, DeviceSpec, DeviceState, Timing

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def spec(**kw: object) -> DeviceSpec:
    base: dict[str, object] = {
        "id": "D1",
        "model": "V5",
        "engine": "gas",
        "transport": "wifi",
        "gps": False,
        "firmware_version": "1.0",
    }
    base.update(kw)
    return DeviceSpec(**base)  # type: ignore[arg-type]


def test_gsm_and_gps_units_return_later_than_wifi() -> None:
    timing = Timing().scaled(0.1)
    rng = random.Random(1)
    wifi = DeviceState.new(spec(), rng)
    gsm = DeviceState.new(spec(transport="gsm"), rng)
    gps = DeviceState.new(spec(gps=True), rng)
    assert wifi.return_delay_s(timing) < gsm.return_delay_s(timing)
    assert gps.return_delay_s(timing) == gsm.return_delay_s(timing)
    assert wifi.return_delay_s(timing) == pytest.approx(0.5)


def test_running_burns_fuel_and_counts_hours_and_gps_units_report_position() -> None:
    state = DeviceState.new(spec(gps=True), random.Random(2))
    state.run_state = "running"
    hours, fuel = state.engine_hours, state.fuel_pct
    state.tick(3600, random.Random(3))
    body = state.telemetry(NOW)
    assert body["engine_hours"] == pytest.approx(hours + 1, abs=0.01)
    assert body["fuel_pct"] < fuel
    assert {"lat", "lon"} <= body.keys()
    assert "lat" not in DeviceState.new(spec(), random.Random(2)).telemetry(NOW)


def test_commands_run_once_and_not_after_expiry() -> None:
    state = DeviceState.new(spec(), random.Random(1))
    assert state.first_time("c1")
    assert not state.first_time("c1")
    late = Command.parse(
        b'{"command_id": "c2", "action": "start", "params": {}, '
        b'"expires_at": "2025-01-01T00:00:00Z"}'
    )
    assert late is not None
    assert late.expired(NOW)
    assert Command.parse(b"not json") is None


def test_unknown_model_or_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        spec(model="Z9")


def test_generated_fleet_covers_every_model_and_transport_and_faults_are_assigned() -> None:
    rows = generated(12, "sim-", "u", "p")
    assert {(r["model"], r["transport"]) for r in rows} == {
        (m, t) for m in ("X Pro", "D100", "D180", "V100", "V5", "Ultra") for t in ("gsm", "wifi")
    }
    ids = [r["id"] for r in rows]
    faults = assign_faults(ids, ["ota_fail=sim-00001", "flapping=0.5"], random.Random(1))
    assert faults["sim-00001"] >= {"ota_fail"}
    assert sum("flapping" in f for f in faults.values()) == 6
