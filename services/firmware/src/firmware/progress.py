"""Moving devices through the state machine from what devices and the commands service report.

Each batch of events is applied in one transaction: the events not seen before (processed-event
ids), the device rows they touch (locked in device-id order, so batches never deadlock each
other), the domain transitions in event order, then one bulk update and the events for the
outbox. The dispatcher writes its changes through `write_changes` too.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.contracts.commands import CommandStatus
from common.contracts.device import DevicePresence, DeviceReport
from common.events import Envelope
from firmware import store
from firmware.domain import (
    ACTIVE,
    Change,
    Policy,
    Progress,
    on_command_status,
    on_ota_report,
    on_presence,
)
from firmware.events import RolloutInfo, device_event

rd = store.rollout_devices
ro = store.rollouts
rel = store.releases

_FIELDS = (
    "state",
    "attempt",
    "command_id",
    "sent_at",
    "deadline_at",
    "next_attempt_at",
    "reported_version",
    "last_report",
    "detail",
)


def progress_of(row: Any) -> Progress:
    """A `rollout_devices` row as domain `Progress`."""
    return Progress(**{name: getattr(row, name) for name in _FIELDS})


@dataclass
class Tracked:
    """A locked device row, its rollout, and where it stands now."""

    rollout_id: str
    device_id: str
    info: RolloutInfo
    progress: Progress
    changes: list[Change]


async def write_changes(conn: AsyncConnection, tracked: Sequence[Tracked], *, now: datetime) -> int:
    """Store the new progress of every changed device and stage one event per state move."""
    changed = [t for t in tracked if t.changes]
    if not changed:
        return 0
    statement = (
        update(rd)
        .where(rd.c.rollout_id == bindparam("r_id"), rd.c.device_id == bindparam("d_id"))
        .values({name: bindparam(f"v_{name}") for name in (*_FIELDS, "updated_at")})
    )
    params = [
        {
            "r_id": t.rollout_id,
            "d_id": t.device_id,
            "v_updated_at": now,
            **{f"v_{name}": getattr(t.progress, name) for name in _FIELDS},
        }
        for t in changed
    ]
    await conn.execute(statement, params)
    events = [
        device_event(t.info, t.device_id, change, at=now)
        for t in changed
        for change in t.changes
        if change.moved
    ]
    await store.insert_outbox(conn, events)
    return len(events)


# One statement whatever the batch size (arrays, not a VALUES list compiled per batch).
_FIRST_DELIVERIES = text(
    "INSERT INTO processed_events (consumer, event_id) "
    "SELECT CAST(:consumer AS varchar), unnest(CAST(:ids AS uuid[])) "
    "ON CONFLICT DO NOTHING RETURNING event_id"
)
_PROJECT_PRESENCE = text(
    "INSERT INTO device_presence (device_id, online, fw, presence_at) "
    "SELECT * FROM unnest(CAST(:ids AS varchar[]), CAST(:online AS boolean[]), "
    "CAST(:fw AS varchar[]), CAST(:at AS timestamptz[])) "
    # Only forward in time; an offline Last Will carries no firmware: keep the last known one.
    "ON CONFLICT (device_id) DO UPDATE SET online = excluded.online, "
    "fw = coalesce(excluded.fw, device_presence.fw), presence_at = excluded.presence_at "
    "WHERE device_presence.presence_at <= excluded.presence_at"
)


async def _first_deliveries(
    conn: AsyncConnection, consumer: str, events: Sequence[Envelope[Any]]
) -> list[Envelope[Any]]:
    """The events of the batch this consumer has not applied before."""
    if not events:
        return []
    new = set(
        (
            await conn.execute(
                _FIRST_DELIVERIES, {"consumer": consumer, "ids": [e.event_id for e in events]}
            )
        ).scalars()
    )
    seen: set[Any] = set()
    fresh = []
    for event in events:
        if event.event_id in new and event.event_id not in seen:
            seen.add(event.event_id)
            fresh.append(event)
    return fresh


async def _lock_active(
    conn: AsyncConnection, device_ids: set[str], *, rollout_ids: set[str] | None = None
) -> dict[tuple[str, str], Tracked]:
    """Active rollout rows of these devices (and rows of the named rollouts), locked in order."""
    query = (
        select(
            rd,
            *[
                c.label(f"ro_{c.name}")
                for c in (ro.c.purpose, ro.c.scope, ro.c.dealer_id, ro.c.status, ro.c.release_id)
            ],
            rel.c.version,
            rel.c.console,
        )
        .join(ro, ro.c.id == rd.c.rollout_id)
        .join(rel, rel.c.id == ro.c.release_id)
        .where(rd.c.device_id.in_(sorted(device_ids)))
        .order_by(rd.c.device_id, rd.c.rollout_id)
        .with_for_update(of=rd)
    )
    if rollout_ids is None:
        query = query.where(rd.c.state.in_(ACTIVE))
    else:
        query = query.where(rd.c.rollout_id.in_(sorted(rollout_ids)))
    found = {}
    for row in (await conn.execute(query)).all():
        info = RolloutInfo(
            rollout_id=row.rollout_id,
            purpose=row.ro_purpose,
            release_id=row.ro_release_id,
            version=row.version,
            console=row.console,
            scope=row.ro_scope,
            dealer_id=row.ro_dealer_id,
            status=row.ro_status,
        )
        found[(row.rollout_id, row.device_id)] = Tracked(
            row.rollout_id, row.device_id, info, progress_of(row), []
        )
    return found


def _by_device(tracked: dict[tuple[str, str], Tracked]) -> dict[str, list[Tracked]]:
    by_device: dict[str, list[Tracked]] = {}
    for t in tracked.values():
        by_device.setdefault(t.device_id, []).append(t)
    return by_device


def _apply(tracked: Tracked, change: Change | None) -> None:
    if change is None:
        return
    after = change.after
    if after.state == "pending" and tracked.info.status == "cleared":
        # A retry in a cleared rollout: nothing more goes out, so it ends here.
        after = Progress(**{**after.__dict__, "state": "cancelled", "next_attempt_at": None})
        change = Change(change.before, after)
    tracked.changes.append(change)
    tracked.progress = after


class ProgressHandlers:
    """Batch handlers for presence, OTA reports and command status (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, policy: Policy, *, consumer_prefix: str) -> None:
        self._engine = engine
        self._policy = policy
        self._prefix = consumer_prefix

    async def presence(self, batch: Sequence[Envelope[DevicePresence]]) -> None:
        """Projection of live state and firmware, and confirmations (live AND on the version)."""
        async with self._engine.begin() as conn:
            events = await _first_deliveries(conn, f"{self._prefix}presence", batch)
            if not events:
                return
            await _project_presence(conn, events)
            tracked = await _lock_active(conn, {e.data.device_id for e in events})
            by_device = _by_device(tracked)
            for event in events:
                p = event.data
                for t in by_device.get(p.device_id, ()):
                    change = on_presence(
                        t.progress,
                        online=p.state == "online",
                        fw=p.fw,
                        at=p.received_at,
                        target_version=t.info.version,
                    )
                    _apply(t, change)
            await write_changes(conn, list(tracked.values()), now=datetime.now(UTC))

    async def reports(self, batch: Sequence[Envelope[DeviceReport]]) -> None:
        """OTA phases (downloading, installing, rebooting, failed)."""
        async with self._engine.begin() as conn:
            events = await _first_deliveries(conn, f"{self._prefix}reports", batch)
            events = [e for e in events if e.data.kind == "ota" and e.data.phase is not None]
            if not events:
                return
            tracked = await _lock_active(conn, {e.data.device_id for e in events})
            by_device = _by_device(tracked)
            now = datetime.now(UTC)
            for event in events:
                r = event.data
                for t in by_device.get(r.device_id, ()):
                    change = on_ota_report(
                        t.progress,
                        command_id=r.command_id,
                        phase=r.phase or "",
                        detail=r.detail,
                        now=now,
                        policy=self._policy,
                    )
                    _apply(t, change)
            await write_changes(conn, list(tracked.values()), now=now)

    async def command_status(self, batch: Sequence[Envelope[CommandStatus]]) -> None:
        """Our OTA commands' lifecycle (their `correlation` names rollout, device and attempt)."""
        ours = [e for e in batch if {"rollout_id", "attempt"} <= set(e.data.correlation)]
        if not ours:
            return
        async with self._engine.begin() as conn:
            events = await _first_deliveries(conn, f"{self._prefix}commands", ours)
            if not events:
                return
            tracked = await _lock_active(
                conn,
                {e.data.device_id for e in events},
                rollout_ids={e.data.correlation["rollout_id"] for e in events},
            )
            now = datetime.now(UTC)
            for event in events:
                s = event.data
                t = tracked.get((s.correlation["rollout_id"], s.device_id))
                if t is None or not s.correlation["attempt"].isdigit():
                    continue
                change = on_command_status(
                    t.progress,
                    attempt=int(s.correlation["attempt"]),
                    command_id=s.command_id,
                    status=s.status,
                    detail=s.detail,
                    now=now,
                    policy=self._policy,
                )
                _apply(t, change)
            await write_changes(conn, list(tracked.values()), now=now)


async def _project_presence(
    conn: AsyncConnection, events: Sequence[Envelope[DevicePresence]]
) -> None:
    latest: dict[str, DevicePresence] = {}
    for event in events:
        p = event.data
        if p.device_id not in latest or latest[p.device_id].received_at <= p.received_at:
            latest[p.device_id] = p
    ordered = sorted(latest.values(), key=lambda p: p.device_id)
    await conn.execute(
        _PROJECT_PRESENCE,
        {
            "ids": [p.device_id for p in ordered],
            "online": [p.state == "online" for p in ordered],
            "fw": [p.fw for p in ordered],
            "at": [p.received_at for p in ordered],
        },
    )
