"""Use cases of the firmware service: one function, one transaction, events in the outbox.

Rules break as `RuleError` (the API turns them into problem+json with the field named).
"""

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.auth import Principal, require_admin
from common.http import ProblemError
from firmware import store, views
from firmware.access import access_device, access_release, access_rollout, require_operator
from firmware.domain import (
    ACTIVE,
    Progress,
    RuleError,
    Variant,
    cancel,
    check_release,
    check_target,
    next_status,
    variant_mismatch,
)
from firmware.events import RolloutInfo, device_event, release_event, rollout_event
from firmware.schemas import NewRelease, NewRollout, ReleaseChange
from firmware.targeting import select_targets

rd = store.rollout_devices
ro = store.rollouts


def _now() -> datetime:
    return datetime.now(UTC)


def _variant(release: Any) -> Variant:
    return Variant(
        console=release.console,
        models=tuple(release.models),
        engine=release.engine,
        transport=release.transport,
    )


# ------------------------------------------------------------------ releases


async def create_release(
    engine: AsyncEngine, principal: Principal, body: NewRelease
) -> dict[str, Any]:
    """An admin adds a release; `firmware.release.v1` carries it to the commands service."""
    require_admin(principal)
    check_release(Variant(body.console, tuple(body.models), body.engine, body.transport))
    values = {
        "id": f"rel-{uuid.uuid4().hex[:16]}",
        "console": body.console,
        "version": body.version,
        "models": list(dict.fromkeys(body.models)),
        "engine": body.engine,
        "transport": body.transport,
        "artifact_url": str(body.artifact_url),
        "sha256": body.sha256,
        "size": body.size,
        "notes": body.notes,
        "withdrawn": False,
        "created_by": principal.user_id,
        "created_at": _now(),
    }
    rel = store.releases
    async with engine.begin() as conn:
        same = await conn.scalar(
            select(rel.c.id).where(
                rel.c.console == body.console,
                rel.c.version == body.version,
                rel.c.engine.is_not_distinct_from(body.engine),
                rel.c.transport.is_not_distinct_from(body.transport),
            )
        )
        if same is not None:
            raise RuleError(409, "version", f"release {same} already ships {body.version}")
        await conn.execute(rel.insert().values(**values))
        await store.insert_outbox(conn, [release_event(values)])
    return views.release_view(_Row(values), validated=False)


async def change_release(
    engine: AsyncEngine, principal: Principal, release_id: str, body: ReleaseChange
) -> dict[str, Any]:
    """An admin edits notes or withdraws a release (withdrawn: no new rollouts or OTAs)."""
    require_admin(principal)
    rel = store.releases
    async with engine.begin() as conn:
        await access_release(conn, release_id)
        changes = body.model_dump(exclude_none=True)
        if changes:
            await conn.execute(update(rel).where(rel.c.id == release_id).values(**changes))
        row = (await conn.execute(select(rel).where(rel.c.id == release_id))).one()
        if changes:
            await store.insert_outbox(conn, [release_event(row)])
        validated = await views.is_validated(conn, release_id, views.validation_scope(principal))
    return views.release_view(row, validated=validated)


class _Row:
    """A dict read like a result row."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


# ------------------------------------------------------------------ validations


async def create_validation(
    engine: AsyncEngine, principal: Principal, release_id: str, device_id: str
) -> dict[str, Any]:
    """OTA to one test device in scope; the release is validated once it is back on the version."""
    require_operator(principal)
    now = _now()
    async with engine.begin() as conn:
        release = await access_release(conn, release_id)
        device = await access_device(conn, principal, device_id)
        if release.withdrawn:
            raise RuleError(409, "release_id", "the release is withdrawn")
        if not device.test_device:
            raise RuleError(422, "device_id", f"{device_id} is not a test device")
        mismatch = variant_mismatch(
            _variant(release), model=device.model, engine=device.engine, transport=device.transport
        )
        if mismatch is not None:
            raise RuleError(422, "device_id", f"{device_id}: {mismatch[0]}: {mismatch[1]}")
        rollout_id = f"val-{uuid.uuid4().hex[:16]}"
        row = {
            "id": rollout_id,
            "purpose": "validation",
            "release_id": release_id,
            "scope": "my_fleet",
            "dealer_id": device.dealer_id,
            "target": {"device_ids": [device_id]},
            "batch_size": 1,
            "max_per_minute": None,
            "failure_threshold_pct": 100.0,
            "status": "running",
            "status_reason": None,
            "created_by": principal.user_id,
            "created_at": now,
            "updated_at": now,
            "pace_anchor_at": now,
        }
        await conn.execute(ro.insert().values(**row))
        await _insert_devices(conn, rollout_id, [device])
        info = RolloutInfo.of(_Row(row), release)
        await store.insert_outbox(
            conn, [rollout_event(info, "created", at=now, actor=principal.user_id)]
        )
    return {
        "id": rollout_id,
        "release_id": release_id,
        "dealer_id": device.dealer_id,
        "device_id": device_id,
        "state": "pending",
        "passed": False,
        "attempts": 0,
        "reported_version": device.fw,
        "detail": None,
        "created_by": principal.user_id,
        "created_at": now,
    }


async def _insert_devices(conn: AsyncConnection, rollout_id: str, devices: list[Any]) -> None:
    rows = [
        {
            "rollout_id": rollout_id,
            "device_id": d.device_id,
            "seq": seq,
            "dealer_id": d.dealer_id,
            "transport": d.transport,
            "gps": d.gps,
            "state": "pending",
            "reported_version": d.fw,
        }
        for seq, d in enumerate(devices)
    ]
    if not rows:
        return
    try:
        async with conn.begin_nested():
            await conn.execute(rd.insert(), rows)
    except IntegrityError as exc:
        # Another rollout took one of these devices meanwhile (the partial unique index).
        raise RuleError(409, "device_ids", "a device is already in an active rollout") from exc


# ------------------------------------------------------------------ rollouts


async def create_rollout(
    engine: AsyncEngine, principal: Principal, body: NewRollout
) -> dict[str, Any]:
    """Deploy a release to a dealer's fleet (`my_fleet`) or everywhere (`global`, admins)."""
    require_operator(principal)
    if body.scope == "global" and not principal.is_admin:
        raise ProblemError(403, "Forbidden", "dealers deploy to my_fleet only")
    if (body.override or body.supersede) and not principal.is_admin:
        raise ProblemError(403, "Forbidden", "override and supersede are admin-only actions")
    dealer_id = _dealer_of(principal, body)
    now = _now()
    async with engine.begin() as conn:
        release = await access_release(conn, body.release_id)
        if release.withdrawn:
            raise RuleError(409, "release_id", "the release is withdrawn")
        variant = _variant(release)
        check_target(
            variant,
            models=body.target.models,
            engine=body.target.engine,
            transport=body.target.transport,
        )
        override_reason = await _validation_gate(conn, principal, body, dealer_id)
        targets = await select_targets(
            conn, principal, variant, target=body.target, dealer_id=dealer_id
        )
        todo = [d for d in targets if d.fw != release.version]
        rollout_id = f"ro-{uuid.uuid4().hex[:16]}"
        await _take_devices(conn, principal, rollout_id, todo, supersede=body.supersede, now=now)
        status = "running" if todo else "completed"
        row = {
            "id": rollout_id,
            "purpose": "rollout",
            "release_id": release.id,
            "scope": body.scope,
            "dealer_id": dealer_id,
            "target": body.target.model_dump(exclude_none=True),
            "batch_size": body.strategy.batch_size,
            "max_per_minute": body.strategy.max_per_minute,
            "failure_threshold_pct": body.strategy.failure_threshold_pct,
            "failure_min_finished": body.strategy.failure_min_finished,
            "status": status,
            "status_reason": None if todo else "every targeted device already runs the version",
            "override_reason": override_reason,
            "skipped": len(targets) - len(todo),
            "created_by": principal.user_id,
            "created_at": now,
            "updated_at": now,
            "finished_at": None if todo else now,
            "pace_anchor_at": now,
        }
        await conn.execute(ro.insert().values(**row))
        await _insert_devices(conn, rollout_id, todo)
        info = RolloutInfo.of(_Row(row), release)
        staged = [
            rollout_event(
                info,
                "created",
                at=now,
                actor=principal.user_id,
                override_reason=override_reason,
                counts={"pending": len(todo), "skipped": row["skipped"]},
            )
        ]
        if not todo:
            staged.append(rollout_event(info, "completed", at=now, reason="nothing to update"))
        await store.insert_outbox(conn, staged)
        return await views.rollout_detail(conn, _Row(row | {"created_at": now}))


def _dealer_of(principal: Principal, body: NewRollout) -> str | None:
    if body.scope == "global":
        return None
    if principal.is_admin:
        if not body.dealer_id:
            raise RuleError(422, "dealer_id", "an admin's my_fleet rollout names the dealer")
        return body.dealer_id
    if body.dealer_id is not None and body.dealer_id != principal.dealer_id:
        raise ProblemError(403, "Forbidden", "dealers deploy to their own fleet only")
    return principal.dealer_id


async def _validation_gate(
    conn: AsyncConnection, principal: Principal, body: NewRollout, dealer_id: str | None
) -> str | None:
    """409 unless validated in scope; an admin's override needs a reason, which is audited."""
    if await views.is_validated(conn, body.release_id, dealer_id):
        return None
    if not body.override:
        whose = f"dealer {dealer_id}" if dealer_id else "any dealer"
        raise RuleError(
            409,
            "release_id",
            f"the release has no passed validation on a test device of {whose}: "
            "validate it on one test device first",
        )
    reason = (body.override_reason or "").strip()
    if not reason:
        raise RuleError(422, "override_reason", "an override states its reason")
    await conn.execute(
        store.audit_log.insert().values(
            actor=principal.user_id,
            action="rollout.override_validation",
            object_id=body.release_id,
            reason=reason,
            details={"scope": body.scope, "dealer_id": dealer_id},
        )
    )
    return reason


async def _take_devices(
    conn: AsyncConnection,
    principal: Principal,
    rollout_id: str,
    devices: list[Any],
    *,
    supersede: bool,
    now: datetime,
) -> None:
    """409 when a device is in another active rollout; an admin may take over waiting ones."""
    if not devices:
        return
    ids = [d.device_id for d in devices]
    busy = (
        await conn.execute(
            select(rd, ro.c.status.label("rollout_status"))
            .join(ro, ro.c.id == rd.c.rollout_id)
            .where(rd.c.device_id.in_(ids), rd.c.state.in_(ACTIVE))
            .with_for_update(of=rd)
        )
    ).all()
    if not busy:
        return
    in_flight = [b for b in busy if b.state != "pending"]
    if not supersede or in_flight:
        sample = ", ".join(f"{b.device_id} ({b.rollout_id}, {b.state})" for b in busy[:5])
        why = "an OTA is in flight" if supersede else "already in an active rollout"
        raise RuleError(409, "device_ids", f"{len(busy)} device(s) {why}: {sample}")
    for old in busy:
        change = cancel(
            Progress(state="pending", attempt=old.attempt), why=f"superseded by {rollout_id}"
        )
        assert change is not None  # noqa: S101 - pending always cancels
        await conn.execute(
            update(rd)
            .where(rd.c.rollout_id == old.rollout_id, rd.c.device_id == old.device_id)
            .values(state="cancelled", detail=change.after.detail, updated_at=now)
        )
        info = await _info(conn, old.rollout_id)
        await store.insert_outbox(conn, [device_event(info, old.device_id, change, at=now)])
    await conn.execute(
        store.audit_log.insert().values(
            actor=principal.user_id,
            action="rollout.supersede",
            object_id=rollout_id,
            reason=f"took over {len(busy)} waiting device(s)",
            details={"devices": [b.device_id for b in busy][:1000]},
        )
    )


async def _info(conn: AsyncConnection, rollout_id: str) -> RolloutInfo:
    rel = store.releases
    row = (await conn.execute(select(ro).where(ro.c.id == rollout_id))).one()
    release = (await conn.execute(select(rel).where(rel.c.id == row.release_id))).one()
    return RolloutInfo.of(row, release)


async def act_on_rollout(
    engine: AsyncEngine,
    principal: Principal,
    rollout_id: str,
    action: Literal["pause", "resume", "clear"],
) -> dict[str, Any]:
    """Pause (no new dispatches), resume, or clear (cancel all not yet sent, end the rollout)."""
    require_operator(principal)
    now = _now()
    async with engine.begin() as conn:
        row = await access_rollout(conn, principal, rollout_id, lock=True)
        if row.purpose != "rollout":
            raise ProblemError(404, "Not found", f"no rollout {rollout_id!r}")
        status = next_status(row.status, action)
        values: dict[str, Any] = {"status": status, "updated_at": now, "status_reason": action}
        if action == "resume":
            failed = await conn.scalar(
                select(func.count()).where(rd.c.rollout_id == rollout_id, rd.c.state == "failed")
            )
            values |= {
                "acknowledged_failed": int(failed or 0),
                # The pace starts over: a pause earns no burst of dispatches on resume.
                "pace_anchor_at": now,
                "pace_sent": 0.0,
            }
        if action == "clear":
            values["finished_at"] = now
        await conn.execute(update(ro).where(ro.c.id == rollout_id).values(**values))
        info = await _info(conn, rollout_id)
        staged = []
        if action == "clear":
            staged += await _cancel_pending(conn, info, now=now)
        kind = {"pause": "paused", "resume": "resumed", "clear": "cleared"}[action]
        staged.append(
            rollout_event(info, kind, at=now, actor=principal.user_id, reason=action)  # type: ignore[arg-type]
        )
        await store.insert_outbox(conn, staged)
        fresh = (await conn.execute(select(ro).where(ro.c.id == rollout_id))).one()
        return await views.rollout_detail(conn, fresh)


async def _cancel_pending(
    conn: AsyncConnection, info: RolloutInfo, *, now: datetime
) -> list[dict[str, Any]]:
    why = "cleared before it was sent"
    cancelled = (
        await conn.execute(
            update(rd)
            .where(rd.c.rollout_id == info.rollout_id, rd.c.state == "pending")
            .values(state="cancelled", detail=why, next_attempt_at=None, updated_at=now)
            .returning(rd.c.device_id, rd.c.attempt, rd.c.reported_version)
        )
    ).all()
    events = []
    for row in cancelled:
        before = Progress(
            state="pending", attempt=row.attempt, reported_version=row.reported_version
        )
        change = cancel(before, why=why)
        assert change is not None  # noqa: S101 - pending always cancels
        events.append(device_event(info, row.device_id, change, at=now))
    return events
