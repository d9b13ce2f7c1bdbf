"""Who may see and act on which devices, releases and rollouts: the service's one scope check.

Anything outside the caller's scope answers 404, as if it did not exist.
"""

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.auth import DeviceOwnership, Principal, can_read_device, require_control
from common.http import ProblemError
from firmware import store


def not_found(what: str, ident: str) -> ProblemError:
    """The 404 for anything unknown or out of scope."""
    return ProblemError(404, "Not found", f"no {what} {ident!r}")


def require_operator(principal: Principal) -> None:
    """403 unless the caller is dealer staff or an admin with control access."""
    require_control(principal)
    if not (principal.is_admin or principal.role == "dealer"):
        raise ProblemError(403, "Forbidden", "only dealer staff and admins handle firmware")


def sees_device(principal: Principal, row: Any) -> bool:
    """May `principal` see this projected device?"""
    if row is None or row.deleted:
        return False
    owner = DeviceOwnership(
        device_id=row.device_id, dealer_id=row.dealer_id, customer_email=row.customer_email
    )
    return can_read_device(principal, owner)


async def access_device(conn: AsyncConnection, principal: Principal, device_id: str) -> Any:
    """The projected device, or 404 when unknown or out of scope."""
    row = (
        await conn.execute(
            store.devices_with_presence().where(store.devices.c.device_id == device_id)
        )
    ).first()
    if not sees_device(principal, row):
        raise not_found("device", device_id)
    return row


async def access_release(conn: AsyncConnection, release_id: str) -> Any:
    """The release (every signed-in caller may read releases), or 404."""
    row = (
        await conn.execute(select(store.releases).where(store.releases.c.id == release_id))
    ).first()
    if row is None:
        raise not_found("release", release_id)
    return row


def sees_rollout(principal: Principal, row: Any) -> bool:
    """Admins see every rollout; dealer staff their own dealer's (never global ones)."""
    if principal.is_admin:
        return True
    if principal.role != "dealer" or principal.device_ids is not None:
        return False
    return row.dealer_id is not None and row.dealer_id == principal.dealer_id


async def access_rollout(
    conn: AsyncConnection, principal: Principal, rollout_id: str, *, lock: bool = False
) -> Any:
    """The rollout (locked for update when asked), or 404 when unknown or out of scope."""
    query = select(store.rollouts).where(store.rollouts.c.id == rollout_id)
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    if row is None or not sees_rollout(principal, row):
        raise not_found("rollout", rollout_id)
    return row
