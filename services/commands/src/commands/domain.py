"""The command lifecycle as plain data and pure functions (no I/O, no framework).

`queued` → `sent` (the gateway published at QoS 1) → `acked` (the device accepted) →
`succeeded` | `failed` | `rejected`; or `expired` when the TTL passes before delivery or before
a result. States only move forward: a late or repeated report never moves a command back, which
is what makes every consumer naturally idempotent.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from commands.device_settings import ALLOWED_SETTINGS
from common.contracts.commands import Action, CommandState

ACTIONS: tuple[str, ...] = get_args(Action)
OTA_ACTIONS = frozenset({"fw_update", "force_ota"})
# Start and Stop succeed only once telemetry shows this run state (not on the ack alone).
RUN_STATE_OF: dict[str, str] = {"start": "running", "stop": "stopped"}
# Actions whose `succeeded` ack waits for the device's run state or firmware to confirm it.
CONFIRMED_BY_STATE: frozenset[str] = frozenset(RUN_STATE_OF) | OTA_ACTIONS
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "rejected", "expired"})
ACTIVE: tuple[str, ...] = ("queued", "sent", "acked")
_RANK = {"queued": 0, "sent": 1, "acked": 2}
# OTA phases during which the device is really updating (Start/Stop must wait).
UPDATING_PHASES = frozenset({"downloading", "installing", "rebooting"})

DeviceAck = Literal["accepted", "succeeded", "failed", "rejected"]


class InvalidCommandError(Exception):
    """A request that can never be carried out as given (422 naming `field`)."""

    def __init__(self, field: str, message: str, *, unknown_release: bool = False) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        # The release is not (yet) known here, as opposed to known and wrong for the device.
        self.unknown_release = unknown_release


class CommandConflictError(Exception):
    """A request that conflicts with what the device is doing now (409)."""


# ------------------------------------------------------------------ TTL


@dataclass(frozen=True)
class TtlPolicy:
    """How long an action may wait for delivery and a result."""

    default_s: int
    max_s: int
    min_s: int = 1


# Stale Start/Stop must not run late; firmware actions may wait for a device to come back.
TTL_POLICIES: dict[str, TtlPolicy] = {
    "start": TtlPolicy(default_s=120, max_s=900),
    "stop": TtlPolicy(default_s=120, max_s=900),
    "reboot": TtlPolicy(default_s=300, max_s=3600),
    "set_setting": TtlPolicy(default_s=600, max_s=86_400),
    "fw_update": TtlPolicy(default_s=86_400, max_s=7 * 86_400),
    "force_ota": TtlPolicy(default_s=3600, max_s=86_400),
}


def resolve_ttl(action: str, ttl_s: int | None) -> int:
    """The TTL to use; raises `InvalidCommandError` (field `ttl_s`) when out of range."""
    policy = TTL_POLICIES[action]
    if ttl_s is None:
        return policy.default_s
    if not policy.min_s <= ttl_s <= policy.max_s:
        raise InvalidCommandError(
            "ttl_s", f"{action} takes a TTL of {policy.min_s} to {policy.max_s} s, not {ttl_s}"
        )
    return ttl_s


# ------------------------------------------------------------------ devices, releases, settings


@dataclass(frozen=True)
class Device:
    """A device as the fleet service last described it (ownership and product variant)."""

    device_id: str
    dealer_id: str
    customer_email: str | None
    model: str
    engine: str | None
    transport: str


@dataclass(frozen=True)
class Release:
    """A firmware release as the firmware service last described it."""

    release_id: str
    version: str
    models: tuple[str, ...]
    engine: str | None
    transport: str | None
    artifact_url: str
    sha256: str
    size: int
    withdrawn: bool = False


def release_mismatch(release: Release, device: Device) -> str | None:
    """Why `release` may not go to `device`, or None when it matches."""
    if release.withdrawn:
        return f"release {release.release_id} is withdrawn"
    if device.model not in release.models:
        return (
            f"release {release.release_id} is for {', '.join(release.models)}, "
            f"not model {device.model}"
        )
    if release.engine is not None and release.engine != device.engine:
        return (
            f"release {release.release_id} is for engine {release.engine}, "
            f"not {device.engine or 'none'}"
        )
    if release.transport is not None and release.transport != device.transport:
        return (
            f"release {release.release_id} is for transport {release.transport}, "
            f"not {device.transport}"
        )
    return None


def ota_params(release: Release) -> dict[str, Any]:
    """What the device gets for an OTA action (the device protocol's exact shape)."""
    return {
        "version": release.version,
        "url": release.artifact_url,
        "sha256": release.sha256,
        "size": release.size,
    }


def check_params(action: str, params: Mapping[str, Any], device: Device) -> dict[str, Any]:
    """The params of `action` for `device`, checked; raises `InvalidCommandError` naming the field.

    OTA actions return `{"release_id"}` here; the caller resolves the release.
    """
    if action in ("start", "stop", "reboot"):
        if params:
            raise InvalidCommandError("params", f"{action} takes no params")
        return {}
    if action in OTA_ACTIONS:
        _only_keys(params, ("release_id",))
        release_id = params.get("release_id")
        if not isinstance(release_id, str) or not release_id.strip():
            raise InvalidCommandError("params.release_id", "a release id is required")
        return {"release_id": release_id}
    _only_keys(params, ("key", "value"))
    key = params.get("key")
    if not isinstance(key, str) or not key:
        raise InvalidCommandError("params.key", "a setting key is required")
    allowed = ALLOWED_SETTINGS.get(device.model, {})
    spec = allowed.get(key)
    if spec is None:
        known = ", ".join(sorted(allowed)) or "none"
        raise InvalidCommandError(
            "params.key", f"{device.model} has no setting {key!r}; one of {known}"
        )
    if "value" not in params:
        raise InvalidCommandError("params.value", "a value is required")
    problem = spec.check(params["value"])
    if problem is not None:
        raise InvalidCommandError("params.value", f"{key} {problem}")
    return {"key": key, "value": params["value"]}


def _only_keys(params: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in params:
        if key not in allowed:
            raise InvalidCommandError(f"params.{key}", f"unknown parameter; expected {allowed}")


# ------------------------------------------------------------------ the lifecycle


@dataclass(frozen=True)
class Command:
    """What the lifecycle needs to know about one command."""

    id: str
    device_id: str
    action: str
    status: str
    created_at: datetime
    expires_at: datetime
    detail: str | None = None
    device_result: str | None = None
    device_result_at: datetime | None = None
    ota_version: str | None = None
    ota_phase: str | None = None
    ota_progress: float | None = None
    acked_at: datetime | None = None
    correlation: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """True once the command reached its end."""
        return self.status in TERMINAL

    @property
    def updating(self) -> bool:
        """True while this is a firmware update the device is running (or about to)."""
        if self.terminal or self.action not in OTA_ACTIONS:
            return False
        return self.action == "force_ota" or self.ota_phase in UPDATING_PHASES


@dataclass(frozen=True)
class Change:
    """The result of an event on a command: its new row, and whether the state moved."""

    command: Command
    moved: bool

    @property
    def status(self) -> str:
        """The command's status after the change."""
        return self.command.status


def _move(cmd: Command, status: CommandState, detail: str | None, **fields: Any) -> Change:
    return Change(replace(cmd, status=status, detail=detail, **fields), moved=True)


def _edit(cmd: Command, **fields: Any) -> Change | None:
    updated = replace(cmd, **fields)
    return None if updated == cmd else Change(updated, moved=False)


def on_gateway_status(cmd: Command, status: str, detail: str | None) -> Change | None:
    """The gateway published the command (`sent`) or dropped it as too old (`expired`)."""
    if cmd.terminal:
        return None
    if status == "sent":
        return _move(cmd, "sent", detail) if cmd.status == "queued" else None
    if status == "expired" and cmd.device_result is None and cmd.status != "acked":
        return _move(cmd, "expired", detail or "expired before the gateway could deliver it")
    return None


def on_ack(  # noqa: PLR0911 - one return per lifecycle case
    cmd: Command,
    ack: str,
    detail: str | None,
    at: datetime,
    *,
    run_state: str | None = None,
    run_state_at: datetime | None = None,
    fw: str | None = None,
    fw_at: datetime | None = None,
) -> Change | None:
    """The device's word on the command (`up/ack`); `run_state`/`fw` are its latest known."""
    if cmd.terminal:
        return None
    if ack == "accepted":
        if _RANK[cmd.status] >= _RANK["acked"]:
            return None
        return _move(cmd, "acked", detail or "device accepted", acked_at=at)
    if ack in ("failed", "rejected"):
        reason = detail or f"device {ack} the command"
        return _move(cmd, "failed" if ack == "failed" else "rejected", reason)
    # ack == "succeeded": the device says it is done; some actions want proof.
    acked_at = cmd.acked_at or at
    if cmd.action in RUN_STATE_OF:
        done = replace(cmd, device_result="succeeded", device_result_at=at, acked_at=acked_at)
        if run_state == RUN_STATE_OF[cmd.action] and _since(run_state_at, cmd.created_at):
            return _move(done, "succeeded", f"telemetry shows {run_state}")
        waiting = f"device reports done; waiting for telemetry to show {RUN_STATE_OF[cmd.action]}"
        return Change(replace(done, status="acked", detail=waiting), moved=cmd.status != "acked")
    if cmd.action in OTA_ACTIONS:
        done = replace(cmd, device_result="succeeded", device_result_at=at, acked_at=acked_at)
        if fw is not None and fw == cmd.ota_version and _since(fw_at, cmd.created_at):
            return _move(done, "succeeded", f"device is back online with firmware {fw}")
        waiting = f"device reports done; waiting for it to come back with {cmd.ota_version}"
        return Change(replace(done, status="acked", detail=waiting), moved=cmd.status != "acked")
    return _move(cmd, "succeeded", detail or "device reports success", acked_at=acked_at)


def on_ota_phase(
    cmd: Command, phase: str, progress: float | None, detail: str | None, at: datetime
) -> Change | None:
    """An OTA progress report (`up/ota`)."""
    if cmd.terminal or cmd.action not in OTA_ACTIONS:
        return None
    if phase == "failed":
        return _move(cmd, "failed", detail or "device reports the update failed", ota_phase=phase)
    text = f"{phase}" + (f" {progress:g}%" if progress is not None else "")
    if cmd.status != "acked":
        # A phase report proves the device took the command even if its ack went missing.
        return _move(
            cmd, "acked", text, ota_phase=phase, ota_progress=progress, acked_at=cmd.acked_at or at
        )
    return _edit(cmd, ota_phase=phase, ota_progress=progress, detail=text)


def on_run_state(cmd: Command, run_state: str, at: datetime) -> Change | None:
    """Telemetry showed `run_state`; a Start/Stop the device finished succeeds on it."""
    if cmd.terminal or cmd.action not in RUN_STATE_OF or cmd.device_result != "succeeded":
        return None
    if run_state != RUN_STATE_OF[cmd.action] or at < cmd.created_at:
        return None
    return _move(cmd, "succeeded", f"telemetry shows {run_state}")


def on_presence(  # noqa: PLR0911 - one return per lifecycle case
    cmd: Command, online: bool, fw: str | None, at: datetime
) -> Change | None:
    """The device came (back) online with firmware `fw`: the end of an OTA or a reboot."""
    if cmd.terminal or not online:
        return None
    if cmd.action == "reboot":
        # A device that accepted a reboot goes offline; its return is the result.
        if cmd.status == "acked" and cmd.acked_at is not None and at > cmd.acked_at:
            return _move(cmd, "succeeded", "device is back online after the reboot")
        return None
    if cmd.action not in OTA_ACTIONS or fw is None:
        return None
    if at < cmd.created_at or cmd.status == "queued":
        return None
    if fw == cmd.ota_version:
        return _move(cmd, "succeeded", f"device is back online with firmware {fw}")
    if cmd.ota_phase == "rebooting" or cmd.device_result == "succeeded":
        return _move(cmd, "failed", f"device came back with firmware {fw}, not {cmd.ota_version}")
    return None


def on_sweep(cmd: Command, now: datetime, run_state_window: timedelta) -> Change | None:
    """Time passed: expire what got no result in its TTL; fail a Start/Stop telemetry never
    confirmed within the window after the device said it was done."""
    if cmd.terminal:
        return None
    if cmd.action in RUN_STATE_OF and cmd.device_result == "succeeded":
        assert cmd.device_result_at is not None  # noqa: S101 - set together with device_result
        if now >= cmd.device_result_at + run_state_window:
            wanted = RUN_STATE_OF[cmd.action]
            window = int(run_state_window.total_seconds())
            return _move(
                cmd,
                "failed",
                f"device reported success but telemetry did not show {wanted} within {window} s",
            )
        return None
    if now >= cmd.expires_at and cmd.action in OTA_ACTIONS and cmd.device_result == "succeeded":
        return _move(cmd, "failed", f"device did not come back with {cmd.ota_version} in time")
    if now >= cmd.expires_at:
        where = {"queued": "before it was sent", "sent": "before the device took it"}
        when = where.get(cmd.status, "before the device reported a result")
        return _move(cmd, "expired", f"TTL passed {when}")
    return None


def _since(at: datetime | None, start: datetime) -> bool:
    return at is not None and at >= start
