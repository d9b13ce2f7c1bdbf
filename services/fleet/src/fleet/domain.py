"""The fleet's plain rules: what a device is, when it needs attention, cursors and bboxes.

No framework and no I/O here: the store reads rows into `Device`, the handlers apply these
rules, the API turns `InvalidInputError` into a 422 naming the field.
"""

import base64
import binascii
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from common.auth import DeviceOwnership
from common.catalog import check_variant
from common.contracts.fleet import FleetDevice

Connection = Literal["live", "offline"]
Marker = Literal["green", "red"]


class InvalidInputError(Exception):
    """Input that breaks a rule of the registry; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Device:
    """A registry entry with its live state, as stored."""

    id: str
    name: str
    model: str
    engine: str | None
    transport: Literal["gsm", "wifi"]
    gps: bool
    dealer_id: str
    customer_email: str | None
    test_device: bool
    firmware_version: str | None
    connection: Connection
    last_seen_at: datetime | None
    run_state: str | None
    battery_v: float | None
    fuel_pct: float | None
    lat: float | None
    lon: float | None
    position_at: datetime | None
    created_at: datetime

    @property
    def ownership(self) -> DeviceOwnership:
        """What scope checks need."""
        return DeviceOwnership(
            device_id=self.id, dealer_id=self.dealer_id, customer_email=self.customer_email
        )

    def snapshot(self) -> FleetDevice:
        """The `fleet.device.v1` data for this device (the whole ownership snapshot)."""
        return FleetDevice(
            device_id=self.id,
            name=self.name,
            model=self.model,
            engine=self.engine,
            transport=self.transport,
            gps=self.gps,
            dealer_id=self.dealer_id,
            customer_email=self.customer_email,
            test_device=self.test_device,
        )


@dataclass(frozen=True)
class AttentionRules:
    """Configurable thresholds for `attention` (see the settings)."""

    offline_wifi: timedelta
    offline_gsm: timedelta
    offline_gps: timedelta
    low_fuel_pct: float
    low_battery_v: float

    def offline_limit(self, device: Device) -> timedelta:
        """How long `device` may be offline before it needs a look (GSM/GPS longer than WiFi)."""
        limits = [self.offline_gsm if device.transport == "gsm" else self.offline_wifi]
        if device.gps:
            limits.append(self.offline_gps)
        return max(limits)


def needs_attention(device: Device, rules: AttentionRules, now: datetime) -> bool:
    """Offline longer than its transport allows, or a telemetry alarm (low fuel, battery)."""
    if device.connection == "offline":
        # A device never heard from counts from its registration.
        since = device.last_seen_at or device.created_at
        if now - since > rules.offline_limit(device):
            return True
    if device.fuel_pct is not None and device.fuel_pct < rules.low_fuel_pct:
        return True
    return device.battery_v is not None and device.battery_v < rules.low_battery_v


def marker(device: Device, rules: AttentionRules, now: datetime) -> Marker:
    """Map colour: red when offline or needing attention, green when reporting normally."""
    if device.connection == "offline" or needs_attention(device, rules, now):
        return "red"
    return "green"


def check_product(model: str, engine: str | None, transport: str) -> None:
    """Raise `InvalidInputError` naming the field unless the catalog has this variant."""
    reason = check_variant(model, engine, transport)
    if reason is not None:
        field, _, message = reason.partition(": ")
        raise InvalidInputError(field, message)


def normalize_email(email: str | None) -> str | None:
    """Emails compare case-insensitively; store them trimmed and lower-case; '' means none."""
    if email is None:
        return None
    cleaned = email.strip().lower()
    if not cleaned:
        return None
    if "@" not in cleaned or any(c.isspace() for c in cleaned) or len(cleaned) > 254:
        raise InvalidInputError("customer_email", "not an email address")
    return cleaned


# ------------------------------------------------------------------ cursors


def encode_cursor(last_id: str) -> str:
    """An opaque cursor after device `last_id` (lists are ordered by id)."""
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The device id a cursor continues after; `InvalidInputError` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError("cursor", "not a cursor this API issued") from exc
    version, sep, last_id = raw.partition(":")
    if version != "v1" or not sep or not last_id:
        raise InvalidInputError("cursor", "not a cursor this API issued")
    return last_id


# ------------------------------------------------------------------ the map


@dataclass(frozen=True)
class BBox:
    """A lon/lat box; it does not cross the antimeridian (min_lon <= max_lon)."""

    min_lon: float
    min_lat: float
    max_lon: float
    max_lat: float


def parse_bbox(text: str) -> BBox:
    """`minLon,minLat,maxLon,maxLat` in degrees; `InvalidInputError("bbox", ...)` otherwise."""
    parts = text.split(",")
    if len(parts) != 4:
        raise InvalidInputError("bbox", "expected minLon,minLat,maxLon,maxLat")
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise InvalidInputError("bbox", "every coordinate must be a number") from exc
    if not all(math.isfinite(v) for v in values):
        raise InvalidInputError("bbox", "coordinates must be finite numbers")
    min_lon, min_lat, max_lon, max_lat = values
    if not (-180 <= min_lon <= 180 and -180 <= max_lon <= 180):
        raise InvalidInputError("bbox", "longitudes must be within -180..180")
    if not (-90 <= min_lat <= 90 and -90 <= max_lat <= 90):
        raise InvalidInputError("bbox", "latitudes must be within -90..90")
    if min_lon > max_lon or min_lat > max_lat:
        raise InvalidInputError(
            "bbox", "min must not exceed max (boxes across the antimeridian: split)"
        )
    return BBox(min_lon, min_lat, max_lon, max_lat)
