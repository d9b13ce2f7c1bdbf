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
