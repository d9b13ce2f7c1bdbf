"""The fleet's use cases: one function each, one transaction each, events through the outbox."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.auth import Principal, require_admin
from common.contracts.device import DevicePresence, DeviceReport, DeviceTelemetry
from common.contracts.fleet import DEVICE
from common.events import Envelope, new_event
from common.http import ProblemError
from common.outbox import add_event
from fleet import store
from fleet.access import access_device, may_register, scope_params
from fleet.domain import BBox, Device, InvalidInputError, check_product, normalize_email
from fleet.reads import Reads

Sessions = async_sessionmaker[AsyncSession]
SOURCE = "fleet"

_UNSET: Any = object()


@dataclass(frozen=True)
class Registration:
    """What `POST /devices` asks for."""

    id: str
    name: str
    model: str
    engine: str | None
    transport: str
    gps: bool
    dealer_id: str | None
    customer_email: str | None
    firmware_version: str | None
    test_device: bool = False


async def _publish(session: AsyncSession, device: Device) -> None:
    event = new_event(type=DEVICE.event_type, data=device.snapshot(), source=SOURCE, key=device.id)
    await add_event(session, store.outbox, DEVICE, event)


async def register_device(sessions: Sessions, principal: Principal, reg: Registration) -> Device:
    """Add a device to a dealer's fleet (admin, or that dealer's staff); 409 for a taken id."""
    check_product(reg.model, reg.engine, reg.transport)
    dealer_id = reg.dealer_id or principal.dealer_id
    if dealer_id is None:
        raise InvalidInputError("dealer_id", "required: which dealer's fleet the device joins")
    may_register(principal, dealer_id)
    values = {
        "id": reg.id,
        "name": reg.name,
        "model": reg.model,
        "engine": reg.engine,
        "transport": reg.transport,
        "gps": reg.gps,
        "dealer_id": dealer_id,
        "customer_email": normalize_email(reg.customer_email),
        "firmware_version": reg.firmware_version,
        "test_device": reg.test_device,
    }
    async with sessions() as session, session.begin():
        try:
            device = await store.insert_device(session, values)
        except store.DuplicateDeviceError as exc:
            raise ProblemError(409, "Conflict", f"device {reg.id!r} is registered already") from exc
        await _publish(session, device)
    return device


async def update_device(
    sessions: Sessions,
    principal: Principal,
    device_id: str,
    *,
    name: str = _UNSET,
    customer_email: str | None = _UNSET,
    test_device: bool = _UNSET,
    dealer_id: str = _UNSET,
) -> Device:
    """Rename, (re)assign the customer, flag as test device; transfer to a dealer (admin only)."""
    async with sessions() as session, session.begin():
        found = await store.get_device(session, device_id, for_update=True)
        device = access_device(principal, found, device_id, "manage")
        changes: dict[str, Any] = {}
        if name is not _UNSET:
            changes["name"] = name
        if customer_email is not _UNSET:
            changes["customer_email"] = normalize_email(customer_email)
        if test_device is not _UNSET:
            changes["test_device"] = test_device
        if dealer_id is not _UNSET and dealer_id != device.dealer_id:
            require_admin(principal)
            changes["dealer_id"] = dealer_id
        if not changes:
            return device
        updated = await store.update_device(session, device_id, changes)
        if updated.snapshot() != device.snapshot():
            await _publish(session, updated)
    return updated


async def read_device(reads: Reads, principal: Principal, device_id: str) -> Device:
    """One device in the caller's scope."""
    return access_device(principal, await store.read_device(reads, device_id), device_id, "read")


async def device_for_control(sessions: Sessions, principal: Principal, device_id: str) -> Device:
    """A device the caller may act on (e.g. to re-issue its MQTT credentials)."""
    async with sessions() as session:
        found = await store.get_device(session, device_id)
        return access_device(principal, found, device_id, "manage")


async def search_devices(
    reads: Reads,
    principal: Principal,
    *,
    q: str | None,
    connection: str | None,
    model: str | None,
    firmware: str | None,
    after: str | None,
    limit: int,
) -> tuple[list[Device], bool]:
    """A page of devices in scope, and whether more follow."""
    scope = scope_params(principal)
    if scope is None:
        return [], False
    filters = {
        "pattern": store.like_pattern(q) if q else None,
        "connection": connection,
        "model": model,
        "firmware": firmware,
        "after": after,
    }
    params = {**scope, **{name: value for name, value in filters.items() if value is not None}}
    found = await store.search_page(reads, params, limit=limit + 1)
    return found[:limit], len(found) > limit


async def map_devices(
    reads: Reads, principal: Principal, bbox: BBox, *, limit: int
) -> tuple[list[Device], bool]:
    """GPS devices in scope inside `bbox`, and whether the answer was cut at `limit`."""
    scope = scope_params(principal)
    if scope is None:
        return [], False
    found = await store.in_bbox(reads, bbox=bbox, scope=scope, limit=limit + 1)
    return found[:limit], len(found) > limit


async def recent_positions(
    reads: Reads, principal: Principal, device_id: str
) -> list[tuple[float, float, datetime]]:
    """A device's recent positions, newest first (404 out of scope)."""
    await read_device(reads, principal, device_id)
    return await store.recent_positions(reads, device_id)


# ------------------------------------------------------------------ live state (consumers)
# Each batch is coalesced to one row per device (the newest by `received_at` wins) and written
# in one statement; the statements only move state forward in event time, so redelivered
# batches (after a crash before the offset commit) change nothing.


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def latest_per_device(events: Iterable[Envelope[Any]]) -> list[Any]:
    """The newest event data per device by `received_at` (ties: the later record)."""
    latest: dict[str, Any] = {}
    for event in events:
        data = event.data
        current = latest.get(data.device_id)
        if current is None or data.received_at >= current.received_at:
            latest[data.device_id] = data
    return list(latest.values())


async def apply_presence(sessions: Sessions, events: Sequence[Envelope[DevicePresence]]) -> None:
    """Live/offline, last seen and reported firmware from a batch of presence events."""
    rows = [
        {
            "id": p.device_id,
            "received_at": p.received_at,
            "online": p.state == "online",
            "will": p.will,
            "fw": p.fw,
        }
        for p in latest_per_device(events)
    ]
    async with sessions() as session, session.begin():
        await store.apply_presence(session, rows)


async def apply_telemetry(
    sessions: Sessions, events: Sequence[Envelope[DeviceTelemetry]], *, history: int
) -> None:
    """Run state, readings and position from a batch of telemetry."""
    rows = [
        {
            "id": t.device_id,
            "received_at": t.received_at,
            "ts": _aware(t.ts),
            "run_state": t.run_state,
            "battery_v": t.battery_v,
            "fuel_pct": t.fuel_pct,
            "engine_hours": t.engine_hours,
            "lat": t.lat,
            "lon": t.lon,
        }
        for t in latest_per_device(events)
    ]
    async with sessions() as session, session.begin():
        await store.apply_telemetry(session, rows, history=history)


async def apply_reports(sessions: Sessions, events: Sequence[Envelope[DeviceReport]]) -> None:
    """A device that acks or reports OTA progress is connected: last seen moves forward."""
    rows = [{"id": r.device_id, "received_at": r.received_at} for r in latest_per_device(events)]
    async with sessions() as session, session.begin():
        await store.apply_seen(session, rows)
