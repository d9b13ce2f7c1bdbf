"""The device projection from `fleet.device.v1`: ownership, model and variant of each device."""

from collections.abc import Sequence

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from common.contracts.fleet import FleetDevice
from common.events import Envelope
from firmware import store


class FleetProjection:
    """Applies fleet snapshots (the whole device each time, so the latest simply wins)."""

    def __init__(self, engine: AsyncEngine, *, consumer: str) -> None:
        self._engine = engine
        self._consumer = consumer

    async def apply(self, batch: Sequence[Envelope[FleetDevice]]) -> None:
        """Upsert each device's latest snapshot (a `deleted` one keeps the row, marked deleted).

        Snapshots are whole, so re-applying a redelivered batch leaves the same rows.
        """
        latest: dict[str, FleetDevice] = {}
        for event in batch:  # record order is the device's order (keyed by device id)
            latest[event.data.device_id] = event.data
        rows = [
            {
                "device_id": d.device_id,
                "dealer_id": d.dealer_id,
                "customer_email": d.customer_email,
                "model": d.model,
                "engine": d.engine,
                "transport": d.transport,
                "gps": d.gps,
                "test_device": d.test_device,
                "deleted": d.deleted,
            }
            for d in latest.values()
        ]
        if not rows:
            return
        statement = insert(store.devices)
        upsert = statement.on_conflict_do_update(
            index_elements=[store.devices.c.device_id],
            set_={k: statement.excluded[k] for k in rows[0] if k != "device_id"},
        )
        async with self._engine.begin() as conn:
            await conn.execute(upsert, rows)
