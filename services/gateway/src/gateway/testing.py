"""Helpers for tests and benchmarks against a real broker and Kafka (not used in production).

Each test run gets its own bridge account and share group, so a gateway service already running
on the same broker never takes its messages.
"""

import asyncio
import contextlib
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from aiokafka import AIOKafkaConsumer

from common.contracts import commands, device, platform
from gateway.dynsec import DynsecAdmin, ensure_bridge_account, remove_bridge_account

# Every topic a running gateway reads or writes (create them, prefixed, before starting one).
TOPICS = (
    device.TELEMETRY.name,
    device.PRESENCE.name,
    device.REPORT.name,
    device.DEADLETTER.name,
    commands.DISPATCH.name,
    commands.STATUS.name,
    platform.DEADLETTER.name,
)


@dataclass(frozen=True)
class Broker:
    """Where the MQTT broker is and who administers it."""

    host: str
    port: int
    admin_username: str
    admin_password: str

    @classmethod
    def from_env(cls) -> "Broker":
        """From the local stack's environment (`.local/stack.env`)."""
        return cls(
            host=os.environ.get("AUTOGEN_MQTT_HOST", "127.0.0.1"),
            port=int(os.environ.get("AUTOGEN_MQTT_PORT", "1883")),
            admin_username=os.environ["AUTOGEN_MQTT_ADMIN_USERNAME"],
            admin_password=os.environ["AUTOGEN_MQTT_ADMIN_PASSWORD"],
        )


def device_client(device_id: str, password: str, **kwargs: Any) -> aiomqtt.Client:
    """An MQTT v5 client as the device itself (client id = username = device id)."""
    broker = Broker.from_env()
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=device_id,
        password=password,
        identifier=device_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        **kwargs,
    )


@contextlib.asynccontextmanager
async def admin_session(broker: Broker) -> AsyncIterator[DynsecAdmin]:
    """A connected dynamic-security admin session."""
    admin = DynsecAdmin(
        host=broker.host,
        port=broker.port,
        username=broker.admin_username,
        password=broker.admin_password,
        client_id=f"test-admin-{uuid.uuid4().hex[:8]}",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(admin.run(stop))
    try:
        async with asyncio.timeout(15):
            await admin.ready.wait()
        yield admin
    finally:
        stop.set()
        await asyncio.wait({task}, timeout=5)


@dataclass(frozen=True)
class BridgeAccount:
    """A gateway-like broker account with its own share group."""

    username: str
    password: str
    share_group: str


@contextlib.asynccontextmanager
async def bridge_account(admin: DynsecAdmin) -> AsyncIterator[BridgeAccount]:
    """Create a bridge account for this run; removed on exit."""
    tag = uuid.uuid4().hex[:8]
    account = BridgeAccount(f"test-gw-{tag}", secrets.token_urlsafe(16), f"test{tag}")
    await ensure_bridge_account(
        admin, username=account.username, password=account.password, share_group=account.share_group
    )
    try:
        yield account
    finally:
        with contextlib.suppress(Exception):
            await remove_bridge_account(
                admin, username=account.username, share_group=account.share_group
            )


@dataclass
class KafkaTail:
    """Collects every record of some topics (from the start) for assertions."""

    bootstrap: str
    topics: list[str]
    records: list[Any] = field(default_factory=list)
    _consumer: AIOKafkaConsumer | None = None
    _task: "asyncio.Task[None] | None" = None

    async def __aenter__(self) -> "KafkaTail":
        self._consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _pump(self) -> None:
        assert self._consumer is not None  # noqa: S101
        async for record in self._consumer:
            self.records.append(record)

    def matching(self, topic: str, predicate: Callable[[dict[str, Any]], bool]) -> list[Any]:
        """Records of `topic` whose decoded envelope satisfies `predicate`.

        Other tests of the session share the topics and put malformed records on them on
        purpose (dead-letter tests): those are never a match.
        """
        found = []
        for record in self.records:
            if record.topic != topic:
                continue
            try:
                envelope = json.loads(record.value)
            except (TypeError, ValueError):
                continue
            if isinstance(envelope, dict) and predicate(envelope):
                found.append(record)
        return found

    async def wait_for(
        self,
        topic: str,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        count: int = 1,
        timeout_s: float = 60.0,  # generous: the whole suite shares two cores
    ) -> list[Any]:
        """Wait until `count` matching records arrived; raises TimeoutError with what it saw."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.matching(topic, predicate)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)
        found = self.matching(topic, predicate)
        raise TimeoutError(f"{len(found)} of {count} records on {topic} within {timeout_s}s")


@contextlib.asynccontextmanager
async def running_gateway(
    *,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    account: BridgeAccount,
    verifier: Any = None,
) -> AsyncIterator[Any]:
    """The gateway app running in this process (lifespan entered, MQTT session up)."""
    from gateway.app import create_app  # noqa: PLC0415 - keeps this module light for the bench
    from gateway.settings import GatewaySettings  # noqa: PLC0415

    settings = GatewaySettings(
        env="test",
        database_url=database_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_topic_prefix=topic_prefix,
        mqtt_username=account.username,
        mqtt_password=account.password,
        mqtt_share_group=account.share_group,
        mqtt_client_id=f"test-gw-{uuid.uuid4().hex[:8]}",
        mqtt_session_expiry_s=60,
        outbox_poll_interval_s=0.05,
    )
    app = create_app(settings, verifier=verifier)
    async with app.router.lifespan_context(app):
        async with asyncio.timeout(20):
            await app.state.bridge.connected.wait()
            await app.state.admin.ready.wait()
        yield app
