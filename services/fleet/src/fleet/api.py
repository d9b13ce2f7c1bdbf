"""The public HTTP API under `/api/v1` (API.md, "Devices"): thin routes over the handlers."""

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from common.auth import INTERNAL_TOKEN_HEADER, CurrentPrincipal
from common.catalog import MODELS
from common.http import ProblemError
from fleet import handlers
from fleet.domain import (
    AttentionRules,
    Device,
    InvalidInputError,
    decode_cursor,
    encode_cursor,
    marker,
    needs_attention,
    parse_bbox,
)
from fleet.gateway_client import CredentialsIssuer, GatewayError
from fleet.reads import Reads

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"  # goes into MQTT topic names


class Position(BaseModel):
    """Last known position and when it was taken."""

    lat: float
    lon: float
    at: datetime


class DeviceOut(BaseModel):
    """A device as API.md describes it."""

    id: str
    name: str
    model: str
    engine: str | None
    transport: Literal["gsm", "wifi"]
    gps: bool
    dealer_id: str
    customer_email: str | None
    firmware_version: str | None
    connection: Literal["live", "offline"]
    last_seen_at: datetime | None
    run_state: str | None
    position: Position | None
    attention: bool
    test_device: bool


class RegisteredOut(DeviceOut):
    """The registered device and its MQTT password, shown only here."""

    mqtt_password: str | None = Field(
        description="null when the gateway could not issue it: then POST "
        "/api/v1/devices/{id}/mqtt-credentials (see mqtt_credentials_error)"
    )
    mqtt_credentials_error: str | None = None


class DevicePage(BaseModel):
    """One page of a device list."""

    items: list[DeviceOut]
    next_cursor: str | None


class RegisterIn(BaseModel):
    """`POST /devices`."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=DEVICE_ID_PATTERN)
    name: str = Field(min_length=1, max_length=200)
    model: str = Field(max_length=32)
    engine: str | None = Field(default=None, max_length=32)
    transport: str = Field(max_length=8)
    gps: bool = False
    dealer_id: str | None = Field(default=None, min_length=1, max_length=64)
    customer_email: str | None = Field(default=None, max_length=254)
    firmware_version: str | None = Field(default=None, min_length=1, max_length=64)
    test_device: bool = False


class UpdateIn(BaseModel):
    """`PATCH /devices/{id}`: only the fields given change; `dealer_id` is admin only."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    customer_email: str | None = Field(default=None, max_length=254)
    test_device: bool | None = None
    dealer_id: str | None = Field(default=None, min_length=1, max_length=64)


class CredentialsOut(BaseModel):
    """Fresh MQTT credentials; the password is shown only here."""

    device_id: str
    username: str
    client_id: str
    password: str


class PositionsOut(BaseModel):
    """Recent positions, newest first."""

    items: list[Position]


def device_out(device: Device, rules: AttentionRules, now: datetime) -> DeviceOut:
    """The API shape of a device, with `attention` as of `now`."""
    position = None
    if device.lat is not None and device.lon is not None and device.position_at is not None:
        position = Position(lat=device.lat, lon=device.lon, at=device.position_at)
    return DeviceOut(
        id=device.id,
        name=device.name,
        model=device.model,
        engine=device.engine,
        transport=device.transport,
        gps=device.gps,
        dealer_id=device.dealer_id,
        customer_email=device.customer_email,
        firmware_version=device.firmware_version,
        connection=device.connection,
        last_seen_at=device.last_seen_at,
        run_state=device.run_state,
        position=position,
        attention=needs_attention(device, rules, now),
        test_device=device.test_device,
    )


def build_router(
    *, sessions: handlers.Sessions, reads: Reads, rules: AttentionRules,
    issuer: CredentialsIssuer, map_limit: int,
) -> APIRouter:  # fmt: skip
    """The `/api/v1` routes, bound to the service's sessions, rules and gateway client.

    `reads` serve the GET routes (single statements, no transaction, no ORM session: see
    `fleet.reads`); `sessions` the writes.
    """
    router = APIRouter(prefix="/api/v1", tags=["devices"])

    def out(device: Device) -> DeviceOut:
        return device_out(device, rules, datetime.now(UTC))

    @router.get("/devices", response_model=DevicePage)
    async def search_devices(
        principal: CurrentPrincipal,
        *,
        q: Annotated[str | None, Query(max_length=200)] = None,
        connection: Literal["live", "offline"] | None = None,
        model: Annotated[str | None, Query(max_length=32)] = None,
        firmware: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
    ) -> Response:
        """Search by device id, customer email or name (partial, case-insensitive)."""
        if model is not None and model not in MODELS:
            raise InvalidInputError("model", f"unknown model; one of {', '.join(MODELS)}")
        items, more = await handlers.search_devices(
            reads,
            principal,
            q=q.strip() if q and q.strip() else None,
            connection=connection,
            model=model,
            firmware=firmware,
            after=decode_cursor(cursor) if cursor else None,
            limit=limit,
        )
        next_cursor = encode_cursor(items[-1].id) if more and items else None
        page = DevicePage(items=[out(d) for d in items], next_cursor=next_cursor)
        # Serialized once, here: a returned model FastAPI validates again, dumps to Python
        # objects and only then encodes, three passes over up to 500 devices.
        return Response(page.model_dump_json(by_alias=True), media_type="application/json")

    @router.get("/devices/{device_id}")
    async def get_device(principal: CurrentPrincipal, device_id: str) -> DeviceOut:
        """One device in the caller's scope (404 otherwise)."""
        return out(await handlers.read_device(reads, principal, device_id))

    @router.get("/devices/{device_id}/positions")
    async def get_positions(principal: CurrentPrincipal, device_id: str) -> PositionsOut:
        """The device's recent positions (a short history), newest first."""
        found = await handlers.recent_positions(reads, principal, device_id)
        return PositionsOut(items=[Position(lat=a, lon=o, at=t) for a, o, t in found])

    @router.post("/devices", status_code=201)
    async def register_device(
        principal: CurrentPrincipal, body: RegisterIn, request: Request
    ) -> RegisteredOut:
        """Register a device; its MQTT password is in this answer only."""
        device = await handlers.register_device(
            sessions, principal, handlers.Registration(**body.model_dump())
        )
        password, error = None, None
        try:
            credentials = await issuer.issue(device.id, internal_token=_token(request))
            password = credentials.password
        except GatewayError as exc:
            error = (
                f"{exc}; the device is registered: POST /api/v1/devices/{device.id}"
                "/mqtt-credentials to issue its password"
            )
        return RegisteredOut(
            **out(device).model_dump(), mqtt_password=password, mqtt_credentials_error=error
        )

    @router.patch("/devices/{device_id}")
    async def update_device(
        principal: CurrentPrincipal, device_id: str, body: UpdateIn
    ) -> DeviceOut:
        """Rename, assign the customer, flag as test device; transfer (admin only)."""
        changes: dict[str, Any] = {}
        for field in body.model_fields_set:
            value = getattr(body, field)
            if value is None and field != "customer_email":
                raise InvalidInputError(field, "may not be null")
            changes[field] = value
        return out(await handlers.update_device(sessions, principal, device_id, **changes))

    @router.post("/devices/{device_id}/mqtt-credentials", status_code=201)
    async def rotate_credentials(
        principal: CurrentPrincipal, device_id: str, request: Request
    ) -> CredentialsOut:
        """Issue new MQTT credentials (the old password stops working): a lost one, a leak."""
        device = await handlers.device_for_control(sessions, principal, device_id)
        try:
            credentials = await issuer.issue(device.id, internal_token=_token(request))
        except GatewayError as exc:
            raise ProblemError(502, "Bad gateway", str(exc)) from exc
        return CredentialsOut(
            device_id=credentials.device_id,
            username=credentials.username,
            client_id=credentials.client_id,
            password=credentials.password,
        )

    @router.get("/map/devices")
    async def map_devices(
        principal: CurrentPrincipal, bbox: Annotated[str, Query(max_length=200)]
    ) -> dict[str, Any]:
        """GeoJSON FeatureCollection of GPS devices in scope inside the bbox."""
        box = parse_bbox(bbox)
        found, truncated = await handlers.map_devices(reads, principal, box, limit=map_limit)
        now = datetime.now(UTC)
        features = [
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [d.lon, d.lat]},
                "properties": {
                    "id": d.id,
                    "name": d.name,
                    "marker": marker(d, rules, now),
                    "connection": d.connection,
                    "last_seen_at": d.last_seen_at.isoformat() if d.last_seen_at else None,
                },
            }
            for d in found
        ]
        return {"type": "FeatureCollection", "features": features, "truncated": truncated}

    return router


def _token(request: Request) -> str:
    # The caller's verified internal JWT, forwarded so the gateway applies the same scope.
    return request.headers.get(INTERNAL_TOKEN_HEADER, "")
