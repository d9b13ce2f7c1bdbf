"""Firmware releases as the firmware service publishes them (compacted: latest per release).

The commands service resolves `fw_update` / `force_ota` requests from this projection, so a
release's artifact (url, sha256, size) and its target variant travel with it.
"""

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from common.contracts.topic import Topic


class FirmwareRelease(BaseModel):
    """A release and the exact product variants it may be installed on."""

    model_config = ConfigDict(frozen=True)

    release_id: str = Field(min_length=1, max_length=64)
    console: Literal["xpro", "unified", "ultra"]
    version: str = Field(min_length=1, max_length=64)
    models: list[str] = Field(min_length=1)
    engine: str | None = None
    transport: Literal["gsm", "wifi"] | None = None
    artifact_url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)
    notes: str = ""
    created_at: AwareDatetime
    withdrawn: bool = False


RELEASE = Topic(
    name="firmware.release.v1",
    data=FirmwareRelease,
    event_type="firmware.release",
    key="release id",
    description="Compacted: every firmware release with its artifact and target variant.",
)


RolloutEventKind = Literal[
    "created", "device_state_changed", "paused", "resumed", "cleared", "completed"
]
RolloutDeviceState = Literal[
    "pending", "sent", "updating", "awaiting_return", "confirmed", "failed", "cancelled"
]


class RolloutEvent(BaseModel):
    """One thing that happened to a rollout (or a test-device validation) or to one of its devices.

    `device_state_changed` carries `device_id`, `state`, `previous_state` and `attempt`; the
    rollout-level kinds carry `status` and, for `paused`, `reason` (`threshold` when the failure
    threshold paused it by itself). `counts` is the rollout's tally of device states right after.
    """

    # Readers ignore fields added later in this version (additive changes only).
    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: RolloutEventKind
    rollout_id: str = Field(min_length=1, max_length=64)
    purpose: Literal["rollout", "validation"] = "rollout"
    release_id: str = Field(min_length=1, max_length=64)
    version: str = Field(description="The release's firmware version.")
    console: Literal["xpro", "unified", "ultra"]
    scope: Literal["my_fleet", "global"]
    dealer_id: str | None = Field(default=None, description="Set for a my_fleet rollout.")
    status: Literal["running", "paused", "cleared", "completed"]
    device_id: str | None = None
    state: RolloutDeviceState | None = None
    previous_state: RolloutDeviceState | None = None
    attempt: int | None = Field(default=None, ge=0)
    reported_version: str | None = None
    detail: str | None = Field(default=None, max_length=2000)
    reason: str | None = Field(default=None, max_length=2000)
    actor: str | None = Field(default=None, description="Who acted: a user id, or `firmware`.")
    override_reason: str | None = Field(
        default=None, description="On `created`: an admin's stated reason to skip validation."
    )
    counts: dict[str, int] | None = None
    at: AwareDatetime


ROLLOUT = Topic(
    name="firmware.rollout.v1",
    data=RolloutEvent,
    event_type="firmware.rollout",
    key="rollout id",
    description=(
        "Rollouts and test-device validations: created, device state changed, paused, resumed, "
        "cleared, completed."
    ),
)
