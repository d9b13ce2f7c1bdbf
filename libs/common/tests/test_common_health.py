"""`common.health`: liveness always answers, readiness reports every dependency."""

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

import httpx
import pytest
from fastapi import FastAPI

from common.health import Check, health_router
from common.http import PROBLEM_JSON, install_http_conventions

TIMEOUT_S = 0.05


async def ok() -> None:
    return None


async def also_ok() -> bool:
    await asyncio.sleep(0)
    return True


async def broken() -> None:
    raise ConnectionError("database refused the connection")


async def hangs() -> None:
    await asyncio.sleep(30)


def client_for(checks: Mapping[str, Check]) -> httpx.AsyncClient:
    app = FastAPI()
    install_http_conventions(app)
    app.include_router(health_router(checks, timeout_s=TIMEOUT_S))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc")


@pytest.fixture
async def healthy() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for({"database": ok, "kafka": also_ok}) as http:
        yield http


@pytest.fixture
async def unhealthy() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for({"redis": ok, "database": broken, "kafka": hangs}) as http:
        yield http


async def test_healthz_answers_ok(healthy: httpx.AsyncClient) -> None:
    response = await healthy.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_healthz_answers_even_when_dependencies_fail(unhealthy: httpx.AsyncClient) -> None:
    response = await unhealthy.get("/healthz")
    assert response.status_code == 200


async def test_readyz_ok_reports_each_check_with_its_time(healthy: httpx.AsyncClient) -> None:
    response = await healthy.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "kafka"}
    for result in body["checks"].values():
        assert result["ok"] is True
        assert isinstance(result["ms"], int | float)
        assert 0 <= result["ms"] < 1000


async def test_readyz_without_checks_is_ready() -> None:
    async with client_for({}) as http:
        response = await http.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {}}


async def test_readyz_503_names_failing_and_timed_out_checks(
    unhealthy: httpx.AsyncClient,
) -> None:
    started = time.perf_counter()
    response = await unhealthy.get("/readyz")
    elapsed = time.perf_counter() - started

    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["title"] == "Service not ready"
    assert body["status"] == 503
    assert "database" in body["detail"]
    assert "kafka" in body["detail"]
    assert "redis" not in body["detail"]

    checks = body["checks"]
    assert set(checks) == {"redis", "database", "kafka"}
    assert checks["redis"]["ok"] is True
    assert "ms" in checks["redis"]
    assert checks["database"]["ok"] is False
    assert checks["database"]["error"] == "ConnectionError: database refused the connection"
    assert checks["kafka"]["ok"] is False
    assert checks["kafka"]["error"].startswith("TimeoutError")
    # A hanging dependency costs the probe its timeout, not its hang (checks run concurrently).
    assert elapsed < 2.0


async def test_readyz_runs_the_checks_concurrently() -> None:
    # `waits` can only pass while `releases` runs: one after the other, it would time out.
    released = asyncio.Event()

    async def waits() -> None:
        await released.wait()

    async def releases() -> None:
        released.set()

    async with client_for({"waits": waits, "releases": releases}) as http:
        response = await http.get("/readyz")
    assert response.status_code == 200, response.text


async def test_readyz_cuts_a_long_error_message() -> None:
    async def verbose() -> None:
        raise RuntimeError("x" * 5000)

    async with client_for({"verbose": verbose}) as http:
        response = await http.get("/readyz")
    assert response.status_code == 503
    assert len(response.json()["checks"]["verbose"]["error"]) <= 300
