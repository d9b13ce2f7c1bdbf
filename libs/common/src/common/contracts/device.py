"""Events the gateway publishes from device uplinks (the device protocol, normalised).

Every event is keyed by device id, so one device's events stay ordered in one partition.
"""

from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from common.contracts.topic import Topic

DeviceId = str


class _DeviceEvent(BaseModel):
    # Readers ignore fields added later in this version (additive changes); the gateway checks
    # devices' MQTT payloads strictly before it publishes these.
    model_config = ConfigDict(frozen=True, extra="ignore")

    device_id: DeviceId = Field(min_length=1, max_length=64)
    received_at: AwareDatetime


class DeviceTelemetry(_DeviceEvent):
    """`devices/{id}/up/telemetry`: periodic readings; GPS fields only on GPS units."""

    ts: datetime
    run_state: Literal["running", "stopped"] | None = None
    battery_v: float | None = None
    fuel_pct: float | None = Field(default=None, ge=0, le=100)
    engine_hours: float | None = Field(default=None, ge=0)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)


class DevicePresence(_DeviceEvent):
    """`devices/{id}/up/status` (retained; also the Last Will): online or offline."""

    state: Literal["online", "offline"]
    fw: str | None = Field(default=None, max_length=64)
    ts: datetime | None = None
    will: bool = False
    replayed: bool = Field(
        default=False,
        description="A retained status the broker handed a new subscription (a gateway replica "
        "joining): the device's last word, not a change now. `received_at` is then the "
        "device's own `ts` when it has one (never later than its receipt).",
    )


class DeviceReport(_DeviceEvent):
    """`up/ack` and `up/ota`: a device's word on a command, and the firmware it runs."""

    kind: Literal["ack", "ota"]
    command_id: str = Field(min_length=1, max_length=64)
    status: Literal["accepted", "succeeded", "failed", "rejected"] | None = None
    phase: Literal["downloading", "installing", "rebooting", "failed"] | None = None
    progress_pct: float | None = Field(default=None, ge=0, le=100)
    detail: str | None = Field(default=None, max_length=2000)


class DeviceDeadLetter(BaseModel):
    """An uplink the gateway refused, kept whole with the reason."""

    model_config = ConfigDict(frozen=True)

    mqtt_topic: str
    device_id: DeviceId | None
    reason: str
    payload_b64: str
    received_at: AwareDatetime


TELEMETRY = Topic(
    name="device.telemetry.v1",
    data=DeviceTelemetry,
    event_type="device.telemetry",
    key="device id",
    description="Periodic device telemetry: run state, battery, fuel, engine hours, GPS.",
)
PRESENCE = Topic(
    name="device.presence.v1",
    data=DevicePresence,
    event_type="device.presence",
    key="device id",
    description="Device connection state from retained status messages and Last Will.",
)
REPORT = Topic(
    name="device.report.v1",
    data=DeviceReport,
    event_type="device.report",
    key="device id",
    description="Command acks and OTA progress reported by devices.",
)
DEADLETTER = Topic(
    name="device.deadletter.v1",
    data=DeviceDeadLetter,
    event_type="device.deadletter",
    key="device id when the topic names one",
    description="Device uplinks refused by the gateway, with the raw payload and the reason.",
)
