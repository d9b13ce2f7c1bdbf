"""Test helpers (for this service's tests and the system tests): a `Bus` that plays fleet,
firmware, the gateway and devices on Kafka, and an HTTP client signing as a principal."""

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fastapi import FastAPI
from pydantic import BaseModel, SecretStr

from commands.settings import CommandsSettings
from common.auth import Principal
from common.contracts import commands, device, firmware, fleet, platform
from common.contracts.topic import Topic
from common.events import encode, new_event
from common.testing.auth import TestIssuer
from common.testing.stack import StackAddresses

TOPICS = (
    commands.REQUEST,
    commands.DISPATCH,
    commands.STATUS,
    device.REPORT,
    device.TELEMETRY,
    device.PRESENCE,
    fleet.DEVICE,
    firmware.RELEASE,
    platform.DEADLETTER,
)

ADMIN = Principal(user_id="admin-1", email="admin@x.test", role="admin")
DEALER_1 = Principal(user_id="staff-1", email="staff@d1.test", role="dealer", dealer_id="dealer-1")
DEALER_2 = Principal(user_id="staff-2", email="staff@d2.test", role="dealer", dealer_id="dealer-2")
READER_1 = Principal(
    user_id="staff-1",
    role="dealer",
    dealer_id="dealer-1",
    access="read",
    token_id="tok-r",  # noqa: S106 - an id, not a secret
)


async def eventually(
    check: Callable[[], Awaitable[Any]], *, deadline_s: float = 20.0, interval: float = 0.05
) -> Any:
    """Wait for `check()` to return something truthy; returns it."""
    async with asyncio.timeout(deadline_s):
        while True:
            found = await check()
            if found:
                return found
            await asyncio.sleep(interval)


@dataclass
class Bus:
    """Publishes what other services and devices would; records dispatches and statuses."""

    bootstrap: str
    prefix: str
    producer: AIOKafkaProducer | None = None
    dispatches: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await self.producer.start()
        consumer = AIOKafkaConsumer(
            self.prefix + commands.DISPATCH.name,
            self.prefix + commands.STATUS.name,
            bootstrap_servers=self.bootstrap,
            group_id=f"{self.prefix}test-bus-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest",
        )
        await consumer.start()
        self._task = asyncio.create_task(self._read(consumer))

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        try:
            async for record in consumer:
                body = json.loads(record.value or b"{}")
                if record.topic.endswith(commands.DISPATCH.name):
                    self.dispatches.append(body["data"])
                else:
                    self.statuses.append(body["data"])
        finally:
            await consumer.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.producer is not None:
            await self.producer.stop()

    async def publish(self, topic: Topic[Any], data: BaseModel, key: str) -> None:
        if self.producer is None:
            raise RuntimeError("Bus.start() first")
        event = new_event(type=topic.event_type, data=data, source="test", key=key)
        await self.producer.send_and_wait(self.prefix + topic.name, encode(event), key=key.encode())

    # --- what other parties say

    async def device_registered(
        self,
        device_id: str,
        *,
        dealer_id: str = "dealer-1",
        model: str = "D100",
        engine: str | None = "diesel",
        transport: str = "gsm",
    ) -> None:
        await self.publish(
            fleet.DEVICE,
            fleet.FleetDevice(
                device_id=device_id,
                name=device_id,
                model=model,
                engine=engine,
                transport=transport,
                gps=False,
                dealer_id=dealer_id,
                customer_email=None,
            ),
            device_id,
        )

    async def release(self, release_id: str, version: str, models: list[str], **kw: Any) -> None:
        data = firmware.FirmwareRelease(
            release_id=release_id,
            console="unified",
            version=version,
            models=models,
            artifact_url=f"https://fw.test/{release_id}.bin",
            sha256="ab" * 32,
            size=123_456,
            created_at=datetime.now(UTC),
            **kw,
        )
        await self.publish(firmware.RELEASE, data, release_id)

    async def gateway_status(self, cmd: dict[str, Any], status: str) -> None:
        data = commands.CommandStatus(
            command_id=cmd["id"],
            device_id=cmd["device_id"],
            action=cmd["action"],
            status=status,
            at=datetime.now(UTC),
            reporter="gateway",
        )
        await self.publish(commands.STATUS, data, cmd["device_id"])

    async def ack(self, cmd: dict[str, Any], status: str, detail: str | None = None) -> None:
        data = device.DeviceReport(
            device_id=cmd["device_id"],
            received_at=datetime.now(UTC),
            kind="ack",
            command_id=cmd["id"],
            status=status,
            detail=detail,
        )
        await self.publish(device.REPORT, data, cmd["device_id"])

    async def ota(self, cmd: dict[str, Any], phase: str, pct: float | None = None) -> None:
        data = device.DeviceReport(
            device_id=cmd["device_id"],
            received_at=datetime.now(UTC),
            kind="ota",
            command_id=cmd["id"],
            phase=phase,
            progress_pct=pct,
        )
        await self.publish(device.REPORT, data, cmd["device_id"])

    async def telemetry(self, device_id: str, run_state: str) -> None:
        now = datetime.now(UTC)
        data = device.DeviceTelemetry(
            device_id=device_id,
            received_at=now,
            ts=now,
            run_state=run_state,
            battery_v=12.6,
        )
        await self.publish(device.TELEMETRY, data, device_id)

    async def presence(self, device_id: str, state: str, fw: str | None = None) -> None:
        data = device.DevicePresence(
            device_id=device_id,
            received_at=datetime.now(UTC),
            state=state,
            fw=fw,
        )
        await self.publish(device.PRESENCE, data, device_id)

    def dispatches_of(self, command_id: str) -> list[dict[str, Any]]:
        return [d for d in self.dispatches if d["command_id"] == command_id]

    def statuses_of(self, command_id: str) -> list[str]:
        return [
            s["status"]
            for s in self.statuses
            if s["command_id"] == command_id and s["reporter"] == "commands"
        ]


def settings_for(stack: StackAddresses, url: str, prefix: str, **extra: Any) -> CommandsSettings:
    return CommandsSettings(
        database_url=SecretStr(url),
        kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
        redis_url=SecretStr(stack.redis_url),
        kafka_topic_prefix=prefix,
        outbox_poll_interval_s=0.05,
        sweep_interval_s=0.2,
        metrics_interval_s=0.2,
        run_state_window_s=3.0,
        **extra,
    )


@dataclass
class Api:
    """The app over HTTP, signing each request as a principal."""

    client: httpx.AsyncClient
    issuer: TestIssuer
    bus: Bus
    app: FastAPI | None = None  # for tests that look at the consumers' stats

    def as_(self, principal: Principal) -> dict[str, str]:
        return self.issuer.headers(principal)

    async def send(
        self,
        device_id: str,
        body: dict[str, Any],
        principal: Principal = DEALER_1,
        key: str | None = None,
    ) -> httpx.Response:
        headers = self.as_(principal)
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.client.post(
            f"/api/v1/devices/{device_id}/commands", json=body, headers=headers
        )

    async def get(self, command_id: str, principal: Principal = DEALER_1) -> dict[str, Any]:
        response = await self.client.get(
            f"/api/v1/commands/{command_id}", headers=self.as_(principal)
        )
        if response.status_code != 200:
            raise AssertionError(response.text)
        body: dict[str, Any] = response.json()
        return body

    async def wait_status(
        self, command_id: str, status: str, deadline_s: float = 20.0
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            body = await self.get(command_id)
            return body if body["status"] == status else None

        found: dict[str, Any] = await eventually(check, deadline_s=deadline_s)
        return found

    async def known(self, device_id: str) -> None:
        """Wait until the service's device projection has the device."""

        async def check() -> bool:
            r = await self.client.get(
                f"/api/v1/devices/{device_id}/commands", headers=self.as_(ADMIN)
            )
            return r.status_code == 200

        await eventually(check)


def new_id(prefix: str = "D") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
