"""The public AutoGen Fleet API (API.md) as typed calls, with problem+json errors."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx

JSON = dict[str, Any]
MAX_PAGE = 500  # the API's largest `limit`
RolloutAction = Literal["pause", "resume", "clear"]


class ApiError(Exception):
    """The API answered with an error; `title` and `detail` come from its problem document."""

    def __init__(
        self, status: int, title: str, detail: str, errors: list[JSON] | None = None
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []


class UnreachableError(Exception):
    """No usable answer from the API at all (refused, timed out, not the API)."""


@dataclass(frozen=True)
class Listing:
    """Items gathered from one or more pages; `more` when the API had further pages."""

    items: list[JSON] = field(default_factory=list)
    more: bool = False


def problem_of(response: httpx.Response) -> ApiError:
    """An `ApiError` from an error response, using its problem document when there is one."""
    title = response.reason_phrase or "Error"
    detail = ""
    errors: list[JSON] = []
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        title = str(body.get("title") or title)
        if isinstance(body.get("detail"), str):
            detail = body["detail"]
        if isinstance(body.get("errors"), list):
            errors = [e for e in body["errors"] if isinstance(e, dict)]
    if not detail:
        detail = f"The API answered {response.status_code} {title}."
    return ApiError(response.status_code, title, detail, errors)


class Client:
    """One caller (bearer token) of the API at `base_url` (…/api/v1)."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float = 15.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "autogen-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # ------------------------------------------------------------------ plumbing

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One call: the decoded JSON body (None for an empty one); raises on errors."""
        clean = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        try:
            response = self._http.request(
                method, path.lstrip("/"), params=clean, json=json, headers=headers
            )
        except httpx.ConnectError as exc:
            raise UnreachableError(
                f"Cannot connect to the API at {self.base_url} ({exc}). Is the stack running? "
                "Set AUTOGEN_API_BASE_URL or --base-url."
            ) from exc
        except httpx.TimeoutException as exc:
            raise UnreachableError(f"The API at {self.base_url} did not answer in time.") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UnreachableError(f"Cannot call the API at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise problem_of(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise UnreachableError(
                f"{self.base_url}/{path.lstrip('/')} did not answer with JSON: is the base URL "
                "the API's (…/api/v1)?"
            ) from exc

    def _object(self, method: str, path: str, **kwargs: Any) -> JSON:
        body = self.request(method, path, **kwargs)
        if not isinstance(body, dict):
            raise UnreachableError(f"{path} did not answer with an object.")
        return body

    def collect(self, path: str, params: Mapping[str, Any], limit: int | None) -> Listing:
        """Follow `next_cursor` until `limit` items (None: every item) are gathered."""
        items: list[JSON] = []
        cursor: str | None = None
        while True:
            want = MAX_PAGE if limit is None else min(MAX_PAGE, limit - len(items))
            body = self._object("GET", path, params={**params, "limit": want, "cursor": cursor})
            page = body.get("items")
            if not isinstance(page, list):
                raise UnreachableError(f"{path} did not answer with a list.")
            items.extend(page)
            next_cursor = body.get("next_cursor")
            cursor = next_cursor if isinstance(next_cursor, str) and next_cursor else None
            if cursor is None:
                return Listing(items, more=False)
            if limit is not None and len(items) >= limit:
                return Listing(items[:limit], more=True)

    # ------------------------------------------------------------------ auth

    def login(self, email: str, password: str) -> JSON:
        """`POST /auth/login`: `{access_token, token_type, expires_in}`."""
        return self._object("POST", "auth/login", json={"email": email, "password": password})

    def me(self) -> JSON:
        """`GET /me`: the caller's account, role and scope."""
        return self._object("GET", "me")

    # ------------------------------------------------------------------ devices

    def devices(
        self,
        *,
        q: str | None = None,
        connection: str | None = None,
        model: str | None = None,
        firmware: str | None = None,
        limit: int | None = 50,
    ) -> Listing:
        """`GET /devices`: search by id, customer email or name, with filters."""
        params = {"q": q, "connection": connection, "model": model, "firmware": firmware}
        return self.collect("devices", params, limit)

    def device(self, device_id: str) -> JSON:
        """`GET /devices/{id}`."""
        return self._object("GET", f"devices/{_seg(device_id)}")

    def device_commands(self, device_id: str, *, limit: int | None = 20) -> Listing:
        """`GET /devices/{id}/commands`: newest first."""
        return self.collect(f"devices/{_seg(device_id)}/commands", {}, limit)

    # ------------------------------------------------------------------ commands

    def send_command(
        self,
        device_id: str,
        action: str,
        params: JSON,
        *,
        ttl_s: int | None = None,
        idempotency_key: str | None = None,
    ) -> JSON:
        """`POST /devices/{id}/commands`: the queued command."""
        body: JSON = {"action": action, "params": params}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._object(
            "POST", f"devices/{_seg(device_id)}/commands", json=body, headers=headers
        )

    def command(self, command_id: str, *, wait_s: int | None = None) -> JSON:
        """`GET /commands/{id}`; with `wait_s`, `Prefer: wait=N`: the API answers when the
        command has ended, or after that many seconds with its status then."""
        headers = {"Prefer": f"wait={wait_s}"} if wait_s else None
        return self._object("GET", f"commands/{_seg(command_id)}", headers=headers)

    # ------------------------------------------------------------------ firmware

    def releases(
        self,
        *,
        console: str | None = None,
        model: str | None = None,
        engine: str | None = None,
        transport: str | None = None,
        limit: int | None = 50,
    ) -> Listing:
        """`GET /firmware/releases`."""
        params = {"console": console, "model": model, "engine": engine, "transport": transport}
        return self.collect("firmware/releases", params, limit)

    def release(self, release_id: str) -> JSON:
        """`GET /firmware/releases/{id}`."""
        return self._object("GET", f"firmware/releases/{_seg(release_id)}")

    def create_rollout(self, body: JSON) -> JSON:
        """`POST /rollouts` with `{release_id, scope, target, strategy, ...}`."""
        return self._object("POST", "rollouts", json=body)

    def rollouts(self, *, status: str | None = None, limit: int | None = 50) -> Listing:
        """`GET /rollouts`."""
        return self.collect("rollouts", {"status": status}, limit)

    def rollout(self, rollout_id: str) -> JSON:
        """`GET /rollouts/{id}`."""
        return self._object("GET", f"rollouts/{_seg(rollout_id)}")

    def rollout_devices(
        self, rollout_id: str, *, state: str | None = None, limit: int | None = 50
    ) -> Listing:
        """`GET /rollouts/{id}/devices`: per-device state."""
        return self.collect(f"rollouts/{_seg(rollout_id)}/devices", {"state": state}, limit)

    def act_on_rollout(self, rollout_id: str, action: RolloutAction) -> JSON:
        """`POST /rollouts/{id}/pause|resume|clear`: the rollout after the change."""
        return self._object("POST", f"rollouts/{_seg(rollout_id)}/{action}", json={})

    # ------------------------------------------------------------------ tokens

    def tokens(self, *, limit: int | None = 50) -> Listing:
        """`GET /tokens`: without secrets."""
        return self.collect("tokens", {}, limit)

    def create_token(
        self,
        *,
        name: str,
        user_id: str,
        access: str,
        device_ids: list[str] | None,
        expires_in_days: int,
    ) -> JSON:
        """`POST /tokens`: the token with its secret (`token`), shown only this once."""
        body = {
            "name": name,
            "user_id": user_id,
            "access": access,
            "device_ids": device_ids,
            "expires_in_days": expires_in_days,
        }
        return self._object("POST", "tokens", json=body)

    def revoke_token(self, token_id: str) -> None:
        """`DELETE /tokens/{id}`."""
        self.request("DELETE", f"tokens/{_seg(token_id)}")


def _seg(value: str) -> str:
    """One path segment, escaped (an id never changes the path it is put in)."""
    return quote(value, safe="")
