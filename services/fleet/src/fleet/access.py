"""Who may see and change which device: the one place the fleet service checks scope.

`access_device` guards every route that names a device; `scope_params` is the same rule as the
values the search's and the map's cached statements bind (a list cannot check row by row and
still paginate). Both rest on
`common.auth`'s rules: admins everything; dealer staff their dealer's devices; customers their
dealer's devices whose customer email is theirs; a device-restricted token only its devices.
Anything out of scope is 404, never 403, so ids of other fleets do not leak.
"""

from typing import Any, Literal

from common.auth import (
    Principal,
    can_act_for_dealer,
    can_read_device,
    require_control,
)
from common.http import ProblemError
from fleet.domain import Device

Need = Literal["read", "control", "manage"]


def not_found(device_id: str) -> ProblemError:
    """The one answer for unknown and invisible devices alike."""
    return ProblemError(404, "Not found", f"no device {device_id!r}")


def access_device(
    principal: Principal, device: Device | None, device_id: str, need: Need
) -> Device:
    """`device` if `principal` may do `need` with it; 404 if unseen, 403 if seen but not allowed.

    read: see it. control: act on it (not with a read token). manage: change its registry
    entry (a control-access admin or staff of its dealer; customers may not).
    """
    if device is None or not can_read_device(principal, device.ownership):
        raise not_found(device_id)
    if need in ("control", "manage"):
        require_control(principal)
    if need == "manage" and not can_act_for_dealer(principal, device.dealer_id):
        raise ProblemError(403, "Forbidden", "only the device's dealer or an admin may change it")
    return device


def may_register(principal: Principal, dealer_id: str) -> None:
    """403 unless `principal` may register a device into `dealer_id`'s fleet."""
    require_control(principal)
    if principal.device_ids is not None:
        raise ProblemError(403, "Forbidden", "a device-restricted token cannot register devices")
    if not can_act_for_dealer(principal, dealer_id):
        raise ProblemError(403, "Forbidden", "dealers register devices into their own fleet only")


def scope_params(principal: Principal) -> dict[str, Any] | None:
    """The scope rule as named values (the search's and the map's cached statements bind them).

    None: nothing is in scope. Keys: `device_ids`, `dealer_id`, `customer_email`.
    """
    params: dict[str, Any] = {}
    if principal.device_ids is not None:
        params["device_ids"] = sorted(principal.device_ids)
    if principal.is_admin:
        return params
    if principal.dealer_id is None or principal.role not in ("dealer", "customer"):
        return None
    params["dealer_id"] = principal.dealer_id
    if principal.role == "customer":
        if not principal.email:
            return None
        # Stored emails are trimmed and lower-case (domain.normalize_email).
        params["customer_email"] = principal.email.strip().lower()
    return params
