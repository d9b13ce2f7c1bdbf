"""Kafka → gateway → device: a dispatched command reaches its device once; an expired one is
not sent and is reported `expired`. Against the real Kafka, Mosquitto and PostgreSQL."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import pytest
from aiokafka import AIOKafkaProducer

from common.contracts import commands, device
from common.events import encode, new_event
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from gateway.dynsec import DynsecAdmin
from gateway.testing import (
    Broker,
    KafkaTail,
    admin_session,
    bridge_account,
    device_client,
    running_gateway,
)

pytestmark = pytest.mark.stack

TOPICS = [commands.DISPATCH.name, commands.STATUS.name, device.DEADLETTER.name]


@pytest.fixture(scope="module")
async def admin(stack: StackAddresses) -> AsyncIterator[DynsecAdmin]:
    async with admin_session(Broker.from_env()) as session:
        yield session


@pytest.fixture(scope="module")
async def gateway(
    stack: StackAddresses, kafka_topics: KafkaTopics, fresh_database: Migrate, admin: DynsecAdmin
) -> AsyncIterator[Any]:
    await kafka_topics.create(*TOPICS, "platform.deadletter.v1")
    url = await fresh_database("gateway")
    async with (
        bridge_account(admin) as account,
        running_gateway(
            database_url=url,
            kafka_bootstrap=stack.kafka_bootstrap_servers,
            topic_prefix=kafka_topics.prefix,
            account=account,
        ) as app,
    ):
        yield app


@pytest.fixture(scope="module")
async def tail(stack: StackAddresses, kafka_topics: KafkaTopics) -> AsyncIterator[KafkaTail]:
    names = [kafka_topics.prefix + commands.STATUS.name]
    async with KafkaTail(stack.kafka_bootstrap_servers, names) as collected:
        yield collected


@pytest.fixture(scope="module")
async def producer(stack: StackAddresses) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers, acks="all")
    await p.start()
    yield p
    await p.stop()


async def dispatch(
    producer: AIOKafkaProducer, prefix: str, command: commands.CommandDispatch
) -> None:
    event = new_event(
        type=commands.DISPATCH.event_type, data=command, source="test", key=command.device_id
    )
    await producer.send_and_wait(
        prefix + commands.DISPATCH.name, encode(event), key=command.device_id.encode()
    )


async def listening_device(admin: DynsecAdmin) -> tuple[str, aiomqtt.Client]:
    device_id = f"C{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    await admin.ensure_device(device_id, password)
    client = device_client(device_id, password)
    await client.__aenter__()
    await client.subscribe(f"devices/{device_id}/down/command", qos=1)
    return device_id, client


async def received(client: aiomqtt.Client, quiet_s: float) -> list[dict[str, Any]]:
    """Every command the device got until nothing came for `quiet_s`."""
    got: list[dict[str, Any]] = []
    messages = client.messages.__aiter__()
    while True:
        try:
            message = await asyncio.wait_for(messages.__anext__(), timeout=quiet_s)
        except TimeoutError:
            return got
        got.append(json.loads(message.payload))


def of_command(command_id: str, status: str) -> Any:
    return lambda e: e["data"]["command_id"] == command_id and e["data"]["status"] == status


async def test_dispatched_command_reaches_device_exactly_once(
    gateway: Any,
    admin: DynsecAdmin,
    producer: AIOKafkaProducer,
    tail: KafkaTail,
    topic_prefix: str,
) -> None:
    device_id, client = await listening_device(admin)
    command = commands.CommandDispatch(
        command_id=f"cmd-{uuid.uuid4().hex[:8]}",
        device_id=device_id,
        action="start",
        params={},
        expires_at=datetime.now(UTC) + timedelta(minutes=5),
    )
    try:
        # The same command twice (a redelivery or an upstream retry): delivered once.
        await dispatch(producer, topic_prefix, command)
        await dispatch(producer, topic_prefix, command)
        sent = await tail.wait_for(
            topic_prefix + commands.STATUS.name, of_command(command.command_id, "sent")
        )
        got = await received(client, quiet_s=2.0)
    finally:
        await client.__aexit__(None, None, None)
    assert got == [
        {
            "command_id": command.command_id,
            "action": "start",
            "params": {},
            "expires_at": command.expires_at.isoformat().replace("+00:00", "Z"),
        }
    ]
    assert len(sent) == 1
    status = json.loads(sent[0].value)
    assert status["key"] == device_id
    assert status["data"]["reporter"] == "gateway"


async def test_expired_command_is_not_sent_and_reported_expired(
    gateway: Any,
    admin: DynsecAdmin,
    producer: AIOKafkaProducer,
    tail: KafkaTail,
    topic_prefix: str,
) -> None:
    device_id, client = await listening_device(admin)
    command = commands.CommandDispatch(
        command_id=f"cmd-{uuid.uuid4().hex[:8]}",
        device_id=device_id,
        action="reboot",
        expires_at=datetime.now(UTC) - timedelta(seconds=1),
    )
    try:
        await dispatch(producer, topic_prefix, command)
        await tail.wait_for(
            topic_prefix + commands.STATUS.name, of_command(command.command_id, "expired")
        )
        got = await received(client, quiet_s=1.0)
    finally:
        await client.__aexit__(None, None, None)
    assert got == []
    assert (
        tail.matching(topic_prefix + commands.STATUS.name, of_command(command.command_id, "sent"))
        == []
    )
