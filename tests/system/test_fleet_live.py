# mypy: disable-error-code="no-any-return"
"""The fleet service against real Kafka and PostgreSQL: device events to live state, and back.

The app runs with its lifespan (consumers and outbox relay). Device events are published the
way the gateway publishes them, to this session's prefixed topics; the test waits (with a
deadline) until search and detail show them.
"""

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel, SecretStr

from common.auth import Principal
from common.contracts import device, fleet, platform
from common.contracts.topic import Topic
from common.events import encode, new_event
from common.testing.auth import TestIssuer
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from fleet.app import create_app
from fleet.gateway_client import MqttCredentials
from fleet.settings import FleetSettings

pytestmark = pytest.mark.stack

ADMIN = Principal(user_id="admin", role="admin", email="admin@autogen.local")


class StaticGateway:
    """Credentials without a gateway (the gateway's own tests cover the real issuing)."""

    async def issue(self, device_id: str, *, internal_token: str) -> MqttCredentials:
        return MqttCredentials(device_id, device_id, device_id, uuid.uuid4().hex)

    async def revoke(self, device_id: str, *, internal_token: str) -> None:
        return None


class Fleet:
    """The running service, a client signed as admin, and a producer to the device topics."""

    def __init__(self, client: httpx.AsyncClient, producer: AIOKafkaProducer, prefix: str):
        self.client = client
        self.producer = producer
        self.prefix = prefix
        self.issuer = TestIssuer()

    async def publish(
        self, topic: Topic[Any], data: BaseModel, *, raw: bytes | None = None
    ) -> None:
        key = getattr(data, "device_id", "x")
        event = new_event(type=topic.event_type, data=data, source="gateway", key=key)
        await self.producer.send_and_wait(
            self.prefix + topic.name, raw if raw is not None else encode(event), key=key.encode()
        )

    async def get(self, path: str, **params: Any) -> Any:
        response = await self.client.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


@pytest.fixture
async def running_fleet(
    stack: StackAddresses, fresh_database: Migrate, kafka_topics: KafkaTopics, topic_prefix: str
) -> AsyncIterator[Fleet]:
    await kafka_topics.create(
        device.PRESENCE.name, device.TELEMETRY.name, device.REPORT.name, fleet.DEVICE.name,
        platform.DEADLETTER.name,
    )  # fmt: skip
    settings = FleetSettings(
        database_url=SecretStr(await fresh_database("fleet")),
        kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
        redis_url=SecretStr(stack.redis_url),
        kafka_topic_prefix=topic_prefix,
        outbox_poll_interval_s=0.05,
        telemetry_batch_timeout_ms=50,
    )
    issuer = TestIssuer()
    app = create_app(settings, verifier=issuer.verifier(), issuer=StaticGateway())
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://fleet", headers=issuer.headers(ADMIN)
            ) as client:
                yield Fleet(client, producer, topic_prefix)
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, want: Callable[[dict[str, Any]], bool]) -> Any:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        async with asyncio.timeout(20):
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        value = json.loads(record.value)
                        if want(value):
                            return value
    finally:
        await consumer.stop()


async def test_devices_go_live_report_firmware_move_and_go_offline(
    running_fleet: Fleet, stack: StackAddresses, topic_prefix: str
) -> None:
    fleet_ = running_fleet
    device_id = f"SYS-{uuid.uuid4().hex[:8].upper()}"
    response = await fleet_.client.post(
        "/api/v1/devices",
        json={"id": device_id, "name": "Field unit", "model": "Ultra", "engine": None,
              "transport": "gsm", "gps": True, "dealer_id": "dealer-sys",
              "customer_email": "ops@sys.test", "firmware_version": "1.0.0"},
    )  # fmt: skip
    assert response.status_code == 201, response.text

    # The ownership snapshot reaches fleet.device.v1 through the outbox relay.
    snapshot = await read_topic(
        stack.kafka_bootstrap_servers,
        topic_prefix + fleet.DEVICE.name,
        lambda v: v["data"]["device_id"] == device_id,
    )
    assert snapshot["data"]["dealer_id"] == "dealer-sys"
    assert snapshot["key"] == device_id

    async def detail() -> dict[str, Any]:
        return await fleet_.get(f"/api/v1/devices/{device_id}")

    async def listed(connection: str) -> bool:
        body = await fleet_.get("/api/v1/devices", q=device_id.lower(), connection=connection)
        return [item["id"] for item in body["items"]] == [device_id]

    now = datetime.now(UTC)
    await fleet_.publish(
        device.PRESENCE,
        device.DevicePresence(device_id=device_id, received_at=now, state="online", fw="2.4.1"),
    )
    await eventually(lambda: listed("live"))
    state = await detail()
    assert state["firmware_version"] == "2.4.1"
    assert state["last_seen_at"] is not None

    # A garbage record on the telemetry topic is dead-lettered; the next reading still lands.
    garbage = b'{"event_id": "nope"'
    await fleet_.publish(device.TELEMETRY, device.DevicePresence(
        device_id=device_id, received_at=now, state="online"), raw=garbage)  # fmt: skip
    await fleet_.publish(
        device.TELEMETRY,
        device.DeviceTelemetry(device_id=device_id, received_at=datetime.now(UTC),
                               ts=datetime.now(UTC), run_state="running", battery_v=12.9,
                               fuel_pct=70, lat=48.137, lon=11.575),
    )  # fmt: skip

    async def positioned() -> bool:
        return (await detail())["position"] is not None

    await eventually(positioned)
    state = await detail()
    assert state["run_state"] == "running"
    assert state["position"]["lat"] == pytest.approx(48.137)
    on_map = await fleet_.get("/api/v1/map/devices", bbox="11,48,12,49")
    assert device_id in {f["properties"]["id"] for f in on_map["features"]}

    letter = await read_topic(
        stack.kafka_bootstrap_servers,
        topic_prefix + platform.DEADLETTER.name,
        lambda v: base64.b64decode(v["data"]["value_b64"]) == garbage,
    )
    assert letter["data"]["consumer"].endswith("fleet-telemetry")
    assert "invalid record" in letter["data"]["reason"]

    # After an OTA the device comes back with a new firmware version.
    await fleet_.publish(
        device.PRESENCE,
        device.DevicePresence(device_id=device_id, received_at=datetime.now(UTC),
                              state="offline", will=True),
    )  # fmt: skip
    await eventually(lambda: listed("offline"))
    await fleet_.publish(
        device.PRESENCE,
        device.DevicePresence(device_id=device_id, received_at=datetime.now(UTC),
                              state="online", fw="2.5.0"),
    )  # fmt: skip

    async def upgraded() -> bool:
        state = await detail()
        return state["connection"] == "live" and state["firmware_version"] == "2.5.0"

    await eventually(upgraded)
    body = await fleet_.get("/api/v1/devices", firmware="2.5.0", q=device_id)
    assert [item["id"] for item in body["items"]] == [device_id]

    # A token signed by a key the service does not trust gets nothing.
    stranger = fleet_.issuer
    response = await fleet_.client.get(
        f"/api/v1/devices/{device_id}", headers=stranger.headers(ADMIN)
    )
    assert response.status_code == 401
