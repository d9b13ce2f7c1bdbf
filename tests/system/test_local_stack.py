"""The running platform, seen from outside: every service ready through the API gateway."""

import os

import httpx
import pytest

from common.testing.stack import StackAddresses

pytestmark = pytest.mark.stack

SERVICES = ["tokens", "fleet", "commands", "firmware", "gateway", "console"]


@pytest.fixture(scope="module")
def gateway_url(stack: StackAddresses) -> str:
    base = os.environ.get("AUTOGEN_API_BASE_URL", "http://127.0.0.1:8080/api/v1")
    return base.removesuffix("/api/v1")


@pytest.mark.parametrize("service", SERVICES)
async def test_every_service_is_ready_through_nginx(gateway_url: str, service: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as client:
        live = await client.get(f"/health/{service}/healthz")
        ready = await client.get(f"/health/{service}/readyz")
    assert live.status_code == 200, live.text
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ok"
    # nginx and the service agree on one request id per request.
    assert ready.headers.get("x-request-id")


async def test_the_gateway_answers_unknown_api_paths_with_a_problem(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as client:
        response = await client.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 404
