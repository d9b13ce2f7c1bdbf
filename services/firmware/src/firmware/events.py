"""Building `firmware.rollout.v1` and `command.request.v1` events (staged in the outbox)."""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.contracts import commands, firmware
from common.events import Envelope, new_event
from firmware.domain import Change
from firmware.store import outbox_row

SOURCE = "firmware"


@dataclass(frozen=True)
class RolloutInfo:
    """What every event of a rollout repeats about it."""

    rollout_id: str
    purpose: str
    release_id: str
    version: str
    console: str
    scope: str
    dealer_id: str | None
    status: str

    @classmethod
    def of(cls, rollout: Any, release: Any) -> "RolloutInfo":
        """From a rollouts row and its releases row."""
        return cls(
            rollout_id=rollout.id,
            purpose=rollout.purpose,
            release_id=release.id,
            version=release.version,
            console=release.console,
            scope=rollout.scope,
            dealer_id=rollout.dealer_id,
            status=rollout.status,
        )


def rollout_event(
    info: RolloutInfo, kind: firmware.RolloutEventKind, *, at: datetime, **fields: Any
) -> dict[str, Any]:
    """An outbox row for a rollout-level or device-level event, keyed by rollout id."""
    return outbox_row(firmware.ROLLOUT.name, rollout_envelope(info, kind, at=at, **fields))


def rollout_envelope(
    info: RolloutInfo, kind: firmware.RolloutEventKind, *, at: datetime, **fields: Any
) -> Envelope[firmware.RolloutEvent]:
    """The `firmware.rollout.v1` envelope itself (the dispatcher patches it per device in SQL)."""
    values: dict[str, Any] = {
        "rollout_id": info.rollout_id,
        "purpose": info.purpose,
        "release_id": info.release_id,
        "version": info.version,
        "console": info.console,
        "scope": info.scope,
        "dealer_id": info.dealer_id,
        "status": info.status,
        **fields,
    }
    data = firmware.RolloutEvent(kind=kind, at=at, **values)
    return new_event(
        type=f"{firmware.ROLLOUT.event_type}.{kind}", data=data, source=SOURCE, key=info.rollout_id
    )


def device_event(
    info: RolloutInfo, device_id: str, change: Change, *, at: datetime
) -> dict[str, Any]:
    """`device_state_changed` for one transition."""
    return rollout_event(
        info,
        "device_state_changed",
        at=at,
        device_id=device_id,
        state=change.after.state,
        previous_state=change.before.state,
        attempt=change.after.attempt,
        reported_version=change.after.reported_version,
        detail=change.after.detail,
    )


def ota_envelope(
    info: RolloutInfo,
    device_id: str,
    *,
    attempt: int,
    action: str,
    ttl_s: int,
    requested_by: str,
) -> Envelope[commands.CommandRequest]:
    """The command request of one attempt; its request id makes a re-send harmless."""
    data = commands.CommandRequest(
        request_id=f"{info.rollout_id}:{device_id}:{attempt}",
        device_id=device_id,
        action=action,
        params={"release_id": info.release_id},
        ttl_s=ttl_s,
        requested_by=requested_by,
        correlation={
            "rollout_id": info.rollout_id,
            "device_id": device_id,
            "attempt": str(attempt),
        },
    )
    return new_event(type=commands.REQUEST.event_type, data=data, source=SOURCE, key=device_id)


def release_event(release: Mapping[str, Any] | Any) -> dict[str, Any]:
    """`firmware.release.v1` for the release as it now stands (compacted, keyed by id)."""
    get = release.get if isinstance(release, Mapping) else lambda k: getattr(release, k)
    data = firmware.FirmwareRelease(
        release_id=get("id"),
        console=get("console"),
        version=get("version"),
        models=list(get("models") or ()),
        engine=get("engine"),
        transport=get("transport"),
        artifact_url=get("artifact_url"),
        sha256=get("sha256"),
        size=get("size"),
        notes=get("notes") or "",
        created_at=get("created_at"),
        withdrawn=bool(get("withdrawn")),
    )
    event = new_event(
        type=firmware.RELEASE.event_type, data=data, source=SOURCE, key=data.release_id
    )
    return outbox_row(firmware.RELEASE.name, event)
