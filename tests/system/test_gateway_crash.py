"""A gateway killed with SIGKILL mid-stream and restarted loses no QoS 1 uplink.

The gateway runs as a real process (`python -m gateway serve`). It acknowledges an uplink to the
broker only after Kafka has its event, so whatever it held when it died stays in its broker
session and comes again when it reconnects (at least once: duplicates are allowed, loss is not).
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from common.contracts import device
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from gateway.dynsec import DynsecAdmin
from gateway.testing import (
    TOPICS,
    BridgeAccount,
    Broker,
    KafkaTail,
    admin_session,
    bridge_account,
    device_client,
)

pytestmark = pytest.mark.stack

MESSAGES = 4000


@pytest.fixture(scope="module")
async def admin(stack: StackAddresses) -> AsyncIterator[DynsecAdmin]:
    async with admin_session(Broker.from_env()) as session:
        yield session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """`python -m gateway serve` with a fixed MQTT client id, so restarts resume the session."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [sys.executable, "-m", "gateway", "serve"], env=self.env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                try:
                    if (await http.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(self.log.read_text()[-3000:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def gateway_env(
    stack: StackAddresses, prefix: str, database_url: str, account: BridgeAccount, port: int
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GATEWAY_ENV": "test",
            "GATEWAY_DATABASE_URL": database_url,
            "GATEWAY_KAFKA_BOOTSTRAP_SERVERS": stack.kafka_bootstrap_servers,
            "GATEWAY_KAFKA_TOPIC_PREFIX": prefix,
            "GATEWAY_MQTT_USERNAME": account.username,
            "GATEWAY_MQTT_PASSWORD": account.password,
            "GATEWAY_MQTT_SHARE_GROUP": account.share_group,
            "GATEWAY_MQTT_CLIENT_ID": f"test-gw-{uuid.uuid4().hex[:8]}",
            "GATEWAY_MQTT_SESSION_EXPIRY_S": "120",
            "GATEWAY_HTTP_PORT": str(port),
            "GATEWAY_LOG_LEVEL": "WARNING",
            # A long linger keeps many events in the producer's buffer at any moment, so a kill
            # always catches some uplinks received but not yet in Kafka.
            "GATEWAY_UPLINK_LINGER_MS": "300",
            # One device streams thousands of messages here: no per-device rate limit.
            "GATEWAY_DEVICE_RATE_PER_S": "0",
        }
    )
    return env


async def test_sigkilled_gateway_loses_no_qos1_uplink(
    stack: StackAddresses,
    kafka_topics: KafkaTopics,
    fresh_database: Migrate,
    admin: DynsecAdmin,
    tmp_path: Path,
) -> None:
    await kafka_topics.create(*TOPICS)
    telemetry_topic = kafka_topics.prefix + device.TELEMETRY.name
    url = await fresh_database("gateway")
    device_id, password = f"K{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    await admin.ensure_device(device_id, password)
    port = free_port()
    async with (
        bridge_account(admin) as account,
        KafkaTail(stack.kafka_bootstrap_servers, [telemetry_topic]) as tail,
    ):
        gateway = GatewayProcess(
            gateway_env(stack, kafka_topics.prefix, url, account, port),
            port,
            tmp_path / "gateway.log",
        )
        await gateway.start()
        try:
            async with device_client(device_id, password, max_inflight_messages=100) as client:

                async def publish(seq: int) -> None:
                    body = {
                        "ts": time.time(),
                        "run_state": "running",
                        "battery_v": 12.5,
                        "fuel_pct": 50.0,
                        "engine_hours": float(seq),
                    }
                    await client.publish(
                        f"devices/{device_id}/up/telemetry", json.dumps(body), qos=1
                    )

                killed = False
                for seq in range(MESSAGES):
                    await publish(seq)
                    if not killed and seq >= MESSAGES // 3 and len(tail.records) > 100:
                        # Mid-stream: some forwarded, more in flight, the rest still coming.
                        gateway.kill()
                        killed = True
                assert killed, "the gateway forwarded too little to be killed mid-stream"
            await gateway.start()

            def seqs() -> set[int]:
                return {
                    int(json.loads(r.value)["data"]["engine_hours"])
                    for r in tail.records
                    if r.key == device_id.encode()
                }

            deadline = time.monotonic() + 60
            while len(seqs()) < MESSAGES and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            missing = sorted(set(range(MESSAGES)) - seqs())
            assert missing == [], f"{len(missing)} lost, first {missing[:10]}"
        finally:
            gateway.stop()
            await admin.remove_device(device_id)
