"""An in-memory public API (httpx MockTransport) and a client of the console wired to it."""

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from console.app import create_app
from console.settings import ConsoleSettings

PASSWORD = "right-password"


def problem(status: int, title: str, detail: str) -> httpx.Response:
    """A problem+json answer like the services give."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return httpx.Response(
        status, content=json.dumps(body), headers={"Content-Type": "application/problem+json"}
    )


@dataclass
class FakeApi:
    """Just enough of API.md to drive the console; records what the console sent."""

    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    tokens_created: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    sent_headers: list[httpx.Headers] = field(default_factory=list)
    expired: set[str] = field(default_factory=set)

    def me(self, request: httpx.Request) -> dict[str, Any] | None:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if token in self.expired:
            return None
        return self.accounts.get(token)

    def handle(self, request: httpx.Request) -> httpx.Response:  # noqa: PLR0911, PLR0912
        path = request.url.path.removeprefix("/api/v1/")
        self.calls.append((request.method, path))
        self.sent_headers.append(request.headers)
        if path == "auth/login":
            body = json.loads(request.content)
            for token, account in self.accounts.items():
                if account["email"] == body["email"] and body["password"] == PASSWORD:
                    return httpx.Response(
                        200, json={"access_token": token, "token_type": "bearer", "expires_in": 900}
                    )
            return problem(401, "Unauthorized", "bad credentials")
        me = self.me(request)
        if me is None:
            return problem(401, "Unauthorized", "missing or invalid bearer token")
        if path == "me":
            return httpx.Response(200, json=me)
        if path == "devices":
            q = request.url.params.get("q", "").lower()
            found = [
                d for d in self.devices
                if not q or q in d["id"].lower() or q in d["name"].lower()
                or q in (d["customer_email"] or "").lower()
            ]  # fmt: skip
            return httpx.Response(200, json={"items": found, "next_cursor": None})
        if m := re.fullmatch(r"devices/([^/]+)", path):
            for d in self.devices:
                if d["id"] == m.group(1):
                    return httpx.Response(200, json=d)
            return problem(404, "Not found", f"no device {m.group(1)} in your scope")
        if m := re.fullmatch(r"devices/([^/]+)/commands", path):
            if request.method == "GET":
                mine = [c for c in self.commands if c["device_id"] == m.group(1)]
                return httpx.Response(200, json={"items": mine[::-1], "next_cursor": None})
            if me["access"] == "read":
                return problem(403, "Forbidden", "a read-only token cannot send commands")
            body = json.loads(request.content)
            command = {
                "id": f"cmd-{len(self.commands) + 1}", "device_id": m.group(1),
                "action": body["action"], "params": body["params"], "status": "queued",
                "detail": None, "created_at": "2025-01-01T00:00:00Z",
                "updated_at": "2025-01-01T00:00:00Z",
                "idempotency_key": request.headers.get("Idempotency-Key"),
            }  # fmt: skip
            self.commands.append(command)
            return httpx.Response(202, json=command)
        if m := re.fullmatch(r"commands/([^/]+)", path):
            for c in self.commands:
                if c["id"] == m.group(1):
                    return httpx.Response(200, json=c)
            return problem(404, "Not found", "no such command")
        if path == "tokens" and request.method == "POST":
            body = json.loads(request.content)
            self.tokens_created.append(body)
            created = {
                **body,
                "id": "tok-1",
                "token": "agk_secret_shown_once",
                "expires_at": "2025-04-01T00:00:00Z",
                "created_at": "2025-01-01T00:00:00Z",
            }
            return httpx.Response(201, json=created)
        if path == "users":
            return httpx.Response(200, json={"items": [
                {"id": "u-cust", "email": "cust@example.com", "name": "Cust", "role": "customer",
                 "dealer_id": "d1"}], "next_cursor": None})  # fmt: skip
        if path in ("tokens", "firmware/releases", "rollouts", "dealers"):
            return httpx.Response(200, json={"items": [], "next_cursor": None})
        if path == "map/devices":
            return httpx.Response(200, json={"type": "FeatureCollection", "features": []})
        return problem(404, "Not found", f"no API resource {path}")


def device(device_id: str, **fields: Any) -> dict[str, Any]:
    """A device as the fleet API returns it."""
    base = {
        "id": device_id, "name": f"Genset {device_id}", "model": "D100", "engine": "diesel",
        "transport": "gsm", "gps": True, "dealer_id": "d1",
        "customer_email": "alice@farm.example", "firmware_version": "2.4.1",
        "connection": "live", "last_seen_at": "2025-01-01T00:00:00Z", "run_state": "stopped",
        "position": {"lat": 52.1, "lon": 4.3, "at": "2025-01-01T00:00:00Z"},
        "attention": False, "test_device": False,
    }  # fmt: skip
    base.update(fields)
    return base


@pytest.fixture
def fake_api() -> FakeApi:
    """A dealer, an admin, a read-only customer token and two devices."""
    api = FakeApi()
    api.accounts = {
        "tok-dealer": {"user_id": "u1", "email": "dealer@one.example", "role": "dealer",
                       "dealer_id": "d1", "customer_id": None, "access": "control",
                       "device_ids": None},
        "tok-admin": {"user_id": "u0", "email": "admin@autogen.example", "role": "admin",
                      "dealer_id": None, "customer_id": None, "access": "control",
                      "device_ids": None},
        "tok-read": {"user_id": "u2", "email": "reader@one.example", "role": "dealer",
                     "dealer_id": "d1", "customer_id": None, "access": "read",
                     "device_ids": None},
    }  # fmt: skip
    api.devices = [
        device("GEN-001"),
        device("GEN-002", customer_email="bob@quarry.example", connection="offline"),
    ]
    return api


@pytest.fixture
async def console(fake_api: FakeApi) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the console app whose API is `fake_api`."""
    settings = ConsoleSettings(api_base_url="http://api.test/api/v1", secret_key="k" * 32)
    app = create_app(settings, transport=httpx.MockTransport(fake_api.handle))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as c:
            yield c


async def sign_in(client: httpx.AsyncClient, email: str) -> httpx.Response:
    """Sign in through the login form, as a browser would."""
    page = await client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    return await client.post(
        "/login",
        data={"csrf": token.group(1), "email": email, "password": PASSWORD, "next": "/fleet"},
    )


def csrf_of(html: str) -> str:
    """The CSRF token embedded in a rendered page."""
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


@pytest.fixture
def sign_in_as() -> Any:
    """`await sign_in_as(client, email)`: the login form, as a browser submits it."""
    return sign_in


@pytest.fixture
def csrf_from() -> Any:
    """`csrf_from(html)`: the page's CSRF token."""
    return csrf_of
