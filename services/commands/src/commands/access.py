"""Who may see and command which device: the one place the commands service checks scope.

Rests on `common.auth`'s rules (admins everything; dealer staff their dealer's devices;
customers their own devices; a device-restricted token only its devices). A device the caller
may not see, or that the fleet never registered, answers 404 (ids of other fleets do not leak);
a device it sees but may not command (a read token) answers 403.
"""

from typing import Literal

from commands.domain import Device
from common.auth import DeviceOwnership, Principal, can_read_device, require_control
from common.http import ProblemError


def not_found(device_id: str) -> ProblemError:
    """The one answer for unknown and invisible devices alike."""
    return ProblemError(404, "Not found", f"no device {device_id!r}")


def access_device(
    principal: Principal, device: Device | None, device_id: str, need: Literal["read", "control"]
) -> Device:
    """`device` if `principal` may `need` it; 404 if it cannot see it, 403 if it may only read."""
    if device is None:
        raise not_found(device_id)
    ownership = DeviceOwnership(
        device_id=device.device_id,
        dealer_id=device.dealer_id,
        customer_email=device.customer_email,
    )
    if not can_read_device(principal, ownership):
        raise not_found(device_id)
    if need == "control":
        require_control(principal)
    return device
