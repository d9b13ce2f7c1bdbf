"""Reads for the API: releases with their validation, rollouts with their counts, devices."""

from typing import Any

from sqlalchemy import and_, exists, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.auth import Principal
from firmware import store
from firmware.domain import COUNTED

rd = store.rollout_devices
ro = store.rollouts


def validated_clause(release_id: Any, dealer_id: str | None) -> Any:
    """SQL: a validation of the release confirmed on a test device (of `dealer_id`, if given)."""
    conditions = [
        ro.c.purpose == "validation",
        ro.c.release_id == release_id,
        rd.c.state == "confirmed",
    ]
    if dealer_id is not None:
        conditions.append(ro.c.dealer_id == dealer_id)
    return exists(select(rd.c.device_id).join(ro, ro.c.id == rd.c.rollout_id).where(*conditions))


async def is_validated(conn: AsyncConnection, release_id: str, dealer_id: str | None) -> bool:
    """Has the release passed a validation (for `dealer_id`; None: anyone's)?"""
    return bool(await conn.scalar(select(validated_clause(release_id, dealer_id))))


def release_view(row: Any, *, validated: bool) -> dict[str, Any]:
    """A release as the API shows it."""
    return {
        "id": row.id,
        "console": row.console,
        "version": row.version,
        "models": list(row.models),
        "engine": row.engine,
        "transport": row.transport,
        "artifact_url": row.artifact_url,
        "sha256": row.sha256,
        "size": row.size,
        "notes": row.notes,
        "withdrawn": row.withdrawn,
        "validated": validated,
        "created_at": row.created_at,
    }


def validation_scope(principal: Principal) -> str | None:
    """Whose validations count for the caller: its dealer's, or anyone's for an admin."""
    return None if principal.is_admin else (principal.dealer_id or "\x00none")


async def list_releases(
    conn: AsyncConnection,
    principal: Principal,
    *,
    console: str | None,
    model: str | None,
    engine: str | None,
    transport: str | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    """Releases matching the filters, newest first, with `validated` for the caller."""
    rel = store.releases
    validated = validated_clause(rel.c.id, validation_scope(principal)).label("validated")
    query = select(rel, validated).order_by(rel.c.id.desc()).limit(limit + 1)
    if console:
        query = query.where(rel.c.console == console)
    if model:
        query = query.where(rel.c.models.contains([model]))
    if engine:
        query = query.where(rel.c.engine == engine)
    if transport:
        query = query.where(rel.c.transport == transport)
    if cursor:
        query = query.where(rel.c.id < cursor)
    rows = (await conn.execute(query)).all()
    items = [release_view(row, validated=bool(row.validated)) for row in rows[:limit]]
    next_cursor = rows[limit - 1].id if len(rows) > limit else None
    return {"items": items, "next_cursor": next_cursor}


async def counts_of(conn: AsyncConnection, rollout_ids: list[str]) -> dict[str, dict[str, int]]:
    """Per rollout: how many devices are in each state."""
    result: dict[str, dict[str, int]] = {rid: dict.fromkeys(COUNTED, 0) for rid in rollout_ids}
    if not rollout_ids:
        return result
    rows = await conn.execute(
        select(rd.c.rollout_id, rd.c.state, func.count())
        .where(rd.c.rollout_id.in_(rollout_ids))
        .group_by(rd.c.rollout_id, rd.c.state)
    )
    for rollout_id, state, count in rows:
        result[rollout_id][state] = count
    return result


def rollout_view(row: Any, release: Any, counts: dict[str, int]) -> dict[str, Any]:
    """A rollout as the API shows it."""
    return {
        "id": row.id,
        "release": {
            "id": release.id,
            "console": release.console,
            "version": release.version,
            "models": list(release.models),
            "engine": release.engine,
            "transport": release.transport,
        },
        "scope": row.scope,
        "dealer_id": row.dealer_id,
        "target": row.target,
        "strategy": {
            "batch_size": row.batch_size,
            "max_per_minute": row.max_per_minute,
            "failure_threshold_pct": row.failure_threshold_pct,
            "failure_min_finished": row.failure_min_finished,
        },
        "status": row.status,
        "status_reason": row.status_reason,
        "override_reason": row.override_reason,
        "counts": counts,
        "skipped": row.skipped,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "finished_at": row.finished_at,
    }


async def rollout_detail(conn: AsyncConnection, row: Any) -> dict[str, Any]:
    """One rollout with its release and counts."""
    release = (
        await conn.execute(select(store.releases).where(store.releases.c.id == row.release_id))
    ).one()
    counts = await counts_of(conn, [row.id])
    return rollout_view(row, release, counts[row.id])


async def list_rollouts(
    conn: AsyncConnection,
    principal: Principal,
    *,
    status: str | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    """Rollouts the caller may see, newest first."""
    rel = store.releases
    query = (
        select(ro, *[c.label(f"rel__{c.name}") for c in rel.c])
        .join(rel, rel.c.id == ro.c.release_id)
        .where(ro.c.purpose == "rollout")
        .order_by(ro.c.id.desc())
        .limit(limit + 1)
    )
    if not principal.is_admin:
        if principal.role != "dealer" or principal.device_ids is not None:
            return {"items": [], "next_cursor": None}
        query = query.where(ro.c.dealer_id == principal.dealer_id)
    if status:
        query = query.where(ro.c.status == status)
    if cursor:
        query = query.where(ro.c.id < cursor)
    rows = (await conn.execute(query)).all()[: limit + 1]
    page = rows[:limit]
    counts = await counts_of(conn, [row.id for row in page])
    items = [rollout_view(row, _ReleaseOf(row), counts[row.id]) for row in page]
    return {"items": items, "next_cursor": page[-1].id if len(rows) > limit else None}


class _ReleaseOf:
    """The `rel__*` columns of a joined row, read like a releases row."""

    def __init__(self, row: Any) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        return getattr(self._row, f"rel__{name}")


def device_view(row: Any) -> dict[str, Any]:
    """One device's progress in a rollout."""
    return {
        "device_id": row.device_id,
        "state": row.state,
        "attempts": row.attempt,
        "command_id": row.command_id,
        "transport": row.transport,
        "gps": row.gps,
        "sent_at": row.sent_at,
        "deadline_at": row.deadline_at,
        "last_report": row.last_report,
        "reported_version": row.reported_version,
        "detail": row.detail,
        "updated_at": row.updated_at,
    }


async def list_devices(
    conn: AsyncConnection,
    rollout_id: str,
    *,
    state: str | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    """A rollout's devices in id order."""
    query = select(rd).where(rd.c.rollout_id == rollout_id).order_by(rd.c.device_id)
    if state:
        query = query.where(rd.c.state == state)
    if cursor:
        query = query.where(rd.c.device_id > cursor)
    rows = (await conn.execute(query.limit(limit + 1))).all()
    items = [device_view(row) for row in rows[:limit]]
    return {"items": items, "next_cursor": rows[limit - 1].device_id if len(rows) > limit else None}


async def validations_of(
    conn: AsyncConnection, principal: Principal, release_id: str
) -> list[dict[str, Any]]:
    """The release's validations the caller may see."""
    query = (
        select(rd, ro.c.created_by, ro.c.created_at)
        .join(rd, rd.c.rollout_id == ro.c.id)
        .where(and_(ro.c.purpose == "validation", ro.c.release_id == release_id))
        .order_by(ro.c.created_at.desc())
    )
    if not principal.is_admin:
        query = query.where(ro.c.dealer_id == principal.dealer_id)
    rows = (await conn.execute(query)).all()
    return [validation_view(row, release_id) for row in rows]


def validation_view(row: Any, release_id: str) -> dict[str, Any]:
    """A validation: its one test device's progress."""
    return {
        "id": row.rollout_id,
        "release_id": release_id,
        "dealer_id": row.dealer_id,
        "device_id": row.device_id,
        "state": row.state,
        "passed": row.state == "confirmed",
        "attempts": row.attempt,
        "reported_version": row.reported_version,
        "detail": row.detail,
        "created_by": row.created_by,
        "created_at": row.created_at,
    }
