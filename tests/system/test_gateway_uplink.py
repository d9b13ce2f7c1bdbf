"""Devices → broker → gateway → Kafka, against the real Mosquitto (dynsec) and Kafka.

Telemetry, presence (also a Last Will after an unclean disconnect) and reports arrive keyed by
device id; anything outside the protocol is dead-lettered with the raw payload and the reason,
and the same device's next valid message still goes through; the broker keeps devices apart.
"""

import asyncio
import base64
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.contracts import device
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from gateway.app import create_app
from gateway.dynsec import DynsecAdmin
from gateway.settings import GatewaySettings
from gateway.testing import (
    TOPICS,
    Broker,
    KafkaTail,
    admin_session,
    bridge_account,
    device_client,
    running_gateway,
)

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def admin(stack: StackAddresses) -> AsyncIterator[DynsecAdmin]:
    async with admin_session(Broker.from_env()) as session:
        yield session


@pytest.fixture(scope="module")
async def gateway(
    stack: StackAddresses,
    kafka_topics: KafkaTopics,
    fresh_database: Migrate,
    admin: DynsecAdmin,
) -> AsyncIterator[Any]:
    await kafka_topics.create(*TOPICS)
    url = await fresh_database("gateway")
    async with bridge_account(admin) as account:
        settings = GatewaySettings(
            env="test",
            database_url=url,
            kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
            kafka_topic_prefix=kafka_topics.prefix,
            mqtt_username=account.username,
            mqtt_password=account.password,
            mqtt_share_group=account.share_group,
            mqtt_client_id=f"test-gw-{uuid.uuid4().hex[:8]}",
            mqtt_session_expiry_s=60,
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            async with asyncio.timeout(20):
                await app.state.bridge.connected.wait()
            yield app


@pytest.fixture(scope="module")
async def tail(stack: StackAddresses, kafka_topics: KafkaTopics) -> AsyncIterator[KafkaTail]:
    names = [kafka_topics.prefix + t for t in TOPICS]
    async with KafkaTail(stack.kafka_bootstrap_servers, names) as collected:
        yield collected


async def new_device(admin: DynsecAdmin) -> tuple[str, str]:
    device_id = f"T{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    await admin.ensure_device(device_id, password)
    return device_id, password


def telemetry(**overrides: Any) -> bytes:
    body = {
        "ts": time.time(),
        "run_state": "running",
        "battery_v": 12.7,
        "fuel_pct": 61.5,
        "engine_hours": 1204.25,
        "lat": 52.37,
        "lon": 4.89,
    }
    body.update(overrides)
    return json.dumps(body).encode()


def of_device(device_id: str) -> Any:
    return lambda envelope: envelope["key"] == device_id


async def test_telemetry_presence_and_reports_arrive_keyed_by_device(
    gateway: Any, tail: KafkaTail, admin: DynsecAdmin, topic_prefix: str
) -> None:
    device_id, password = await new_device(admin)
    async with device_client(device_id, password) as client:
        status = {"state": "online", "fw": "2.4.1", "ts": time.time()}
        await client.publish(
            f"devices/{device_id}/up/status", json.dumps(status), qos=1, retain=True
        )
        await client.publish(f"devices/{device_id}/up/telemetry", telemetry(), qos=1)
        ack = {"command_id": "c-1", "status": "accepted", "detail": None}
        await client.publish(f"devices/{device_id}/up/ack", json.dumps(ack), qos=1)
        ota = {"command_id": "c-1", "phase": "downloading", "progress_pct": 40}
        await client.publish(f"devices/{device_id}/up/ota", json.dumps(ota), qos=1)

    found = await tail.wait_for(topic_prefix + device.TELEMETRY.name, of_device(device_id))
    event = json.loads(found[0].value)
    assert found[0].key == device_id.encode()
    assert event["type"] == "device.telemetry"
    assert event["data"]["run_state"] == "running"
    assert event["data"]["lat"] == 52.37
    assert event["data"]["received_at"]

    presence = await tail.wait_for(topic_prefix + device.PRESENCE.name, of_device(device_id))
    data = json.loads(presence[0].value)["data"]
    assert (data["state"], data["fw"], data["will"]) == ("online", "2.4.1", False)

    reports = await tail.wait_for(topic_prefix + device.REPORT.name, of_device(device_id), count=2)
    kinds = {json.loads(r.value)["data"]["kind"]: json.loads(r.value)["data"] for r in reports}
    assert kinds["ack"]["status"] == "accepted"
    assert kinds["ota"]["phase"] == "downloading"
    assert kinds["ota"]["progress_pct"] == 40
    assert all(r.key == device_id.encode() for r in reports)


async def test_last_will_after_unclean_disconnect_becomes_offline_presence(
    gateway: Any, tail: KafkaTail, admin: DynsecAdmin, topic_prefix: str
) -> None:
    device_id, password = await new_device(admin)
    will = aiomqtt.Will(
        f"devices/{device_id}/up/status",
        json.dumps({"state": "offline", "fw": "2.4.1"}),
        qos=1,
        retain=True,
    )
    client = device_client(device_id, password, will=will, keepalive=5)
    await client.__aenter__()
    await client.publish(
        f"devices/{device_id}/up/status",
        json.dumps({"state": "online", "fw": "2.4.1", "ts": time.time()}),
        qos=1,
        retain=True,
    )
    # Cut the TCP connection without an MQTT DISCONNECT, as a device losing power would.
    sock = client._client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(aiomqtt.MqttError):
        await client.__aexit__(None, None, None)

    def offline(envelope: dict[str, Any]) -> bool:
        return bool(envelope["key"] == device_id and envelope["data"]["state"] == "offline")

    found = await tail.wait_for(topic_prefix + device.PRESENCE.name, offline, timeout_s=30)
    data = json.loads(found[0].value)["data"]
    assert data["will"] is True
    assert data["ts"] is None


async def test_a_reconnect_does_not_replay_every_retained_status(
    gateway: Any, tail: KafkaTail, admin: DynsecAdmin, topic_prefix: str
) -> None:
    """The session survives a reconnect, and with it the subscription: the broker must not
    send every device's retained status again (one reconnect loop made that thousands of
    presence events a second). A status retained before the gateway's first subscription is
    still read once; that is how a new gateway learns who is online."""
    device_id, password = await new_device(admin)
    presence = topic_prefix + device.PRESENCE.name
    async with device_client(device_id, password) as client:
        await client.publish(
            f"devices/{device_id}/up/status",
            json.dumps({"state": "online", "fw": "2.4.1", "ts": time.time()}),
            qos=1,
            retain=True,
        )
        await tail.wait_for(presence, of_device(device_id))
        bridge = gateway.state.bridge
        connects = bridge.stats.connects
        bridge._conn.abort()  # as a produce failure does, to get its un-acked messages again
        async with asyncio.timeout(30):
            while bridge.stats.connects == connects or not bridge.connected.is_set():
                await asyncio.sleep(0.05)
        # A marker after the reconnect: anything the broker replayed came before it.
        await client.publish(f"devices/{device_id}/up/telemetry", telemetry(), qos=1)
        await tail.wait_for(topic_prefix + device.TELEMETRY.name, of_device(device_id))
    await asyncio.sleep(1.0)  # the marker and a replay may sit in different partitions' fetches
    assert len(tail.matching(presence, of_device(device_id))) == 1


async def test_a_replica_joining_gets_retained_statuses_dated_by_the_device(  # noqa: PLR0917
    gateway: Any,
    tail: KafkaTail,
    admin: DynsecAdmin,
    topic_prefix: str,
    stack: StackAddresses,
    fresh_database: Migrate,
) -> None:
    """A new subscription (a gateway replica joining) is handed every device's retained status:
    the device's last word, maybe weeks old. Forwarded as news dated now, every offline unit
    would look seen today; it keeps the device's own time and says it is a replay. The same
    status forwarded live is dated when it arrived."""
    device_id, password = await new_device(admin)
    presence = topic_prefix + device.PRESENCE.name
    said_at = time.time() - 3 * 24 * 3600  # an orderly offline three days ago (device's clock)
    async with device_client(device_id, password) as client:
        await client.publish(
            f"devices/{device_id}/up/status",
            json.dumps({"state": "offline", "fw": "2.4.1", "ts": said_at}),
            qos=1,
            retain=True,
        )
    [record] = await tail.wait_for(presence, of_device(device_id))
    live = json.loads(record.value)
    assert live["data"]["replayed"] is False
    assert abs(_epoch(live["data"]["received_at"]) - time.time()) < 60

    async with (
        bridge_account(admin) as account,
        running_gateway(
            database_url=await fresh_database("gateway"),
            kafka_bootstrap=stack.kafka_bootstrap_servers,
            topic_prefix=topic_prefix,
            account=account,
        ),
    ):
        [_, record] = await tail.wait_for(presence, of_device(device_id), count=2)
    replay = json.loads(record.value)
    assert replay["data"]["replayed"] is True
    assert replay["data"]["state"] == "offline"
    assert abs(_epoch(replay["data"]["received_at"]) - said_at) < 0.01


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@pytest.mark.parametrize(
    ("subtopic", "payload", "reason_part"),
    [
        ("telemetry", b"{not json", "invalid telemetry"),
        ("telemetry", telemetry(battery_v="12.7"), "battery_v"),
        ("telemetry", telemetry(firmware="x"), "firmware"),
        ("telemetry", telemetry(lat=None), "lat and lon"),
        ("status", b'{"state": "sleeping"}', "state"),
        ("ack", b'{"status": "accepted"}', "command_id"),
        ("telemetry", b'{"pad": "' + b"x" * 17_000 + b'"}', "exceeds 16384"),
        ("firmware", b"{}", "unknown uplink kind"),
    ],
)
async def test_malformed_uplink_is_dead_lettered_and_next_message_passes(  # noqa: PLR0917
    gateway: Any,
    tail: KafkaTail,
    admin: DynsecAdmin,
    topic_prefix: str,
    subtopic: str,
    payload: bytes,
    reason_part: str,
) -> None:
    device_id, password = await new_device(admin)
    async with device_client(device_id, password) as client:
        await client.publish(f"devices/{device_id}/up/{subtopic}", payload, qos=1)
        await client.publish(f"devices/{device_id}/up/telemetry", telemetry(fuel_pct=12.5), qos=1)

    dead = await tail.wait_for(topic_prefix + device.DEADLETTER.name, of_device(device_id))
    data = json.loads(dead[0].value)["data"]
    assert reason_part in data["reason"]
    assert base64.b64decode(data["payload_b64"]) == payload
    assert data["mqtt_topic"] == f"devices/{device_id}/up/{subtopic}"
    assert dead[0].key == device_id.encode()
    ok = await tail.wait_for(topic_prefix + device.TELEMETRY.name, of_device(device_id))
    assert json.loads(ok[0].value)["data"]["fuel_pct"] == 12.5


async def test_device_cannot_publish_to_or_read_another_devices_topics(
    gateway: Any, tail: KafkaTail, admin: DynsecAdmin, topic_prefix: str
) -> None:
    victim, _ = await new_device(admin)
    intruder, intruder_password = await new_device(admin)
    async with device_client(intruder, intruder_password) as client:
        # Reading another device's commands or uplinks: SUBACK "not authorized" (0x87).
        granted = await client.subscribe(f"devices/{victim}/down/#", qos=1)
        assert [code.value for code in granted] == [0x87]  # type: ignore[union-attr]
        granted = await client.subscribe(f"devices/{victim}/up/#", qos=1)
        assert [code.value for code in granted] == [0x87]  # type: ignore[union-attr]
    # Writing as another device: the broker refuses it and never forwards it.
    with contextlib.suppress(aiomqtt.MqttError):
        async with device_client(intruder, intruder_password) as client:
            await client.publish(f"devices/{victim}/up/telemetry", telemetry(fuel_pct=1.0), qos=1)
    # The intruder's own next message proves the gateway is reading this path.
    async with device_client(intruder, intruder_password) as client:
        await client.publish(f"devices/{intruder}/up/telemetry", telemetry(), qos=1)
    await tail.wait_for(topic_prefix + device.TELEMETRY.name, of_device(intruder))
    assert tail.matching(topic_prefix + device.TELEMETRY.name, of_device(victim)) == []
    # Its credentials with another client id are refused too.
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    broker = Broker.from_env()
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            username=intruder,
            password=intruder_password,
            identifier=victim,
            protocol=aiomqtt.ProtocolVersion.V5,
            properties=props,
        ):
            pass
