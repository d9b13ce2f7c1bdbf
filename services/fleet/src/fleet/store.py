"""The fleet service's tables and queries (its own database; no other service reads them)."""

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Select,
    String,
    Table,
    and_,
    any_,
    bindparam,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from common.idempotency import processed_events_table
from common.outbox import outbox_table
from fleet.domain import BBox, Device
from fleet.reads import Reads

metadata = MetaData()
# Woken by the commit: registrations and ownership changes reach the other services at once,
# and the relay polls rarely instead of ten times a second.
outbox = outbox_table(metadata, wake_relay=True)
processed_events = processed_events_table(metadata)

devices = Table(
    "devices",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("model", String(32), nullable=False),
    Column("engine", String(32), nullable=True),
    Column("transport", String(8), nullable=False),
    Column("gps", Boolean, nullable=False),
    Column("dealer_id", String(64), nullable=False),
    Column("customer_email", String(254), nullable=True),  # stored lower-case
    Column("test_device", Boolean, nullable=False, server_default=text("false")),
    Column("firmware_version", String(64), nullable=True),
    Column("connection", String(8), nullable=False, server_default=text("'offline'")),
    Column("last_seen_at", DateTime(timezone=True), nullable=True),
    # Event times of the last applied presence / telemetry: state only moves forward.
    Column("presence_at", DateTime(timezone=True), nullable=True),
    Column("telemetry_at", DateTime(timezone=True), nullable=True),
    Column("firmware_at", DateTime(timezone=True), nullable=True),  # of the reported firmware
    Column("run_state", String(16), nullable=True),
    Column("battery_v", Float, nullable=True),
    Column("fuel_pct", Float, nullable=True),
    Column("engine_hours", Float, nullable=True),
    Column("lat", Float, nullable=True),
    Column("lon", Float, nullable=True),
    Column("position_at", DateTime(timezone=True), nullable=True),
    Column("position_seq", BigInteger, nullable=False, server_default=text("0")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_devices_dealer_id", "dealer_id", "id"),
    Index("ix_devices_dealer_customer", "dealer_id", "customer_email"),
    # No index on live-state columns: their updates stay HOT (migration 0004).
    Index(
        "ix_devices_id_trgm", "id", postgresql_using="gin", postgresql_ops={"id": "gin_trgm_ops"}
    ),
    Index(
        "ix_devices_name_trgm",
        "name",
        postgresql_using="gin",
        postgresql_ops={"name": "gin_trgm_ops"},
    ),
    Index(
        "ix_devices_customer_email_trgm",
        "customer_email",
        postgresql_using="gin",
        postgresql_ops={"customer_email": "gin_trgm_ops"},
    ),
)

# A ring of recent positions per device: slot = position_seq % history size, so the table
# stays bounded without deletes.
device_positions = Table(
    "device_positions",
    metadata,
    # No foreign key: rows come only from devices the same statement updated (migration 0004).
    Column("device_id", String(64), nullable=False),
    Column("slot", Integer, nullable=False),
    Column("lat", Float, nullable=False),
    Column("lon", Float, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("device_id", "slot"),
)

Conn = AsyncSession | AsyncConnection

_DEVICE_COLUMNS = [
    devices.c[name]
    for name in (
        "id", "name", "model", "engine", "transport", "gps", "dealer_id", "customer_email",
        "test_device", "firmware_version", "connection", "last_seen_at", "run_state",
        "battery_v", "fuel_pct", "lat", "lon", "position_at", "created_at",
    )
]  # fmt: skip


class DuplicateDeviceError(Exception):
    """A device with this id is registered already."""


def _device(row: Row[Any]) -> Device:
    return Device(*row)  # `_DEVICE_COLUMNS` are `Device`'s fields, in order (a test checks)


async def insert_device(conn: Conn, values: dict[str, Any]) -> Device:
    """Register a device; `DuplicateDeviceError` when the id is taken."""
    try:
        async with conn.begin_nested():
            row = (
                await conn.execute(devices.insert().values(**values).returning(*_DEVICE_COLUMNS))
            ).one()
    except IntegrityError as exc:
        raise DuplicateDeviceError(values["id"]) from exc
    return _device(row)


# One device by id: the writes' `get_device` (in their transaction) and the GET routes'
# `read_device` (on the driver) run the same statement.
_DEVICE_BY_ID = select(*_DEVICE_COLUMNS).where(devices.c.id == bindparam("device_id"))
_DEVICE_BY_ID_FOR_UPDATE = _DEVICE_BY_ID.with_for_update()


async def get_device(conn: Conn, device_id: str, *, for_update: bool = False) -> Device | None:
    """One device, or None."""
    query = _DEVICE_BY_ID_FOR_UPDATE if for_update else _DEVICE_BY_ID
    row = (await conn.execute(query, {"device_id": device_id})).first()
    return _device(row) if row is not None else None


async def update_device(conn: Conn, device_id: str, values: dict[str, Any]) -> Device:
    """Change registry fields of an existing device."""
    row = (
        await conn.execute(
            devices.update()
            .where(devices.c.id == device_id)
            .values(**values, updated_at=func.now())
            .returning(*_DEVICE_COLUMNS)
        )
    ).one()
    return _device(row)


def like_pattern(fragment: str) -> str:
    """`%fragment%` for ILIKE, with the fragment's own wildcards taken literally."""
    escaped = fragment.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# The search's terms by the name of the value each binds; a request names the ones it uses.
_SEARCH_TERMS: dict[str, ColumnElement[bool]] = {
    # An array, not an expanding IN: `Reads` compiles each statement once.
    "device_ids": devices.c.id == any_(bindparam("device_ids", type_=ARRAY(String))),
    "dealer_id": devices.c.dealer_id == bindparam("dealer_id"),
    "customer_email": devices.c.customer_email == bindparam("customer_email"),
    # The text matches id, customer email or name (pg_trgm GIN).
    "pattern": or_(
        devices.c.id.ilike(bindparam("pattern")),
        devices.c.name.ilike(bindparam("pattern")),
        devices.c.customer_email.ilike(bindparam("pattern")),
    ),
    "connection": devices.c.connection == bindparam("connection"),
    "model": devices.c.model == bindparam("model"),
    "firmware": devices.c.firmware_version == bindparam("firmware"),
    "after": devices.c.id > bindparam("after"),
}
SEARCH_PARAMS = frozenset(_SEARCH_TERMS)


def _terms(names: frozenset[str]) -> list[ColumnElement[bool]]:
    return [term for name, term in _SEARCH_TERMS.items() if name in names]


@functools.cache
def _search_statement(names: frozenset[str]) -> Select[Any]:
    # One statement per shape of search (at most 2^8), built and compiled once: building and
    # hashing a fresh select() per request was a sixth of the service's time per search.
    return (
        select(*_DEVICE_COLUMNS)
        .where(and_(True, *_terms(names)))
        .order_by(devices.c.id)
        .limit(bindparam("limit"))
    )


@functools.cache
def _map_statement(scope: frozenset[str]) -> Select[Any]:
    return (
        select(*_DEVICE_COLUMNS)
        .where(
            devices.c.gps,
            devices.c.lat.is_not(None),
            devices.c.lon.between(bindparam("min_lon"), bindparam("max_lon")),
            devices.c.lat.between(bindparam("min_lat"), bindparam("max_lat")),
            *_terms(scope),
        )
        .order_by(devices.c.id)
        .limit(bindparam("limit"))
    )


_RECENT_POSITIONS = (
    select(device_positions.c.lat, device_positions.c.lon, device_positions.c.at)
    .where(device_positions.c.device_id == bindparam("device_id"))
    .order_by(device_positions.c.at.desc())
)


async def read_device(reads: Reads, device_id: str) -> Device | None:
    """One device, or None (the GET routes' read; writes use `get_device` in their session)."""
    rows = await reads.fetch(_DEVICE_BY_ID, {"device_id": device_id})
    return Device(*rows[0]) if rows else None


async def search_page(reads: Reads, params: dict[str, Any], *, limit: int) -> list[Device]:
    """Up to `limit` devices in id order matching every term `params` names (`SEARCH_PARAMS`).

    `pattern` is a `like_pattern`; `after` an id to continue after.
    """
    statement = _search_statement(frozenset(params))
    return [Device(*row) for row in await reads.fetch(statement, {**params, "limit": limit})]


async def in_bbox(reads: Reads, *, bbox: BBox, scope: dict[str, Any], limit: int) -> list[Device]:
    """GPS devices with a known position inside `bbox` and in `scope` (`SEARCH_PARAMS` it
    names, as `access.scope_params` gives them), in id order."""
    statement = _map_statement(frozenset(scope))
    values = {**scope, "limit": limit, "min_lon": bbox.min_lon, "max_lon": bbox.max_lon}
    values.update(min_lat=bbox.min_lat, max_lat=bbox.max_lat)
    return [Device(*row) for row in await reads.fetch(statement, values)]


async def recent_positions(reads: Reads, device_id: str) -> list[tuple[float, float, datetime]]:
    """The device's recent positions, newest first."""
    rows = await reads.fetch(_RECENT_POSITIONS, {"device_id": device_id})
    return [(row["lat"], row["lon"], row["at"]) for row in rows]


# ------------------------------------------------------------------ live state, in batches
# Each statement applies a whole consumer batch (one row per device, already coalesced) in
# one round trip. They are idempotent: a row only moves a device forward in event time
# (`received_at` against `presence_at` / `telemetry_at`), so a redelivered or older event
# changes nothing.

_APPLY_PRESENCE = text(
    """
    UPDATE devices AS d SET
      connection = CASE WHEN i.newer THEN CASE WHEN i.online THEN 'live' ELSE 'offline' END
                        ELSE d.connection END,
      presence_at = CASE WHEN i.newer THEN i.received_at ELSE d.presence_at END,
      -- a Last Will is the broker's word, not the device's: it does not count as "seen"
      last_seen_at = CASE WHEN i.will THEN d.last_seen_at
                          ELSE GREATEST(d.last_seen_at, i.received_at) END,
      -- firmware has its own event time: telemetry moves presence_at, not firmware_at
      firmware_version = CASE WHEN i.fw IS NOT NULL
                               AND (d.firmware_at IS NULL OR i.received_at >= d.firmware_at)
                              THEN i.fw ELSE d.firmware_version END,
      firmware_at = CASE WHEN i.fw IS NOT NULL
                          AND (d.firmware_at IS NULL OR i.received_at >= d.firmware_at)
                         THEN i.received_at ELSE d.firmware_at END,
      updated_at = now()
    FROM (
      SELECT u.*, (d0.presence_at IS NULL OR u.received_at >= d0.presence_at) AS newer
      FROM unnest(CAST(:ids AS text[]), CAST(:received AS timestamptz[]),
                  CAST(:online AS boolean[]), CAST(:will AS boolean[]), CAST(:fw AS text[]))
           AS u(id, received_at, online, will, fw)
      JOIN devices AS d0 ON d0.id = u.id
    ) AS i
    WHERE d.id = i.id
      AND (i.newer OR (i.fw IS NOT NULL
                       AND (d.firmware_at IS NULL OR i.received_at >= d.firmware_at)))
    """
)

_APPLY_TELEMETRY = text(
    """
    WITH moved AS (
      UPDATE devices AS d SET
        telemetry_at = i.received_at,
        last_seen_at = GREATEST(d.last_seen_at, i.received_at),
        -- a device sending telemetry is connected, unless a newer presence says otherwise
        connection = CASE WHEN d.presence_at IS NULL OR i.received_at > d.presence_at
                          THEN 'live' ELSE d.connection END,
        presence_at = GREATEST(d.presence_at, i.received_at),
        run_state = COALESCE(i.run_state, d.run_state),
        battery_v = COALESCE(i.battery_v, d.battery_v),
        fuel_pct = COALESCE(i.fuel_pct, d.fuel_pct),
        engine_hours = COALESCE(i.engine_hours, d.engine_hours),
        lat = CASE WHEN i.has_pos THEN i.lat ELSE d.lat END,
        lon = CASE WHEN i.has_pos THEN i.lon ELSE d.lon END,
        position_at = CASE WHEN i.has_pos THEN i.ts ELSE d.position_at END,
        position_seq = d.position_seq + CASE WHEN i.has_pos THEN 1 ELSE 0 END
      FROM (
        SELECT u.*, (u.lat IS NOT NULL AND u.lon IS NOT NULL) AS has_pos
        FROM unnest(CAST(:ids AS text[]), CAST(:received AS timestamptz[]),
                    CAST(:ts AS timestamptz[]), CAST(:run_state AS text[]),
                    CAST(:battery_v AS float8[]), CAST(:fuel_pct AS float8[]),
                    CAST(:engine_hours AS float8[]), CAST(:lat AS float8[]),
                    CAST(:lon AS float8[]))
             AS u(id, received_at, ts, run_state, battery_v, fuel_pct, engine_hours, lat, lon)
      ) AS i
      WHERE d.id = i.id AND (d.telemetry_at IS NULL OR i.received_at > d.telemetry_at)
      RETURNING d.id, d.position_seq, i.has_pos, i.lat, i.lon, i.ts
    )
    INSERT INTO device_positions (device_id, slot, lat, lon, at)
    SELECT id, (position_seq % :history)::int, lat, lon, ts FROM moved WHERE has_pos
    ON CONFLICT (device_id, slot) DO UPDATE
      SET lat = EXCLUDED.lat, lon = EXCLUDED.lon, at = EXCLUDED.at
    """
)

_APPLY_SEEN = text(
    """
    UPDATE devices AS d SET
      last_seen_at = GREATEST(d.last_seen_at, i.received_at),
      connection = CASE WHEN d.presence_at IS NULL OR i.received_at > d.presence_at
                        THEN 'live' ELSE d.connection END,
      presence_at = GREATEST(d.presence_at, i.received_at)
    FROM unnest(CAST(:ids AS text[]), CAST(:received AS timestamptz[])) AS i(id, received_at)
    WHERE d.id = i.id AND (d.last_seen_at IS NULL OR i.received_at > d.last_seen_at)
    """
)


async def apply_presence(conn: Conn, rows: Sequence[dict[str, Any]]) -> None:
    """Connection, last seen and reported firmware from presence events (one per device)."""
    if rows:
        await conn.execute(
            _APPLY_PRESENCE,
            {
                "ids": [r["id"] for r in rows],
                "received": [r["received_at"] for r in rows],
                "online": [r["online"] for r in rows],
                "will": [r["will"] for r in rows],
                "fw": [r["fw"] for r in rows],
            },
        )


_TELEMETRY_FIELDS = ("run_state", "battery_v", "fuel_pct", "engine_hours", "lat", "lon", "ts")


async def apply_telemetry(conn: Conn, rows: Sequence[dict[str, Any]], *, history: int) -> None:
    """Run state, readings and position from telemetry (one row per device)."""
    if rows:
        params: dict[str, Any] = {
            "ids": [r["id"] for r in rows],
            "received": [r["received_at"] for r in rows],
            "history": history,
        }
        for name in _TELEMETRY_FIELDS:
            params[name] = [r[name] for r in rows]
        await conn.execute(_APPLY_TELEMETRY, params)


async def apply_seen(conn: Conn, rows: Sequence[dict[str, Any]]) -> None:
    """A device that reports (acks, OTA progress) is connected and was seen then."""
    if rows:
        await conn.execute(
            _APPLY_SEEN,
            {"ids": [r["id"] for r in rows], "received": [r["received_at"] for r in rows]},
        )


_COUNT_STATES = text(
    """
    SELECT count(*) FILTER (WHERE connection = 'live') AS live,
           count(*) FILTER (WHERE connection = 'offline') AS offline,
           count(*) FILTER (WHERE
             (connection = 'offline' AND COALESCE(last_seen_at, created_at) < now() -
               make_interval(secs => GREATEST(
                 CASE WHEN transport = 'gsm' THEN CAST(:gsm_s AS float8)
                      ELSE CAST(:wifi_s AS float8) END,
                 CASE WHEN gps THEN CAST(:gps_s AS float8) ELSE 0 END)))
             OR fuel_pct < CAST(:low_fuel AS float8)
             OR battery_v < CAST(:low_battery AS float8)) AS attention
    FROM devices
    """
)


async def count_states(
    conn: Conn, *, wifi_s: int, gsm_s: int, gps_s: int, low_fuel: float, low_battery: float
) -> dict[str, int]:
    """Devices by connection (live, offline) and needing attention (the domain's rule as SQL)."""
    params = {"wifi_s": wifi_s, "gsm_s": gsm_s, "gps_s": gps_s, "low_fuel": low_fuel}
    params["low_battery"] = low_battery
    row = (await conn.execute(_COUNT_STATES, params)).one()
    return {"live": row.live, "offline": row.offline, "attention": row.attention}
