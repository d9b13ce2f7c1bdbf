"""Calls to the public API on behalf of the signed-in user, with problem+json errors."""

from dataclasses import dataclass
from typing import Any

import httpx

from common.logging import request_id_var


class ApiError(Exception):
    """The API refused or failed a call; `detail` is what the user should read."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


class SessionExpiredError(ApiError):
    """401 from the API: the session is gone; the user signs in again."""


@dataclass(frozen=True)
class Page:
    """One page of a `{items, next_cursor}` list."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def error_from_response(response: httpx.Response) -> ApiError:
    """An `ApiError` from a non-2xx response, using the problem document when there is one."""
    title, detail = response.reason_phrase or "Error", ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        title = str(body.get("title") or title)
        raw = body.get("detail")
        detail = raw if isinstance(raw, str) else ""
    if not detail:
        detail = f"The API answered {response.status_code} {title}."
    cls = SessionExpiredError if response.status_code == 401 else ApiError
    return cls(response.status_code, title, detail)


class ApiClient:
    """The public API as one user (bearer token) sees it."""

    def __init__(self, http: httpx.AsyncClient, token: str | None) -> None:
        self._http = http
        self._token = token

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One call; the decoded JSON body (None for 204); raises `ApiError` otherwise."""
        sent = dict(headers or {})
        if self._token:
            sent["Authorization"] = f"Bearer {self._token}"
        if (request_id := request_id_var.get()) is not None:
            sent["X-Request-ID"] = request_id
        clean = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        try:
            response = await self._http.request(
                method, path.lstrip("/"), params=clean, json=json, headers=sent
            )
        except httpx.TimeoutException as exc:
            raise ApiError(
                504, "API timeout", "The API did not answer in time; try again."
            ) from exc
        except httpx.HTTPError as exc:
            raise ApiError(
                503, "API unreachable", "The API cannot be reached right now; try again shortly."
            ) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(
                502, "Bad API answer", "The API answered with something not JSON."
            ) from exc

    async def get(self, path: str, **params: Any) -> Any:
        """GET with query parameters (empty ones left out)."""
        return await self.request("GET", path, params=params)

    async def post(
        self, path: str, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> Any:
        """POST a JSON body."""
        return await self.request(
            "POST", path, json=body if body is not None else {}, headers=headers
        )

    async def delete(self, path: str) -> Any:
        """DELETE."""
        return await self.request("DELETE", path)

    async def page(self, path: str, **params: Any) -> Page:
        """One page of a list endpoint."""
        body = await self.get(path, **params)
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise ApiError(502, "Bad API answer", f"{path} did not answer with a list.")
        cursor = body.get("next_cursor")
        return Page(items=body["items"], next_cursor=cursor if isinstance(cursor, str) else None)

    async def login(self, email: str, password: str) -> tuple[str, int]:
        """`POST /auth/login`: (session token, lifetime in seconds)."""
        body = await self.request("POST", "auth/login", json={"email": email, "password": password})
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise ApiError(502, "Bad API answer", "The login answer carried no token.")
        expires_in = body.get("expires_in")
        return body["access_token"], int(expires_in) if isinstance(expires_in, int) else 3600


def http_client(
    base_url: str, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The pooled HTTP client every request's `ApiClient` shares (`transport`: tests)."""
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/") + "/",
        transport=transport,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        follow_redirects=False,
    )
