"""Request bodies of the firmware API (responses are plain dicts built by `views`)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from common.catalog import Console

SEMVER = r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"


class NewRelease(BaseModel):
    """`POST /firmware/releases` (admin)."""

    model_config = ConfigDict(extra="forbid")

    console: Console
    version: str = Field(pattern=SEMVER, max_length=64, description="Semantic version.")
    models: list[str] = Field(min_length=1, max_length=10)
    engine: str | None = Field(default=None, max_length=32)
    transport: Literal["gsm", "wifi"] | None = None
    artifact_url: HttpUrl
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0, le=2**31 - 1)
    notes: str = Field(default="", max_length=10_000)


class ReleaseChange(BaseModel):
    """`PATCH /firmware/releases/{id}` (admin): notes, or withdraw it from new rollouts."""

    model_config = ConfigDict(extra="forbid")

    notes: str | None = Field(default=None, max_length=10_000)
    withdrawn: bool | None = None


class NewValidation(BaseModel):
    """`POST /firmware/releases/{id}/validations`."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(min_length=1, max_length=64)


class Target(BaseModel):
    """Narrows a rollout to some of the release's models, or to listed devices."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] | None = Field(default=None, max_length=10)
    engine: str | None = Field(default=None, max_length=32)
    transport: Literal["gsm", "wifi"] | None = None
    device_ids: list[str] | None = Field(default=None, min_length=1, max_length=100_000)


class Strategy(BaseModel):
    """How fast a rollout goes and when it stops by itself."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(
        default=50, ge=1, le=100_000, description="Devices with an OTA in flight at once, at most."
    )
    max_per_minute: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Dispatch pace; none: as fast as it goes."
    )
    failure_threshold_pct: float = Field(
        default=10.0,
        ge=0,
        le=100,
        description="Pause by itself when failed devices exceed this share of finished ones.",
    )
    failure_min_finished: int = Field(
        default=10,
        ge=1,
        le=100_000,
        description=(
            "Judge the failure threshold only once this many devices have finished "
            "(all of them when the rollout has fewer): one early failure is not a trend."
        ),
    )


class NewRollout(BaseModel):
    """`POST /rollouts`."""

    model_config = ConfigDict(extra="forbid")

    release_id: str = Field(min_length=1, max_length=64)
    scope: Literal["my_fleet", "global"]
    target: Target = Field(default_factory=Target)
    strategy: Strategy = Field(default_factory=Strategy)
    dealer_id: str | None = Field(
        default=None, max_length=64, description="Admins: whose fleet a my_fleet rollout is for."
    )
    override: bool = Field(default=False, description="Admins: deploy without a validation.")
    override_reason: str | None = Field(default=None, max_length=2000)
    supersede: bool = Field(
        default=False, description="Admins: take over devices waiting in another rollout."
    )
