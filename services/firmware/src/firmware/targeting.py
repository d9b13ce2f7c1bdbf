"""Which devices a rollout reaches: the release's variant, the caller's scope, the target."""

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from common.auth import Principal
from firmware import store
from firmware.access import not_found, sees_device
from firmware.domain import RuleError, Variant, variant_mismatch
from firmware.schemas import Target

dev = store.devices


async def select_targets(
    conn: AsyncConnection,
    principal: Principal,
    variant: Variant,
    *,
    target: Target,
    dealer_id: str | None,
) -> list[Any]:
    """Devices to update, in id order.

    Listed devices must each be in scope (else 404) and match the release (else 422 naming the
    mismatch); otherwise every device of the dealer (or, for global, every device) matching the
    release and the target's narrowing. 422 when nothing matches at all.
    """
    if target.device_ids is not None:
        return await _listed(conn, principal, variant, target.device_ids, dealer_id)
    models = [m for m in variant.models if not target.models or m in target.models]
    query = store.devices_with_presence().where(dev.c.deleted.is_(False), dev.c.model.in_(models))
    if variant.engine is not None:
        query = query.where(dev.c.engine == variant.engine)
    transport = variant.transport or target.transport
    if transport is not None:
        query = query.where(dev.c.transport == transport)
    if dealer_id is not None:
        query = query.where(dev.c.dealer_id == dealer_id)
    if principal.device_ids is not None:
        query = query.where(dev.c.device_id.in_(sorted(principal.device_ids)))
    found = (await conn.execute(query.order_by(dev.c.device_id))).all()
    rows = [row for row in found if sees_device(principal, row)]
    if not rows:
        where = f"dealer {dealer_id}'s fleet" if dealer_id else "the fleet"
        raise RuleError(422, "target", f"no device in {where} matches the release and target")
    return rows


async def _listed(
    conn: AsyncConnection,
    principal: Principal,
    variant: Variant,
    device_ids: list[str],
    dealer_id: str | None,
) -> list[Any]:
    wanted = list(dict.fromkeys(device_ids))
    found = {
        row.device_id: row
        for row in (
            await conn.execute(store.devices_with_presence().where(dev.c.device_id.in_(wanted)))
        ).all()
    }
    rows = []
    for device_id in wanted:
        row = found.get(device_id)
        if row is None or not sees_device(principal, row):
            raise not_found("device", device_id)
        if dealer_id is not None and row.dealer_id != dealer_id:
            raise not_found("device", device_id)
        mismatch = variant_mismatch(
            variant, model=row.model, engine=row.engine, transport=row.transport
        )
        if mismatch is not None:
            raise RuleError(422, "target.device_ids", f"{device_id}: {mismatch[0]}: {mismatch[1]}")
        rows.append(row)
    return sorted(rows, key=lambda r: r.device_id)
