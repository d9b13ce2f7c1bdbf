"""Rollout metrics on `/metrics`: rollouts by status, devices of open rollouts by state.

Gauges are refreshed from PostgreSQL every `metrics_interval_s` by a task of the service, so
every replica reports the same numbers (the truth is in the database, not in one process).
"""

import asyncio
import contextlib
import logging

from prometheus_client import Gauge
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from firmware import store
from firmware.domain import COUNTED

logger = logging.getLogger(__name__)

ROLLOUTS = Gauge(
    "autogen_firmware_rollouts",
    "Rollouts by purpose (rollout, validation) and status (running, paused, cleared, completed).",
    ["purpose", "status"],
)
ROLLOUT_DEVICES = Gauge(
    "autogen_firmware_rollout_devices",
    "Devices of running or paused rollouts, by state (pending, sent, updating, "
    "awaiting_return, confirmed, failed, cancelled).",
    ["purpose", "state"],
)
PURPOSES = ("rollout", "validation")
STATUSES = ("running", "paused", "cleared", "completed")
OPEN = ("running", "paused")


async def refresh(engine: AsyncEngine) -> None:
    """Read the counts and set every gauge (zero where nothing is counted)."""
    ro, rd = store.rollouts, store.rollout_devices
    async with engine.connect() as conn:
        rollouts = (
            await conn.execute(
                select(ro.c.purpose, ro.c.status, func.count()).group_by(ro.c.purpose, ro.c.status)
            )
        ).all()
        devices = (
            await conn.execute(
                select(ro.c.purpose, rd.c.state, func.count())
                .join(ro, ro.c.id == rd.c.rollout_id)
                .where(ro.c.status.in_(OPEN))
                .group_by(ro.c.purpose, rd.c.state)
            )
        ).all()
    by_status = {(p, s): n for p, s, n in rollouts}
    by_state = {(p, s): n for p, s, n in devices}
    for purpose in PURPOSES:
        for status in STATUSES:
            ROLLOUTS.labels(purpose, status).set(by_status.get((purpose, status), 0))
        for state in COUNTED:
            ROLLOUT_DEVICES.labels(purpose, state).set(by_state.get((purpose, state), 0))


async def run(engine: AsyncEngine, stop: asyncio.Event, interval_s: float) -> None:
    """Refresh until `stop` is set; a failed refresh keeps the last values and is retried."""
    while not stop.is_set():
        try:
            await refresh(engine)
        except Exception:
            logger.warning("rollout metrics refresh failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
