"""Through the real API gateway (nginx on 127.0.0.1:8080), tokens (8101) and Redis.

A revoked API token stops working within one second, even though its verification was cached
(in Redis and in the tokens process); the gateway strips a forged internal token; login and the
JWKS are reachable without credentials. Starts the tokens service with
`deploy/local/services start tokens` when it is not running (and never stops it).
"""

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.testing.stack import load_stack_env

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
GATEWAY = "http://127.0.0.1:8080"
TOKENS = "http://127.0.0.1:8101"


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def api() -> Iterator[httpx.Client]:
    load_stack_env(REPO)
    if not _ready(f"{GATEWAY}/healthz"):
        pytest.fail("the API gateway is not running: deploy/local/stack start")
    if not _ready(f"{TOKENS}/readyz"):
        subprocess.run([str(REPO / "deploy/local/services"), "start", "tokens"], check=True)
    with httpx.Client(base_url=f"{GATEWAY}/api/v1", timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def admin_session(api: httpx.Client) -> str:
    credentials = {
        "email": os.environ.get("AUTOGEN_ADMIN_EMAIL", "admin@autogen.local"),
        "password": os.environ.get("AUTOGEN_ADMIN_PASSWORD", "admin-dev-password"),
    }
    response = api.post("/auth/login", json=credentials)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_revoked_token_fails_within_one_second_through_the_gateway(
    api: httpx.Client, admin_session: str
) -> None:
    me = api.get("/me", headers=bearer(admin_session)).json()
    created = api.post(
        "/tokens",
        headers=bearer(admin_session),
        json={
            "name": "revocation test",
            "user_id": me["user_id"],
            "access": "read",
            "expires_in_days": 1,
        },
    )
    assert created.status_code == 201, created.text
    token = created.json()
    # Used several times: its verification is now cached in Redis and in the tokens process.
    for _ in range(5):
        used = api.get("/me", headers=bearer(token["token"]))
        assert used.status_code == 200, used.text
        assert used.json()["token_id"] == token["id"]
        assert used.json()["access"] == "read"

    revoked = api.delete(f"/tokens/{token['id']}", headers=bearer(admin_session))
    assert revoked.status_code == 204
    revoked_at = time.monotonic()

    # Every request made one second after the revocation (and later) is refused.
    time.sleep(max(0.0, revoked_at + 1.0 - time.monotonic()))
    deadline = time.monotonic() + 3.0
    statuses = []
    while time.monotonic() < deadline:
        response = api.get("/me", headers=bearer(token["token"]))
        statuses.append(response.status_code)
        time.sleep(0.1)
    assert set(statuses) == {401}, statuses
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "revoked" in response.json()["detail"]


def test_gateway_drops_a_forged_internal_token(api: httpx.Client, admin_session: str) -> None:
    signed = httpx.get(f"{TOKENS}/auth/verify", headers=bearer(admin_session))
    forged = {"X-Internal-Token": signed.headers["x-internal-token"]}
    # Without a bearer the gateway refuses, whatever internal token the client sends.
    response = api.get("/me", headers=forged)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")


def test_login_and_jwks_are_open_everything_else_needs_a_bearer(api: httpx.Client) -> None:
    assert api.get("/.well-known/jwks.json").json()["keys"]
    wrong = api.post("/auth/login", json={"email": "nobody@example.com", "password": "x"})
    assert wrong.status_code == 401
    for path in ("/me", "/users", "/tokens", "/dealers"):
        response = api.get(path)
        assert response.status_code == 401, path
        assert response.headers.get("www-authenticate") == "Bearer"
    malformed = api.get("/me", headers={"Authorization": "Bearer agk_nope"})
    assert malformed.status_code == 401
    assert malformed.json()["detail"] == "malformed API token"
