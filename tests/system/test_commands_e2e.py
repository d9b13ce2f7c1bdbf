"""Commands end to end: the commands service, the real gateway, the device simulator and the fleet
service on the real Kafka, Mosquitto and PostgreSQL (this session's topic prefix, consumer groups
and databases, so a long-lived stack's traffic and lag play no part).

Start → `succeeded` once telemetry shows running, and the fleet shows the device running; a
command to an offline device (a persistent MQTT session) is delivered when it reconnects; a
command whose TTL passes before delivery ends `expired` and never reaches the device; the same
Idempotency-Key returns the same command, which the device runs once; a read token gets 403 and
nothing reaches the device; a SIGKILL of the real commands process between accept and dispatch
loses nothing and sends nothing twice.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
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
from pydantic import SecretStr

from commands import store
from commands.app import create_app
from commands.testing import ADMIN, READER_1, TOPICS, Api, Bus, eventually, settings_for
from common.contracts import device
from common.testing.auth import TestIssuer
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses, free_port
from fleet.app import create_app as create_fleet_app
from fleet.gateway_client import MqttCredentials
from fleet.settings import FleetSettings
from gateway.dynsec import DynsecAdmin
from gateway.simulator.__main__ import parse_args, run
from gateway.testing import Broker, KafkaTail, admin_session, bridge_account, running_gateway
from gateway.testing import device_client as as_device

pytestmark = pytest.mark.stack


class UnusedCredentials:
    """The fleet's credentials client; the devices here get their broker accounts directly."""

    async def issue(self, device_id: str, *, internal_token: str) -> MqttCredentials:
        return MqttCredentials(device_id, device_id, device_id, uuid.uuid4().hex)

    async def revoke(self, device_id: str, *, internal_token: str) -> None:
        return None


@pytest.fixture(scope="module")
async def world(
    stack: StackAddresses, kafka_topics: KafkaTopics, fresh_database: Migrate, tmp_path_factory: Any
) -> AsyncIterator[dict[str, Any]]:
    await kafka_topics.create(*(t.name for t in TOPICS), device.DEADLETTER.name)
    gateway_db = await fresh_database("gateway")
    commands_db = await fresh_database("commands")
    fleet_db = await fresh_database("fleet")
    tag = uuid.uuid4().hex[:6]
    sim_id, offline_id = f"E{tag}-sim", f"E{tag}-off"
    rows: list[dict[str, Any]] = [
        {"id": sim_id, "model": "D100", "engine": "diesel", "transport": "wifi", "gps": False}
    ]
    path: Path = tmp_path_factory.mktemp("sim") / "devices.json"
    broker = Broker.from_env()
    issuer = TestIssuer()
    prefix = kafka_topics.prefix
    # Dispatches left to the relay (not sent at their commit): two tests hold the relay's lock
    # to make a dispatch late, or to kill a process between accept and dispatch. The eager
    # send is what the fault suite's real processes, `bench/commands_roundtrip.py` and
    # services/commands/tests/test_sigkill_stack.py run.
    app = create_app(
        settings_for(stack, commands_db, prefix, outbox_eager=False), verifier=issuer.verifier()
    )
    fleet_settings = FleetSettings(
        database_url=SecretStr(fleet_db),
        kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
        redis_url=SecretStr(stack.redis_url),
        kafka_topic_prefix=prefix,
        outbox_poll_interval_s=0.05,
        telemetry_batch_timeout_ms=50,
    )
    fleet_app = create_fleet_app(
        fleet_settings, verifier=issuer.verifier(), issuer=UnusedCredentials()
    )
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
        fleet_app.router.lifespan_context(fleet_app),
        KafkaTail(stack.kafka_bootstrap_servers, reports) as tail,
    ):
        await bus.start()
        passwords = {offline_id: uuid.uuid4().hex}
        for row in rows:
            row.update(name=row["id"], firmware_version="1.0.0", password=uuid.uuid4().hex)
            passwords[row["id"]] = row["password"]
        fleet_client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=fleet_app),
            base_url="http://fleet",
            headers=issuer.headers(ADMIN),
        )
        for device_id, password in passwords.items():
            await admin.ensure_device(device_id, password)
        # The simulated device is registered the real way: in the fleet service, whose
        # `fleet.device.v1` the commands service follows. The hand-driven one by a bare event.
        created = await fleet_client.post(
            "/api/v1/devices",
            json={"id": sim_id, "name": sim_id, "model": "D100", "engine": "diesel",
                  "transport": "wifi", "gps": False, "dealer_id": "dealer-1",
                  "customer_email": None, "firmware_version": "1.0.0"},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        await bus.device_registered(offline_id, model="D100", engine="diesel", transport="wifi")
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
                    "sim": sim_id,
                    "offline": offline_id,
                    "passwords": passwords,
                    "tail": tail,
                    "prefix": prefix,
                    "commands_db": commands_db,
                    "fleet": fleet_client,
                    "issuer": issuer,
                    "stack": stack,
                }
        finally:
            await fleet_client.aclose()
            simulator.cancel()
            await asyncio.gather(simulator, return_exceptions=True)
            await bus.stop()
            for device_id in passwords:
                await admin.remove_device(device_id)


def device_client(device_id: str, password: str) -> aiomqtt.Client:
    """A hand-driven device with a persistent session, as real units keep."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    return as_device(device_id, password, clean_start=False, properties=props)


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

    # The fleet service, which follows the same telemetry, shows the device running.
    fleet: httpx.AsyncClient = world["fleet"]

    async def fleet_shows(run_state: str) -> bool:
        r = await fleet.get(f"/api/v1/devices/{device_id}")
        return r.status_code == 200 and r.json()["run_state"] == run_state

    await eventually(lambda: fleet_shows("running"), deadline_s=30)

    stop = (await api.send(device_id, {"action": "stop"})).json()
    await api.wait_status(stop["id"], "succeeded", deadline_s=30)
    await eventually(lambda: fleet_shows("stopped"), deadline_s=30)


async def test_offline_device_gets_its_command_when_it_reconnects(world: dict[str, Any]) -> None:
    api: Api = world["api"]
    device_id = world["offline"]
    password = world["passwords"][device_id]
    # The device has a session at the broker, then drops off.
    async with device_client(device_id, password) as client:
        await client.subscribe(f"devices/{device_id}/down/command", qos=1)

    cmd = (await api.send(device_id, {"action": "set_setting", "params": {
        "key": "cooldown_s", "value": 120}})).json()  # fmt: skip
    await api.wait_status(cmd["id"], "sent")

    async with device_client(device_id, password) as client:
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


async def test_same_idempotency_key_is_one_command_the_device_runs_once(
    world: dict[str, Any],
) -> None:
    api: Api = world["api"]
    device_id = world["sim"]
    await _simulator_online(world)
    body = {"action": "set_setting", "params": {"key": "cooldown_s", "value": 90}}
    key = f"e2e-{uuid.uuid4().hex}"
    first = await api.send(device_id, body, key=key)
    again = await api.send(device_id, body, key=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    command_id = first.json()["id"]
    await api.wait_status(command_id, "succeeded", deadline_s=30)
    listed = await api.client.get(
        f"/api/v1/devices/{device_id}/commands", headers=api.as_(ADMIN), params={"limit": 100}
    )
    assert [c["id"] for c in listed.json()["items"]].count(command_id) == 1
    assert len(api.bus.dispatches_of(command_id)) == 1
    assert _acks(world, command_id, "accepted") == 1


async def test_read_token_gets_403_and_nothing_is_queued(world: dict[str, Any]) -> None:
    api: Api = world["api"]
    device_id = world["sim"]
    before = await _commands_of(api, device_id)
    response = await api.send(device_id, {"action": "start"}, principal=READER_1)
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/problem+json")
    assert await _commands_of(api, device_id) == before


async def _commands_of(api: Api, device_id: str) -> list[str]:
    listed = await api.client.get(
        f"/api/v1/devices/{device_id}/commands", headers=api.as_(ADMIN), params={"limit": 100}
    )
    assert listed.status_code == 200, listed.text
    return [c["id"] for c in listed.json()["items"]]


async def test_sigkill_of_the_commands_process_between_accept_and_dispatch_loses_nothing(
    world: dict[str, Any],
) -> None:
    """A second replica (the real `python -m commands serve`) accepts commands while the relay
    cannot publish (the test holds its lock), and is killed with SIGKILL. Every accepted command
    still reaches the device once, and succeeds."""
    api: Api = world["api"]
    stack: StackAddresses = world["stack"]
    issuer: TestIssuer = world["issuer"]
    device_id = world["sim"]
    await _simulator_online(world)
    url: str = world["commands_db"]
    lock_key = zlib.crc32(f"outbox-relay:{store.outbox.fullname}".encode())
    holder = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    port = free_port()
    accepted: list[str] = []
    try:
        with issuer.serve_jwks() as jwks_url:
            env = {
                **os.environ,
                "COMMANDS_DATABASE_URL": url,
                "COMMANDS_KAFKA_BOOTSTRAP_SERVERS": stack.kafka_bootstrap_servers,
                "COMMANDS_REDIS_URL": stack.redis_url,
                "COMMANDS_KAFKA_TOPIC_PREFIX": world["prefix"],
                "COMMANDS_HTTP_PORT": str(port),
                "COMMANDS_JWKS_URL": jwks_url,
                "COMMANDS_LOG_LEVEL": "WARNING",
                "COMMANDS_OUTBOX_EAGER": "false",  # see `world`
            }
            proc = subprocess.Popen(  # noqa: ASYNC220 - the process the test kills
                [sys.executable, "-m", "commands", "serve"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                base = f"http://127.0.0.1:{port}/api/v1"
                async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                    await eventually(
                        lambda: _ready(client, proc, port), deadline_s=90, interval=0.2
                    )
                    # From here on no relay can publish: the kill lands before dispatch.
                    await holder.execute("SELECT pg_advisory_lock($1)", lock_key)
                    for value in range(5):
                        r = await client.post(
                            f"/devices/{device_id}/commands",
                            json={"action": "set_setting",
                                  "params": {"key": "crank_attempts", "value": value + 1}},
                            headers=issuer.headers(ADMIN),
                        )  # fmt: skip
                        assert r.status_code == 202, r.text
                        accepted.append(r.json()["id"])
                proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
            finally:
                if proc.poll() is None:
                    proc.kill()
        for command_id in accepted:
            pending = await holder.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL AND topic = $1 "
                "AND convert_from(payload, 'UTF8') LIKE '%' || $2 || '%'",
                "command.dispatch.v1",
                command_id,
            )
            assert pending == 1, "the kill did not land between accept and dispatch"
        assert not [c for c in accepted if api.bus.dispatches_of(c)]
    finally:
        await holder.execute("SELECT pg_advisory_unlock_all()")
        await holder.close()
    # The surviving replica's relay publishes what the dead one accepted.
    for command_id in accepted:
        await api.wait_status(command_id, "succeeded", deadline_s=60)
    for command_id in accepted:
        assert len(api.bus.dispatches_of(command_id)) == 1
        assert _acks(world, command_id, "accepted") == 1


async def _ready(client: httpx.AsyncClient, proc: subprocess.Popen[bytes], port: int) -> bool:
    assert proc.poll() is None, "the commands process exited"
    try:
        r = await client.get(f"http://127.0.0.1:{port}/readyz")
    except httpx.TransportError:
        return False
    return r.status_code == 200


def _acks(world: dict[str, Any], command_id: str, status: str) -> int:
    tail: KafkaTail = world["tail"]
    topic = world["prefix"] + device.REPORT.name
    return len(
        tail.matching(
            topic,
            lambda e: (
                e["data"]["command_id"] == command_id
                and e["data"]["kind"] == "ack"
                and e["data"]["status"] == status
            ),
        )
    )


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
