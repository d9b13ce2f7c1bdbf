"""A simulated controller's state and behaviour, free of I/O (the runner does the MQTT).

Times are in real seconds already scaled by the time factor; the runner sleeps them.
"""

import json
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from common.catalog import MODELS

Transport = Literal["gsm", "wifi"]
FAULTS = ("ota_fail", "never_returns", "wrong_version", "malformed", "flapping")

# Default places GPS units sit around: (name, lat, lon, radius in km).
REGIONS: tuple[tuple[str, float, float, float], ...] = (
    ("houston", 29.76, -95.37, 60.0),
    ("miami", 25.76, -80.19, 40.0),
    ("rotterdam", 51.92, 4.48, 30.0),
    ("dubai", 25.20, 55.27, 40.0),
    ("sydney", -33.87, 151.21, 50.0),
)


@dataclass(frozen=True)
class Timing:
    """How long things take, in seconds, before the time factor."""

    telemetry_interval_s: float = 10.0
    step_s: float = 1.0  # between acks and OTA phases
    reboot_offline_s: float = 4.0
    wifi_return_s: float = 5.0  # WiFi units come back from an OTA in seconds...
    gsm_return_s: float = 45.0  # ...GSM and GPS units noticeably later
    flap_every_s: float = 20.0

    def scaled(self, factor: float) -> "Timing":
        """Every duration times `factor` (0.1 = ten times faster)."""
        return Timing(**{k: v * factor for k, v in self.__dict__.items()})


@dataclass(frozen=True)
class DeviceSpec:
    """One device of the device file."""

    id: str
    model: str
    transport: Transport
    gps: bool
    firmware_version: str
    password: str | None = None
    name: str = ""
    engine: str | None = None
    lat: float | None = None
    lon: float | None = None
    username: str | None = None  # defaults to the id (load tests share one account)
    faults: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"{self.id}: unknown model {self.model!r}; one of {', '.join(MODELS)}")
        if self.transport not in MODELS[self.model].transports:
            raise ValueError(f"{self.id}: {self.model} has no {self.transport} variant")


@dataclass
class DeviceState:
    """What a running device knows and reports."""

    spec: DeviceSpec
    fw: str
    run_state: Literal["running", "stopped"] = "stopped"
    battery_v: float = 12.6
    fuel_pct: float = 80.0
    engine_hours: float = 0.0
    lat: float | None = None
    lon: float | None = None
    sent: int = 0
    seen: "OrderedDict[str, None]" = field(default_factory=OrderedDict)

    @classmethod
    def new(cls, spec: DeviceSpec, rng: random.Random) -> "DeviceState":
        """A device as it powers on for the first time."""
        state = cls(spec=spec, fw=spec.firmware_version)
        state.fuel_pct = round(rng.uniform(35, 100), 1)
        state.engine_hours = round(rng.uniform(10, 4000), 1)
        if spec.gps:
            if spec.lat is not None and spec.lon is not None:
                state.lat, state.lon = spec.lat, spec.lon
            else:
                state.lat, state.lon = place_in_region(rng.choice(REGIONS), rng)
        return state

    def return_delay_s(self, timing: Timing) -> float:
        """After an OTA: WiFi units return quickly; GSM or GPS units take longer."""
        slow = self.spec.transport == "gsm" or self.spec.gps
        return timing.gsm_return_s if slow else timing.wifi_return_s

    def first_time(self, command_id: str) -> bool:
        """Remember `command_id`; False if the device already ran it (bounded memory)."""
        if command_id in self.seen:
            return False
        self.seen[command_id] = None
        if len(self.seen) > 500:
            self.seen.popitem(last=False)
        return True

    def tick(self, elapsed_s: float, rng: random.Random) -> None:
        """Advance readings by `elapsed_s` of (simulated) time."""
        hours = elapsed_s / 3600
        if self.run_state == "running":
            self.engine_hours += hours
            self.fuel_pct = max(0.0, self.fuel_pct - hours * rng.uniform(4, 9))
            self.battery_v = min(14.4, self.battery_v + rng.uniform(0, 0.05))
            if self.fuel_pct <= 0:
                self.run_state = "stopped"
        else:
            self.battery_v = max(11.8, self.battery_v - rng.uniform(0, 0.01))
        if self.lat is not None and self.lon is not None:
            # GPS jitter of a few metres around a parked unit.
            self.lat += rng.gauss(0, 0.00003)
            self.lon += rng.gauss(0, 0.00003)

    def telemetry(self, now: datetime) -> dict[str, Any]:
        """The `up/telemetry` payload."""
        body: dict[str, Any] = {
            "ts": round(now.timestamp(), 3),
            "run_state": self.run_state,
            "battery_v": round(self.battery_v, 2),
            "fuel_pct": round(self.fuel_pct, 1),
            "engine_hours": round(self.engine_hours, 2),
        }
        if self.lat is not None and self.lon is not None:
            body["lat"], body["lon"] = round(self.lat, 6), round(self.lon, 6)
        return body

    def status(self, state: Literal["online", "offline"], now: datetime | None) -> dict[str, Any]:
        """`up/status`; without `now` it is the Last Will (a will cannot know when it fires)."""
        body: dict[str, Any] = {"state": state, "fw": self.fw}
        if now is not None:
            body["ts"] = round(now.timestamp(), 3)
        return body


def place_in_region(
    region: tuple[str, float, float, float], rng: random.Random
) -> tuple[float, float]:
    """A random point within the region's radius."""
    _, lat, lon, radius_km = region
    distance = radius_km * math.sqrt(rng.random())
    bearing = rng.uniform(0, 2 * math.pi)
    dlat = distance / 111.0 * math.cos(bearing)
    dlon = distance / (111.0 * max(0.1, math.cos(math.radians(lat)))) * math.sin(bearing)
    return round(lat + dlat, 6), round(lon + dlon, 6)


@dataclass(frozen=True)
class Command:
    """A command as the device reads it from `down/command`."""

    command_id: str
    action: str
    params: dict[str, Any]
    expires_at: datetime

    @classmethod
    def parse(cls, payload: bytes) -> "Command | None":
        """The command, or None when the payload is not one (a device ignores those)."""
        try:
            body = json.loads(payload)
            expires = datetime.fromisoformat(str(body["expires_at"]).replace("Z", "+00:00"))
            return cls(
                command_id=str(body["command_id"]),
                action=str(body["action"]),
                params=dict(body.get("params") or {}),
                expires_at=expires if expires.tzinfo else expires.replace(tzinfo=UTC),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def expired(self, now: datetime) -> bool:
        """A device ignores a command past its `expires_at`."""
        return self.expires_at <= now


def malformed_telemetry(rng: random.Random) -> bytes:
    """One of the ways broken firmware gets a payload wrong."""
    return rng.choice(
        [
            b'{"ts": 1700000000, "run_state": "running", "battery_v": "12.6"',
            b'{"ts": 1700000000, "run_state": "idling", "battery_v": 12.6, '
            b'"fuel_pct": 50, "engine_hours": 1}',
            b'{"ts": 1700000000, "run_state": "running", "battery_v": 12.6, "fuel_pct": 50, '
            b'"engine_hours": 1, "debug": true}',
            b"\xff\xfe garbage",
        ]
    )
