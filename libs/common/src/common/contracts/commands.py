"""Commands on their way to devices, and what became of them.

`command.request.v1`: other services (rollouts) ask the commands service for a command.
`command.dispatch.v1`: the commands service hands a command to the gateway for delivery.
`command.status.v1`: every lifecycle transition (the gateway reports `sent` and `expired` here
too), keyed by device id so one device's history stays ordered.
"""

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from common.contracts.topic import Topic

Action = Literal["start", "stop", "reboot", "fw_update", "force_ota", "set_setting"]
CommandState = Literal["queued", "sent", "acked", "succeeded", "failed", "rejected", "expired"]


class CommandRequest(BaseModel):
    """A service's request for a command (answered on `command.status.v1`)."""

    model_config = ConfigDict(frozen=True)

    request_id: str = Field(min_length=1, max_length=100, description="Idempotency key.")
    device_id: str = Field(min_length=1, max_length=64)
    action: Action
    params: dict[str, Any] = Field(default_factory=dict)
    ttl_s: int | None = Field(default=None, ge=1)
    requested_by: str = Field(description="Who asked: a user id or a service and object id.")
    correlation: dict[str, str] = Field(
        default_factory=dict, description="Echoed on status events (e.g. rollout id)."
    )


class CommandDispatch(BaseModel):
    """A command for the gateway to publish to `devices/{device_id}/down/command`."""

    model_config = ConfigDict(frozen=True)

    command_id: str = Field(min_length=1, max_length=64)
    device_id: str = Field(min_length=1, max_length=64)
    action: Action
    params: dict[str, Any] = Field(default_factory=dict)
    expires_at: AwareDatetime


class CommandStatus(BaseModel):
    """A command reached a new state."""

    model_config = ConfigDict(frozen=True)

    command_id: str
    device_id: str
    action: Action
    status: CommandState
    detail: str | None = None
    at: AwareDatetime
    reporter: Literal["commands", "gateway"] = "commands"
    correlation: dict[str, str] = Field(default_factory=dict)


REQUEST = Topic(
    name="command.request.v1",
    data=CommandRequest,
    event_type="command.requested",
    key="device id",
    description="Commands asked for by other services (e.g. firmware rollouts).",
)
DISPATCH = Topic(
    name="command.dispatch.v1",
    data=CommandDispatch,
    event_type="command.dispatch",
    key="device id",
    description="Commands handed to the gateway for delivery to devices at QoS 1.",
)
STATUS = Topic(
    name="command.status.v1",
    data=CommandStatus,
    event_type="command.status",
    key="device id",
    description="Every command lifecycle transition (queued, sent, acked, ... expired).",
)
