"""The rollout dispatcher: sends pending devices, fails overdue ones, pauses and completes rollouts.

One pass is one transaction under a transaction-scoped advisory lock, so one replica works at a
time and a pass killed halfway leaves nothing behind: a device is `sent` exactly when its
`command.request.v1` event is in the outbox. The pace (`max_per_minute`, anchored to the start)
lives in the rollout row, so replicas and restarts keep one pace. Locks are taken rollouts first,
then device rows with SKIP LOCKED, so the API's pause and clear never deadlock with a pass.
"""

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from firmware import store
from firmware.domain import (
    IN_FLIGHT,
    Pace,
    Policy,
    crosses_threshold,
    on_deadline,
    pace_room,
)
from firmware.events import RolloutInfo, rollout_event
from firmware.progress import Tracked, progress_of, write_changes
from firmware.sending import send_pending

logger = logging.getLogger(__name__)

rd = store.rollout_devices
ro = store.rollouts
rel = store.releases


@dataclass
class DispatchStats:
    """What the dispatcher did since start."""

    passes: int = 0
    dispatched: int = 0
    expired: int = 0
    errors: int = 0


class Dispatcher:
    """Runs passes until stopped; see the module docstring."""

    def __init__(
        self,
        engine: AsyncEngine,
        policy: Policy,
        *,
        action: str,
        interval_s: float,
        max_per_pass: int,
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._action = action
        self._interval_s = interval_s
        self._max_per_pass = max_per_pass
        self._lock_key = zlib.crc32(b"firmware-dispatcher")
        self.stats = DispatchStats()

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until `stop` is set; errors are logged and retried, never fatal."""
        while not stop.is_set():
            busy = False
            try:
                busy = await self.run_once() >= self._max_per_pass
            except Exception:
                self.stats.errors += 1
                logger.exception("dispatcher pass failed; retrying")
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._interval_s)

    async def run_once(self, now: datetime | None = None) -> int:
        """One pass; returns how many devices it sent."""
        now = now or datetime.now(UTC)
        async with self._engine.begin() as conn:
            if not await conn.scalar(select(func.pg_try_advisory_xact_lock(self._lock_key))):
                return 0
            rollouts = (
                await conn.execute(
                    select(ro, rel.c.version, rel.c.console)
                    .join(rel, rel.c.id == ro.c.release_id)
                    .where(ro.c.status.in_(("running", "paused")))
                    .order_by(ro.c.created_at, ro.c.id)
                    .with_for_update(of=ro)
                )
            ).all()
            infos = {r.id: _info(r) for r in rollouts}
            await self._expire(conn, now)
            # Settle first: a rollout that just crossed its threshold sends nothing more. One
            # count for both: read again for sending, a failure committed in between (by a
            # consumer) freed a slot of the batch without pausing, and one more device went
            # out past the threshold.
            counts = await _counts(conn, [r.id for r in rollouts])
            running = await self._settle(conn, rollouts, infos, counts, now)
            sent = 0
            for row in running:
                if sent < self._max_per_pass:
                    sent += await self._send(conn, row, infos[row.id], counts[row.id], now, sent)
        self.stats.passes += 1
        self.stats.dispatched += sent
        return sent

    async def _expire(self, conn: AsyncConnection, now: datetime) -> None:
        """Devices past their deadline fail (rows busy in a consumer wait for the next pass)."""
        rows = (
            await conn.execute(
                select(rd, ro.c.status.label("ro_status"))
                .join(ro, ro.c.id == rd.c.rollout_id)
                .where(rd.c.state.in_(IN_FLIGHT), rd.c.deadline_at <= now)
                .order_by(rd.c.deadline_at)
                .limit(self._max_per_pass)
                .with_for_update(of=rd, skip_locked=True)
            )
        ).all()
        tracked = []
        infos: dict[str, RolloutInfo] = {}
        for row in rows:
            change = on_deadline(progress_of(row), now=now, policy=self._policy)
            if change is None:
                continue
            if row.rollout_id not in infos:
                infos[row.rollout_id] = await _info_of(conn, row.rollout_id)
            info = infos[row.rollout_id]
            tracked.append(Tracked(row.rollout_id, row.device_id, info, change.after, [change]))
        await write_changes(conn, tracked, now=now)
        self.stats.expired += len(tracked)

    async def _send(  # noqa: PLR0917 - private, called once
        self,
        conn: AsyncConnection,
        row: Any,
        info: RolloutInfo,
        counts: dict[str, int],
        now: datetime,
        sent_so_far: int,
    ) -> int:
        """Dispatch what the window, the pace and this pass allow for one rollout."""
        if counts.get("pending", 0) == 0:
            return 0
        in_flight = sum(counts.get(state, 0) for state in IN_FLIGHT)
        pace = Pace(anchor_at=row.pace_anchor_at or now, sent=row.pace_sent)
        allowed, pace = pace_room(pace, max_per_minute=row.max_per_minute, now=now)
        room = min(row.batch_size - in_flight, self._max_per_pass - sent_so_far, allowed)
        sent = 0
        if room > 0:
            sent = await send_pending(
                conn, info, room=int(room), now=now, policy=self._policy, action=self._action
            )
        if row.max_per_minute is not None:
            await conn.execute(
                update(ro)
                .where(ro.c.id == row.id)
                .values(pace_anchor_at=pace.anchor_at, pace_sent=pace.sent + sent)
            )
        return sent

    async def _settle(
        self,
        conn: AsyncConnection,
        rollouts: Sequence[Any],
        infos: dict[str, RolloutInfo],
        counts: dict[str, dict[str, int]],
        now: datetime,
    ) -> list[Any]:
        """Pause on crossing the failure threshold, complete when nothing is left to do;
        returns the rollouts still running."""
        staged = []
        running = []
        for row in rollouts:
            tally = counts[row.id]
            info = infos[row.id]
            if not any(tally.get(state, 0) for state in ("pending", *IN_FLIGHT)):
                await _set_status(conn, row.id, "completed", "every device finished", now)
                info = _with_status(info, "completed")
                staged.append(rollout_event(info, "completed", at=now, counts=tally))
            elif row.status == "running" and crosses_threshold(
                failed=tally.get("failed", 0),
                confirmed=tally.get("confirmed", 0),
                threshold_pct=row.failure_threshold_pct,
                acknowledged_failed=row.acknowledged_failed,
                min_finished=row.failure_min_finished,
                targeted=sum(n for state, n in tally.items() if state != "cancelled"),
            ):
                await _set_status(conn, row.id, "paused", "threshold", now)
                info = _with_status(info, "paused")
                staged.append(
                    rollout_event(
                        info,
                        "paused",
                        at=now,
                        actor="firmware",
                        reason="threshold",
                        detail=(
                            f"{tally.get('failed', 0)} failed of "
                            f"{tally.get('failed', 0) + tally.get('confirmed', 0)} finished, "
                            f"above {row.failure_threshold_pct:g}%"
                        ),
                        counts=tally,
                    )
                )
            elif row.status == "running":
                running.append(row)
        await store.insert_outbox(conn, staged)
        return running


async def _set_status(
    conn: AsyncConnection, rollout_id: str, status: str, reason: str, now: datetime
) -> None:
    values: dict[str, Any] = {"status": status, "status_reason": reason, "updated_at": now}
    if status == "completed":
        values["finished_at"] = now
    await conn.execute(update(ro).where(ro.c.id == rollout_id).values(**values))


async def _counts(conn: AsyncConnection, rollout_ids: list[str]) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = {rid: {} for rid in rollout_ids}
    if rollout_ids:
        rows = await conn.execute(
            select(rd.c.rollout_id, rd.c.state, func.count())
            .where(rd.c.rollout_id.in_(rollout_ids))
            .group_by(rd.c.rollout_id, rd.c.state)
        )
        for rollout_id, state, count in rows:
            result[rollout_id][state] = count
    return result


def _info(row: Any) -> RolloutInfo:
    return RolloutInfo(
        rollout_id=row.id,
        purpose=row.purpose,
        release_id=row.release_id,
        version=row.version,
        console=row.console,
        scope=row.scope,
        dealer_id=row.dealer_id,
        status=row.status,
    )


def _with_status(info: RolloutInfo, status: str) -> RolloutInfo:
    return RolloutInfo(**{**info.__dict__, "status": status})


async def _info_of(conn: AsyncConnection, rollout_id: str) -> RolloutInfo:
    row = (
        await conn.execute(
            select(ro, rel.c.version, rel.c.console)
            .join(rel, rel.c.id == ro.c.release_id)
            .where(ro.c.id == rollout_id)
        )
    ).one()
    return _info(row)
