"""The gateway's internal API that issues and revokes devices' MQTT credentials.

Behind a small interface: the service uses `HttpGateway`, unit tests a fake.
"""

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import httpx

from common.auth import INTERNAL_TOKEN_HEADER


@dataclass(frozen=True)
class MqttCredentials:
    """What a device needs to connect; the password is shown once."""

    device_id: str
    username: str
    client_id: str
    password: str


class GatewayError(Exception):
    """The gateway did not issue or revoke the credentials."""


class CredentialsIssuer(Protocol):
    """Issues (creates or rotates) and revokes MQTT credentials for a device."""

    async def issue(self, device_id: str, *, internal_token: str) -> MqttCredentials:
        """New credentials for `device_id`; any previous password stops working."""
        ...

    async def revoke(self, device_id: str, *, internal_token: str) -> None:
        """Remove the device's credentials and disconnect it."""
        ...


class HttpGateway:
    """`PUT|DELETE {base}/internal/v1/devices/{id}/credentials`, as the caller."""

    def __init__(self, base_url: str, *, timeout_s: float = 5.0) -> None:
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def _path(self, device_id: str) -> str:
        return f"/internal/v1/devices/{quote(device_id, safe='')}/credentials"

    async def issue(self, device_id: str, *, internal_token: str) -> MqttCredentials:
        """See `CredentialsIssuer.issue`."""
        try:
            response = await self._client.put(
                self._path(device_id), headers={INTERNAL_TOKEN_HEADER: internal_token}
            )
        except httpx.HTTPError as exc:
            raise GatewayError(f"gateway unreachable: {type(exc).__name__}") from exc
        if response.status_code not in (200, 201):
            raise GatewayError(f"gateway answered {response.status_code}")
        try:
            body = response.json()
            return MqttCredentials(
                device_id=str(body["device_id"]),
                username=str(body["username"]),
                client_id=str(body["client_id"]),
                password=str(body["password"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise GatewayError("gateway answered without credentials") from exc

    async def revoke(self, device_id: str, *, internal_token: str) -> None:
        """See `CredentialsIssuer.revoke`."""
        try:
            response = await self._client.delete(
                self._path(device_id), headers={INTERNAL_TOKEN_HEADER: internal_token}
            )
        except httpx.HTTPError as exc:
            raise GatewayError(f"gateway unreachable: {type(exc).__name__}") from exc
        if response.status_code not in (204, 404):
            raise GatewayError(f"gateway answered {response.status_code}")
