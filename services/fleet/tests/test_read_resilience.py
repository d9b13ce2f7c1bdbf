# mypy: allow-untyped-defs
"""Reads without a pre-ping: a pooled connection PostgreSQL dropped costs a retry, not an error."""

from typing import Any

import asyncpg
import pytest

from common.testing.stack import StackAddresses

pytestmark = pytest.mark.stack


async def drop_read_connections(stack: StackAddresses, database_url: str) -> int:
    """Terminate the read engine's server connections (as a PostgreSQL restart would)."""
    database = database_url.rsplit("/", 1)[1].split("?", maxsplit=1)[0]
    admin = await asyncpg.connect(stack.pg_admin_url)
    try:
        dropped = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name = 'fleet-reads'",
            database,
        )
    finally:
        await admin.close()
    return len(dropped)


async def search(api: Any, principal: Any, q: str) -> set[str]:
    response = await api.client.get("/api/v1/devices", params={"q": q}, headers=api.as_(principal))
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()["items"]}


async def test_reads_survive_their_pooled_connections_being_dropped(api, h, stack, fleet_db):
    tag = h.unique("RETRY")
    device_id = f"{tag}-1"
    response = await api.client.post(
        "/api/v1/devices",
        json=h.registration(device_id, f"dealer-{tag}"),
        headers=api.as_(h.admin()),
    )
    assert response.status_code == 201, response.text
    assert await search(api, h.admin(), tag) == {device_id}  # a read connection is pooled now

    assert await drop_read_connections(stack, fleet_db) >= 1
    assert await search(api, h.admin(), tag) == {device_id}

    assert await drop_read_connections(stack, fleet_db) >= 1
    detail = await api.client.get(f"/api/v1/devices/{device_id}", headers=api.as_(h.admin()))
    assert detail.status_code == 200, detail.text
    assert detail.json()["id"] == device_id
