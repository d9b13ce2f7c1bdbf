"""The device protocol (ARCHITECTURE.md), checked strictly: what devices send, what they get.

Pure: no I/O. `read_uplink()` turns one MQTT message into the Kafka event it stands for, or into
a refusal with the reason (which the bridge dead-letters). Firmware in the field depends on these
shapes: change them only additively and in step with the architecture document.
"""

import json
import random
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from common.contracts import device
from common.contracts.commands import CommandDispatch

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
UPLINK_KINDS = ("status", "telemetry", "ack", "ota")
_TOPIC = re.compile(r"^devices/([^/]+)/up/([^/]+)$")


def _timestamp(value: Any) -> Any:
    # `ts` is epoch seconds (a JSON number) or an ISO 8601 string; a bool is neither.
    if isinstance(value, bool):
        raise ValueError("ts must be epoch seconds or an ISO 8601 time")
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError) as exc:
            raise ValueError("ts is out of range") from exc
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError("ts must be epoch seconds or an ISO 8601 time")


Timestamp = Annotated[datetime, BeforeValidator(_timestamp)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Text = Annotated[str, Field(strict=True)]


class _Strict(BaseModel):
    # Unknown fields and coercions are refused: a device that sends them has a bug worth seeing.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StatusPayload(_Strict):
    """`up/status`: retained; also the Last Will (which has no `ts`: it cannot know when)."""

    state: Literal["online", "offline"]
    fw: Annotated[Text, Field(min_length=1, max_length=64)] | None = None
    ts: Annotated[Timestamp, Field(strict=False)] | None = None


class TelemetryPayload(_Strict):
    """`up/telemetry`: periodic readings; `lat`/`lon` only on GPS units, and always together."""

    ts: Annotated[Timestamp, Field(strict=False)]
    run_state: Literal["running", "stopped"]
    battery_v: Annotated[Number, Field(ge=0, le=100)]
    fuel_pct: Annotated[Number, Field(ge=0, le=100)]
    engine_hours: Annotated[Number, Field(ge=0)]
    lat: Annotated[Number, Field(ge=-90, le=90)] | None = None
    lon: Annotated[Number, Field(ge=-180, le=180)] | None = None

    @model_validator(mode="after")
    def _position_whole(self) -> "TelemetryPayload":
        if (self.lat is None) != (self.lon is None):
            raise ValueError("lat and lon come together")
        return self


class AckPayload(_Strict):
    """`up/ack`: the device's word on a command."""

    command_id: Annotated[Text, Field(min_length=1, max_length=64)]
    status: Literal["accepted", "succeeded", "failed", "rejected"]
    detail: Annotated[Text, Field(max_length=2000)] | None = None


class OtaPayload(_Strict):
    """`up/ota`: firmware update progress."""

    command_id: Annotated[Text, Field(min_length=1, max_length=64)]
    phase: Literal["downloading", "installing", "rebooting", "failed"]
    progress_pct: Annotated[Number, Field(ge=0, le=100)] | None = None
    detail: Annotated[Text, Field(max_length=2000)] | None = None


@dataclass(frozen=True)
class Accepted:
    """An uplink that becomes `data` on the contract topic `topic`, keyed by `device_id`."""

    topic: Any  # common.contracts.topic.Topic of the data's type
    device_id: str
    data: Any


@dataclass(frozen=True)
class Refused:
    """An uplink the gateway will not forward: dead-lettered with `reason`.

    `code` is the reason's class, a bounded label for metrics: `topic`, `device_id`, `kind`,
    `oversize`, `json` (not JSON at all) or `schema` (JSON of the wrong shape).
    """

    device_id: str | None
    reason: str
    code: str = "schema"


def device_of(topic: str) -> str | None:
    """The device id a `devices/{id}/...` topic names, if it names a valid one."""
    parts = topic.split("/", 2)
    if len(parts) >= 2 and parts[0] == "devices" and DEVICE_ID.match(parts[1]):
        return parts[1]
    return None


def read_uplink(
    topic: str, payload: bytes, *, received_at: datetime, max_bytes: int, retained: bool = False
) -> Accepted | Refused:
    """Validate one uplink against the protocol; see the module docstring. `retained`: the
    broker handed it from its retained store to a new subscription (old news, see `_accept`)."""
    match = _TOPIC.match(topic)
    if match is None:
        return Refused(
            device_of(topic), f"topic outside devices/{{id}}/up/{{kind}}: {topic[:200]}", "topic"
        )
    device_id, kind = match.groups()
    if not DEVICE_ID.match(device_id):
        return Refused(None, "invalid device id in topic", "device_id")
    if kind not in UPLINK_KINDS:
        return Refused(device_id, f"unknown uplink kind {kind[:50]!r}", "kind")
    if len(payload) > max_bytes:
        return Refused(
            device_id, f"payload of {len(payload)} bytes exceeds {max_bytes}", "oversize"
        )
    try:
        return _accept(kind, device_id, payload, received_at, retained=retained)
    except ValidationError as exc:
        not_json = any(err["type"] == "json_invalid" for err in exc.errors(include_url=False))
        return Refused(
            device_id, f"invalid {kind}: {_describe(exc)}", "json" if not_json else "schema"
        )


def _accept(
    kind: str, device_id: str, payload: bytes, received_at: datetime, *, retained: bool
) -> Accepted:
    common: dict[str, Any] = {"device_id": device_id, "received_at": received_at}
    if kind == "telemetry":
        t = TelemetryPayload.model_validate_json(payload)
        data: BaseModel = device.DeviceTelemetry.model_construct(**common, **t.__dict__)
        return Accepted(device.TELEMETRY, device_id, data)
    if kind == "status":
        s = StatusPayload.model_validate_json(payload)
        # A Last Will is set at connect time, so it carries no `ts`; an orderly offline does.
        will = s.state == "offline" and s.ts is None
        if retained and s.ts is not None:
            # The device's last status, kept by the broker and handed to a new subscription (a
            # new gateway replica): it happened when the device said, not now. Dated now, an
            # offline unit would look seen today to everyone who orders presence by time.
            common["received_at"] = min(s.ts, received_at)
        data = device.DevicePresence.model_construct(
            **common, **s.__dict__, will=will, replayed=retained
        )
        return Accepted(device.PRESENCE, device_id, data)
    if kind == "ack":
        a = AckPayload.model_validate_json(payload)
        data = device.DeviceReport.model_construct(
            **common, kind="ack", **a.__dict__, phase=None, progress_pct=None
        )
        return Accepted(device.REPORT, device_id, data)
    o = OtaPayload.model_validate_json(payload)
    data = device.DeviceReport.model_construct(**common, kind="ota", **o.__dict__, status=None)
    return Accepted(device.REPORT, device_id, data)


def _describe(exc: ValidationError) -> str:
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or '(payload)'}: {err['msg']}"
        for err in exc.errors(include_url=False)[:5]
    ]
    return "; ".join(parts)[:1000]


def _iso(value: datetime) -> str:
    # The same text pydantic writes for an aware datetime (UTC as `Z`).
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


# Event ids need uniqueness, not secrecy: a PRNG seeded from the OS per process is unique enough
# (122 random bits) and spares the uplink hot path a getrandom() syscall per message.
_IDS = random.Random()  # noqa: S311
_JSON = json.JSONEncoder(separators=(",", ":"))  # built once: json.dumps(separators=) is slow
_EVENT_TEMPLATE = '{"event_id":"%s","type":"%s","version":1,"occurred_at":"%s","source":"%s",'


def encode_event(
    event_type: str, source: str, key: str | None, data: BaseModel, occurred_at: datetime
) -> bytes:
    """The `common.events.Envelope` JSON of `data`, written without building the envelope.

    The uplink hot path: the same document `encode(new_event(...))` gives (the contract tests
    compare them), at a fraction of the cost. `data` was validated before (or built from
    validated fields with `model_construct`), so it is only serialised here.
    """
    fields = {k: _iso(v) if isinstance(v, datetime) else v for k, v in data.__dict__.items()}
    event_id = uuid.UUID(int=_IDS.getrandbits(128), version=4)
    head = _EVENT_TEMPLATE % (event_id, event_type, _iso(occurred_at), source)
    return (head + '"key":' + _JSON.encode(key) + ',"data":' + _JSON.encode(fields) + "}").encode()


def command_topic(device_id: str) -> str:
    """Where a device listens for commands."""
    return f"devices/{device_id}/down/command"


def command_payload(command: CommandDispatch) -> bytes:
    """`{"command_id", "action", "params", "expires_at"}` as the device receives it."""
    return command.model_dump_json(
        include={"command_id", "action", "params", "expires_at"}
    ).encode()


def is_expired(command: CommandDispatch, now: datetime) -> bool:
    """Past its `expires_at`: must not be sent."""
    return command.expires_at <= now
