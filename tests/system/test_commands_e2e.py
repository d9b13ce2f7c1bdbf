"""Commands end to end: the commands service, the real gateway and the device simulator on the real
Kafka, Mosquitto and PostgreSQL.

Start → `succeeded` once telemetry shows running; a command to an offline device (a persistent
MQTT session) is delivered when it reconnects; a command whose TTL passes before delivery ends
`expired` and never reaches the device.
"""

import asyncio
import json
import uuid
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import httpx
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from commands import store
from commands.app import create_app
from commands.testing import TOPICS, Api, Bus, eventually, settings_for
from common.contracts import device
from common.testing.auth import TestIssuer
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from gateway.dynsec import DynsecAdmin
from gateway.simulator.__main__ import parse_args, run
from gateway.testing import Broker, KafkaTail, admin_session, bridge_account, running_gateway

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def world(
    stack: StackAddresses, kafka_topics: KafkaTopics, fresh_database: Migrate, tmp_path_factory: Any
) -> AsyncIterator[dict[str, Any]]:
    await kafka_topics.create(*(t.name for t in TOPICS), device.DEADLETTER.name)
    gateway_db = await fresh_database("gateway")
    commands_db = await fresh_database("commands")
    tag = uuid.uuid4().hex[:6]
    sim_id, offline_id = f"E{tag}-sim", f"E{tag}-off"
    rows: list[dict[str, Any]] = [
        {"id": sim_id, "model": "D100", "engine": "diesel", "transport": "wifi", "gps": False}
    ]
    path: Path = tmp_path_factory.mktemp("sim") / "devices.json"
    broker = Broker.from_env()
    issuer = TestIssuer()
    prefix = kafka_topics.prefix
    app = create_app(settings_for(stack, commands_db, prefix), verifier=issuer.verifier())
    bus = Bus(stack.kafka_bootstrap_servers, prefix)
    reports = [prefix + device.REPORT.name, prefix + device.TELEMETRY.name]
    async with (
        admin_session(broker) as admin,
        bridge_account(admin) as account,
        running_gateway(
            database_url=gateway_db,
            kafka_bootstrap=stack.kafka_bootstrap_servers,
            topic_prefix=prefix,
            account=account,
        ),
        app.router.lifespan_context(app),
        KafkaTail(stack.kafka_bootstrap_servers, reports) as tail,
    ):
        await bus.start()
        passwords = {offline_id: uuid.uuid4().hex}
        for row in rows:
            row.update(name=row["id"], firmware_version="1.0.0", password=uuid.uuid4().hex)
            passwords[row["id"]] = row["password"]
        for device_id, password in passwords.items():
            await admin.ensure_device(device_id, password)
            await bus.device_registered(device_id, model="D100", engine="diesel", transport="wifi")
        body = json.dumps({"mqtt": {"host": broker.host, "port": broker.port}, "devices": rows})
        await asyncio.to_thread(path.write_text, body)
        args = parse_args(
            [
                "--devices", str(path),
                "--time-factor", "0.05",
                "--telemetry-interval", "0.5",
                "--log-level", "WARNING",
            ]
        )  # fmt: skip
        simulator = asyncio.create_task(run(args))
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://commands") as client:
                api = Api(client, issuer, bus)
                await api.known(sim_id)
                await api.known(offline_id)
                yield {
                    "api": api,
                    "admin": admin,
                    "broker": broker,
                    "sim": sim_id,
                    "offline": offline_id,
                    "passwords": passwords,
                    "tail": tail,
                    "prefix": prefix,
                    "commands_db": commands_db,
                }
        finally:
            simulator.cancel()
            await asyncio.gather(simulator, return_exceptions=True)
            await bus.stop()
            for device_id in passwords:
                await admin.remove_device(device_id)


def device_client(broker: Broker, device_id: str, password: str) -> aiomqtt.Client:
    """A hand-driven device with a persistent session, as real units keep."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=device_id,
        password=password,
        identifier=device_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=props,
    )


async def test_start_succeeds_and_telemetry_shows_running(world: dict[str, Any]) -> None:
    api: Api = world["api"]
    device_id = world["sim"]
    await _simulator_online(world)
    response = await api.send(device_id, {"action": "start"})
    assert response.status_code == 202, response.text
    cmd = response.json()
    done = await api.wait_status(cmd["id"], "succeeded", deadline_s=30)
    steps = [h["status"] for h in done["history"]]
    # The gateway's `sent` may arrive after the device's ack (which proves delivery anyway).
    assert steps in (["queued", "sent", "acked", "succeeded"], ["queued", "acked", "succeeded"])
    assert done["detail"] == "telemetry shows running"
    tail: KafkaTail = world["tail"]
    topic = world["prefix"] + device.TELEMETRY.name
    running = tail.matching(
        topic,
        lambda e: e["data"]["device_id"] == device_id and e["data"]["run_state"] == "running",
    )
    assert running, "no telemetry shows the device running"

    stop = (await api.send(device_id, {"action": "stop"})).json()
    await api.wait_status(stop["id"], "succeeded", deadline_s=30)


async def test_offline_device_gets_its_command_when_it_reconnects(world: dict[str, Any]) -> None:
    api: Api = world["api"]
    broker: Broker = world["broker"]
    device_id = world["offline"]
    password = world["passwords"][device_id]
    # The device has a session at the broker, then drops off.
    async with device_client(broker, device_id, password) as client:
        await client.subscribe(f"devices/{device_id}/down/command", qos=1)

    cmd = (await api.send(device_id, {"action": "set_setting", "params": {
        "key": "cooldown_s", "value": 120}})).json()  # fmt: skip
    await api.wait_status(cmd["id"], "sent")

    async with device_client(broker, device_id, password) as client:
        async with asyncio.timeout(20):
            async for message in client.messages:
                body = json.loads(message.payload)
                if body["command_id"] == cmd["id"]:
                    break
        assert body["params"] == {"key": "cooldown_s", "value": 120}
        for status in ("accepted", "succeeded"):
            ack = {"command_id": cmd["id"], "status": status, "detail": None}
            await client.publish(f"devices/{device_id}/up/ack", json.dumps(ack), qos=1)
        await api.wait_status(cmd["id"], "succeeded")


async def test_ttl_passing_before_delivery_ends_expired_and_never_reaches_the_device(
    world: dict[str, Any],
) -> None:
    api: Api = world["api"]
    device_id = world["sim"]
    await _simulator_online(world)
    # Hold the commands outbox (a backlog, a slow relay): the dispatch leaves after the TTL.
    lock_key = zlib.crc32(f"outbox-relay:{store.outbox.fullname}".encode())
    holder = await asyncpg.connect(world["commands_db"].replace("postgresql+asyncpg", "postgresql"))
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", lock_key)
        cmd = (await api.send(device_id, {"action": "start", "ttl_s": 1})).json()
        expired = await api.wait_status(cmd["id"], "expired")
        assert "before it was sent" in expired["detail"]
        await holder.execute("SELECT pg_advisory_unlock($1)", lock_key)
        # The gateway gets the dispatch late, refuses to send it and says so.
        await eventually(lambda: _gateway_said(api.bus, cmd["id"], "expired"))
    finally:
        await holder.close()
    # A later command goes through; the expired one never produced a device report.
    later = (await api.send(device_id, {"action": "stop"})).json()
    await api.wait_status(later["id"], "succeeded", deadline_s=30)
    tail: KafkaTail = world["tail"]
    topic = world["prefix"] + device.REPORT.name
    assert not tail.matching(topic, lambda e: e["data"]["command_id"] == cmd["id"])
    assert (await api.get(cmd["id"]))["status"] == "expired"


async def _simulator_online(world: dict[str, Any]) -> None:
    tail: KafkaTail = world["tail"]
    topic = world["prefix"] + device.TELEMETRY.name
    since = datetime.now(UTC).isoformat()

    async def reporting() -> bool:
        return bool(
            tail.matching(
                topic,
                lambda e: (
                    e["data"]["device_id"] == world["sim"] and e["data"]["received_at"] >= since
                ),
            )
        )

    await eventually(reporting, deadline_s=30)


async def _gateway_said(bus: Bus, command_id: str, status: str) -> bool:
    return any(
        s["command_id"] == command_id and s["reporter"] == "gateway" and s["status"] == status
        for s in bus.statuses
    )


_ = DynsecAdmin  # the admin session's type, for readers of the fixture
