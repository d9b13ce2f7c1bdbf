"""The fleet service's device ownership snapshot, which other services project."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.contracts.topic import Topic


class FleetDevice(BaseModel):
    """A device's identity and ownership as of this event (the whole snapshot, not a diff).

    `deleted` marks a device removed from the registry; the compacted topic then keeps only
    that tombstone-like snapshot for it.
    """

    model_config = ConfigDict(frozen=True)

    device_id: str = Field(min_length=1, max_length=64)
    name: str
    model: str
    engine: str | None = None
    transport: Literal["gsm", "wifi"]
    gps: bool
    dealer_id: str
    customer_id: str | None = None
    customer_email: str | None = None
    test_device: bool = False
    deleted: bool = False


DEVICE = Topic(
    name="fleet.device.v1",
    data=FleetDevice,
    event_type="fleet.device",
    key="device id",
    description="Compacted: the latest identity and ownership snapshot of every device.",
)
