"""The fleet's domain metric on `/metrics`: devices by state, counted every little while.

`autogen_fleet_devices{state="live"|"offline"}` sums to the registry; `state="attention"` counts
the devices the map shows red for attention (offline past their transport's threshold, or a
telemetry alarm) and overlaps the other two. One aggregate query per interval off the request
path, so scrapes cost nothing and the live-state writes stay as they are.
"""

import asyncio
import contextlib
import logging

from prometheus_client import Gauge

from fleet import handlers, store
from fleet.settings import FleetSettings

logger = logging.getLogger(__name__)

DEVICES = Gauge(
    "autogen_fleet_devices",
    "Registered devices by state: live, offline (these two sum to all), attention (overlaps).",
    ["state"],
)


async def refresh(reads: handlers.Sessions, settings: FleetSettings) -> dict[str, int]:
    """Count now and set the gauge; returns the counts."""
    async with reads() as session:
        counts = await store.count_states(
            session,
            wifi_s=settings.offline_attention_wifi_s,
            gsm_s=settings.offline_attention_gsm_s,
            gps_s=settings.offline_attention_gps_s,
            low_fuel=settings.low_fuel_pct,
            low_battery=settings.low_battery_v,
        )
    for state, count in counts.items():
        DEVICES.labels(state).set(count)
    return counts


async def keep_counting(
    reads: handlers.Sessions, settings: FleetSettings, stop: asyncio.Event
) -> None:
    """Refresh the gauge every `FLEET_STATE_METRICS_INTERVAL_S` until `stop` is set."""
    while not stop.is_set():
        try:
            await refresh(reads, settings)
        except Exception:
            logger.warning("fleet state metric refresh failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.state_metrics_interval_s)
