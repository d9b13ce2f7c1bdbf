"""The fleet with the real gateway (subprocess) and the device simulator (subprocess) on the real
Kafka, Mosquitto and PostgreSQL (this session's topic prefix, groups and databases).

Simulated devices going live and offline show up in search and detail within seconds; the
firmware a device reports replaces the registered one; each scope (admin, dealer A, dealer B,
A's customer, a device-restricted token) sees exactly its devices. Every wait has a deadline.
"""

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from common.auth import Principal
from common.contracts import ALL_TOPICS
from common.testing.auth import TestIssuer
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from fleet.app import create_app
from fleet.gateway_client import MqttCredentials
from fleet.settings import FleetSettings
from gateway.testing import Broker, admin_session, bridge_account, running_gateway

pytestmark = pytest.mark.stack

ADMIN = Principal(user_id="admin", role="admin", email="admin@autogen.local")


class BrokerAccounts:
    """Devices get their broker accounts from the test (the gateway's tests cover issuing)."""

    async def issue(self, device_id: str, *, internal_token: str) -> MqttCredentials:
        return MqttCredentials(device_id, device_id, device_id, uuid.uuid4().hex)

    async def revoke(self, device_id: str, *, internal_token: str) -> None:
        return None


async def eventually(check: Callable[[], Awaitable[bool]], *, deadline_s: float = 30) -> None:
    """Wait until `check()` holds; fail at the deadline."""
    async with asyncio.timeout(deadline_s):
        while not await check():
            await asyncio.sleep(0.2)


def simulator(path: Path) -> "subprocess.Popen[bytes]":
    """The device simulator as its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.simulator", "--devices", str(path),
         "--time-factor", "0.05", "--telemetry-interval", "0.5", "--log-level", "WARNING"],
    )  # fmt: skip


@pytest.fixture(scope="module")
async def world(
    stack: StackAddresses, kafka_topics: KafkaTopics, fresh_database: Migrate, tmp_path_factory: Any
) -> AsyncIterator[dict[str, Any]]:
    # Every contract topic: the gateway produces and consumes more than the fleet's.
    await kafka_topics.create(*{t.name for t in ALL_TOPICS})
    tag = uuid.uuid4().hex[:6].upper()
    ids = {"a1": f"S{tag}A1", "a2": f"S{tag}A2", "b1": f"S{tag}B1"}
    dealers = {"a1": "dealer-a", "a2": "dealer-a", "b1": "dealer-b"}
    customer = f"owner{tag.lower()}@farm.test"
    issuer = TestIssuer()
    settings = FleetSettings(
        database_url=SecretStr(await fresh_database("fleet")),
        kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
        redis_url=SecretStr(stack.redis_url),
        kafka_topic_prefix=kafka_topics.prefix,
        telemetry_batch_timeout_ms=50,
    )
    app = create_app(settings, verifier=issuer.verifier(), issuer=BrokerAccounts())
    broker = Broker.from_env()
    path: Path = tmp_path_factory.mktemp("fleet-sim") / "devices.json"
    passwords = {key: uuid.uuid4().hex for key in ids}
    async with (
        admin_session(broker) as admin,
        bridge_account(admin) as account,
        running_gateway(
            database_url=await fresh_database("gateway"),
            kafka_bootstrap=stack.kafka_bootstrap_servers,
            topic_prefix=kafka_topics.prefix,
            account=account,
        ),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f") as client,
    ):
        try:
            rows = []
            for key, device_id in ids.items():
                await admin.ensure_device(device_id, passwords[key])
                registered = await client.post(
                    "/api/v1/devices",
                    headers=issuer.headers(ADMIN),
                    json={"id": device_id, "name": f"Pump {device_id}", "model": "D100",
                          "engine": "diesel", "transport": "wifi", "gps": False,
                          "dealer_id": dealers[key], "firmware_version": "0.9.0",
                          "customer_email": customer if key == "a1" else None},
                )  # fmt: skip
                assert registered.status_code == 201, registered.text
                rows.append(
                    {"id": device_id, "name": device_id, "model": "D100", "engine": "diesel",
                     "transport": "wifi", "gps": False, "password": passwords[key],
                     "firmware_version": "1.0.7"}
                )  # fmt: skip
            body = {"mqtt": {"host": broker.host, "port": broker.port}, "devices": rows}
            await asyncio.to_thread(path.write_text, json.dumps(body))
            yield {"client": client, "issuer": issuer, "ids": ids, "customer": customer,
                   "tag": tag, "path": path}  # fmt: skip
        finally:
            for device_id in ids.values():
                await admin.remove_device(device_id)


async def detail(world: dict[str, Any], device_id: str) -> dict[str, Any]:
    response = await world["client"].get(
        f"/api/v1/devices/{device_id}", headers=world["issuer"].headers(ADMIN)
    )
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def search(world: dict[str, Any], principal: Principal, **params: str) -> dict[str, str]:
    """{id: connection} of this test's devices that `principal` finds."""
    response = await world["client"].get(
        "/api/v1/devices",
        params={"q": world["tag"], **params},
        headers=world["issuer"].headers(principal),
    )
    assert response.status_code == 200, response.text
    return {d["id"]: d["connection"] for d in response.json()["items"]}


async def test_devices_go_live_and_offline_report_firmware_and_scopes_hold(
    world: dict[str, Any],
) -> None:
    ids = world["ids"]
    everyone = set(ids.values())
    assert set((await search(world, ADMIN)).values()) == {"offline"}
    process = simulator(world["path"])
    try:
        # Live within seconds, in search (filtered by connection) and in detail.
        async def all_live() -> bool:
            return set(await search(world, ADMIN, connection="live")) == everyone

        await eventually(all_live)
        state = await detail(world, ids["a1"])
        assert state["connection"] == "live"
        assert state["last_seen_at"] is not None
        # The firmware the device reports replaces the registered 0.9.0.
        assert state["firmware_version"] == "1.0.7"
        assert set(await search(world, ADMIN, firmware="1.0.7")) == everyone

        # Each scope sees exactly its devices, in search and in detail.
        dealer_a = Principal(user_id="sa", role="dealer", dealer_id="dealer-a")
        dealer_b = Principal(user_id="sb", role="dealer", dealer_id="dealer-b")
        customer = Principal(
            user_id="c", role="customer", dealer_id="dealer-a", email=world["customer"].upper()
        )
        restricted = dealer_a.model_copy(
            update={"device_ids": frozenset({ids["a2"]}), "token_id": "t-1"}
        )
        expected = {
            "admin": (ADMIN, everyone),
            "dealer A": (dealer_a, {ids["a1"], ids["a2"]}),
            "dealer B": (dealer_b, {ids["b1"]}),
            "A's customer": (customer, {ids["a1"]}),
            "device-restricted token": (restricted, {ids["a2"]}),
        }
        for who, (principal, visible) in expected.items():
            assert set(await search(world, principal)) == visible, who
            for device_id in everyone:
                response = await world["client"].get(
                    f"/api/v1/devices/{device_id}", headers=world["issuer"].headers(principal)
                )
                assert response.status_code == (200 if device_id in visible else 404), who
    finally:
        process.send_signal(signal.SIGKILL)  # the broker publishes each device's Last Will
        await asyncio.to_thread(process.wait, 10)

    async def all_offline() -> bool:
        return set(await search(world, ADMIN, connection="offline")) == everyone

    await eventually(all_offline)
    state = await detail(world, ids["b1"])
    assert state["connection"] == "offline"
    assert state["last_seen_at"] is not None
