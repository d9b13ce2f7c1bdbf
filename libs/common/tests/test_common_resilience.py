"""Backoff for reconnects and the 503-or-500 verdict on errors (no servers needed)."""

import random

from aiokafka.errors import KafkaConnectionError, UnsupportedVersionError
from sqlalchemy.exc import DBAPIError

from common.http import is_unavailable
from common.kafka import Backoff


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0, _rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    # Each step is within [ceiling/2, ceiling] of its doubling ceiling, never above the cap.
    for attempt, delay in enumerate(delays):
        ceiling = min(4.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 4.0
    assert len({round(d, 6) for d in delays[3:]}) > 1  # jitter: capped steps still differ
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_dependency_errors_are_unavailable_and_bugs_are_not() -> None:
    invalidated = DBAPIError(
        "SELECT 1", {}, Exception("connection lost"), connection_invalidated=True
    )
    assert is_unavailable(invalidated)
    assert is_unavailable(KafkaConnectionError("no broker"))
    assert is_unavailable(ConnectionRefusedError())
    assert not is_unavailable(
        DBAPIError("SELECT 1", {}, Exception("syntax"), connection_invalidated=False)
    )
    assert not is_unavailable(UnsupportedVersionError())
    assert not is_unavailable(KeyError("bug"))


def test_a_value_postgres_refuses_is_a_422_not_a_500() -> None:
    """A NUL character in text (SQLSTATE 22021) is the client's input, not a server bug."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from common.http import install_http_conventions

    class RefusedByPostgresError(Exception):
        sqlstate = "22021"

    app = FastAPI()
    install_http_conventions(app)

    @app.post("/things")
    async def create() -> None:
        await asyncio.sleep(0)
        raise DBAPIError("INSERT", {}, RefusedByPostgresError("invalid byte sequence: 0x00"))

    @app.post("/broken")
    async def broken() -> None:
        raise DBAPIError("INSERT", {}, Exception("no sqlstate"))

    with TestClient(app, raise_server_exceptions=False) as client:
        refused = client.post("/things")
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        assert client.post("/broken").status_code == 500


def test_postgres_shutting_down_is_unavailable() -> None:
    """asyncpg raises this raw while PostgreSQL restarts: a 503, and a consumer retries."""
    from asyncpg.exceptions import CannotConnectNowError

    assert is_unavailable(CannotConnectNowError("the database system is shutting down"))
