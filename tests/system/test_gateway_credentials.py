"""The internal credentials API against the real broker: issue, rotate, revoke (disconnects)."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aiomqtt
import httpx
import pytest

from common.auth import Principal
from common.testing.auth import TestIssuer
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from gateway.testing import Broker, admin_session, bridge_account, device_client, running_gateway

pytestmark = pytest.mark.stack

ISSUER = TestIssuer()
DEALER = Principal(user_id="u-dealer", role="dealer", dealer_id="d-1", access="control")
ADMIN = Principal(user_id="u-admin", role="admin")


@pytest.fixture(scope="module")
async def api(
    stack: StackAddresses, kafka_topics: KafkaTopics, fresh_database: Migrate
) -> AsyncIterator[httpx.AsyncClient]:
    await kafka_topics.create("command.dispatch.v1", "platform.deadletter.v1")
    url = await fresh_database("gateway")
    async with (
        admin_session(Broker.from_env()) as admin,
        bridge_account(admin) as account,
        running_gateway(
            database_url=url,
            kafka_bootstrap=stack.kafka_bootstrap_servers,
            topic_prefix=kafka_topics.prefix,
            account=account,
            verifier=ISSUER.verifier(),
        ) as app,
    ):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


def path(device_id: str) -> str:
    return f"/internal/v1/devices/{device_id}/credentials"


async def can_connect(device_id: str, password: str) -> bool:
    try:
        async with device_client(device_id, password):
            return True
    except aiomqtt.MqttError:
        return False


async def test_issue_rotate_revoke(api: httpx.AsyncClient) -> None:
    device_id = f"K{uuid.uuid4().hex[:10]}"
    headers = ISSUER.headers(DEALER)
    before = await api.get(path(device_id), headers=headers)
    assert before.json() == {"device_id": device_id, "exists": False, "rotated_at": None}

    first = await api.put(path(device_id), headers=headers)
    assert first.status_code == 201
    body = first.json()
    assert body["device_id"] == body["username"] == body["client_id"] == device_id
    assert len(body["password"]) >= 24
    assert await can_connect(device_id, body["password"])

    second = await api.put(path(device_id), headers=ISSUER.headers(ADMIN))
    assert second.status_code == 201
    new_password = second.json()["password"]
    assert new_password != body["password"]
    assert not await can_connect(device_id, body["password"])
    assert await can_connect(device_id, new_password)
    state = (await api.get(path(device_id), headers=headers)).json()
    assert state["exists"] is True
    assert state["rotated_at"]

    # A connected device is kicked when its credentials are revoked, and cannot come back.
    client = device_client(device_id, new_password)
    await client.__aenter__()
    try:
        assert (await api.delete(path(device_id), headers=headers)).status_code == 204
        async with asyncio.timeout(10):
            while not client._disconnected.done():
                await asyncio.sleep(0.05)
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)
    assert not await can_connect(device_id, new_password)
    state = (await api.get(path(device_id), headers=headers)).json()
    assert state["exists"] is False


@pytest.mark.parametrize(
    ("principal", "status"),
    [
        (Principal(user_id="u", role="dealer", dealer_id="d-1", access="read"), 403),
        (Principal(user_id="u", role="customer", dealer_id="d-1", email="c@x.test"), 403),
        (None, 401),
    ],
)
async def test_only_admins_and_controlling_dealers(
    api: httpx.AsyncClient, principal: Principal | None, status: int
) -> None:
    headers = ISSUER.headers(principal) if principal else {}
    device_id = f"K{uuid.uuid4().hex[:10]}"
    for method in ("PUT", "DELETE", "GET"):
        response = await api.request(method, path(device_id), headers=headers)
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"


async def test_invalid_device_id_is_422(api: httpx.AsyncClient) -> None:
    response = await api.put(path("bad%2Fid"), headers=ISSUER.headers(ADMIN))
    assert response.status_code in (404, 422)
    response = await api.put(path("x" * 80), headers=ISSUER.headers(ADMIN))
    assert response.status_code == 422
