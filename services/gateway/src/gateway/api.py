"""Internal HTTP routes: device credentials (called by the fleet service's registration).

Served on the gateway's own port and not routed by the API gateway (nginx routes only
`/api/v1/gateway/` here). The caller forwards the end user's internal JWT.
"""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel

from common.auth import CurrentPrincipal, Principal
from common.http import ProblemError
from gateway import handlers
from gateway.protocol import DEVICE_ID

DeviceIdParam = Annotated[str, Path(pattern=DEVICE_ID.pattern, max_length=64)]


class IssuedOut(BaseModel):
    """A device's broker account and its new password (the only place it is ever shown)."""

    device_id: str
    username: str
    client_id: str
    password: str


class StateOut(BaseModel):
    """Whether a device holds broker credentials."""

    device_id: str
    exists: bool
    rotated_at: datetime | None


def access_credentials(principal: Principal) -> None:
    """Admins and dealer staff with control access manage device credentials.

    The fleet service has already checked that the device is in the caller's scope.
    """
    if principal.role not in ("admin", "service", "dealer"):
        raise ProblemError(403, "Forbidden", "only admins and dealers manage device credentials")
    if principal.access != "control":
        raise ProblemError(403, "Forbidden", "this token is read-only")


def internal_router() -> APIRouter:
    """`/internal/v1/devices/{device_id}/credentials`: PUT (issue/rotate), DELETE, GET."""
    router = APIRouter(prefix="/internal/v1", tags=["internal"])

    @router.put("/devices/{device_id}/credentials", status_code=201)
    async def issue(
        device_id: DeviceIdParam, principal: CurrentPrincipal, request: Request
    ) -> IssuedOut:
        """Create the device's broker account or rotate its password."""
        access_credentials(principal)
        state = request.app.state
        issued = await handlers.issue_credentials(
            sessions=state.infra.sessions, admin=state.admin, device_id=device_id
        )
        return IssuedOut(**issued.__dict__)

    @router.delete("/devices/{device_id}/credentials", status_code=204)
    async def revoke(
        device_id: DeviceIdParam, principal: CurrentPrincipal, request: Request
    ) -> Response:
        """Remove the device's broker account and disconnect it."""
        access_credentials(principal)
        state = request.app.state
        await handlers.revoke_credentials(
            sessions=state.infra.sessions, admin=state.admin, device_id=device_id
        )
        return Response(status_code=204)

    @router.get("/devices/{device_id}/credentials")
    async def show(
        device_id: DeviceIdParam, principal: CurrentPrincipal, request: Request
    ) -> StateOut:
        """Whether the device has credentials and when they last changed."""
        access_credentials(principal)
        found = await handlers.credentials_state(
            sessions=request.app.state.infra.sessions, device_id=device_id
        )
        return StateOut(**found.__dict__)

    return router
