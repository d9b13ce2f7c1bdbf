"""A device floods garbage while 100 others report normally: they lose nothing, memory stays flat.

Against the real Mosquitto and Kafka, with the gateway as a real process (`python -m gateway
serve`, shipped rate-limit settings). One device publishes about 1,000 messages a second at
QoS 1 for `FLOOD_S` seconds, malformed JSON and (every tenth) payloads over 16 KB, through
`mosquitto_pub -l`; meanwhile 100 well-behaved devices (aiomqtt) each send `PER_DEVICE`
telemetry messages. Checked with counts: every good message is on the telemetry topic, every
flood message was either dead-lettered or dropped by the per-device rate limit (the dead-letter
topic, keyed by device, and the gateway's Prometheus drop counter add up to at least the flood;
the counter is per gateway, so other devices on the shared broker can add to it), and the
gateway's RSS (from /proc/<pid>/status, sampled through the flood) stays under a generous bound.
"""

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import httpx
import pytest

from common.contracts import device
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from gateway.dynsec import DynsecAdmin
from gateway.testing import Broker, KafkaTail, admin_session, bridge_account

pytestmark = pytest.mark.stack

GOOD_DEVICES = 100
PER_DEVICE = 10
FLOOD_PER_S = 1000
FLOOD_S = 12
RSS_BOUND_MB = 400  # generous: the point is "bounded", not a tight budget (idle is ~150 MB)


@pytest.fixture(scope="module")
async def admin(stack: StackAddresses) -> AsyncIterator[DynsecAdmin]:
    async with admin_session(Broker.from_env()) as session:
        yield session


@contextlib.asynccontextmanager
async def load_account(admin: DynsecAdmin) -> AsyncIterator[tuple[str, str]]:
    """One broker account allowed on every device's uplink topics (101 accounts are slow)."""
    tag = uuid.uuid4().hex[:8]
    username, password, role = f"flood-{tag}", secrets.token_urlsafe(16), f"flood-{tag}"
    await admin.execute(
        [
            {"command": "createRole", "rolename": role},
            {
                "command": "addRoleACL",
                "rolename": role,
                "acltype": "publishClientSend",
                "topic": "devices/+/up/#",
                "allow": True,
            },
            {
                "command": "createClient",
                "username": username,
                "password": password,
                "roles": [{"rolename": role}],
            },
        ]
    )
    try:
        yield username, password
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(
                [
                    {"command": "deleteClient", "username": username},
                    {"command": "deleteRole", "rolename": role},
                ]
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def start_gateway(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "gateway", "serve"], env=env, stdout=out, stderr=out
        )
    deadline = time.monotonic() + 90
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]  # noqa: ASYNC240
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return proc
            await asyncio.sleep(0.2)
    proc.kill()
    raise TimeoutError(log.read_text()[-3000:])  # noqa: ASYNC240


async def gateway_counters(port: int) -> dict[str, float]:
    """The gateway's uplink counters from /metrics, by `name{labels}`."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    found = {}
    for match in re.finditer(r"^(autogen_gateway_\w+_total\{[^}]*\}) (\S+)$", text, re.M):
        found[match.group(1)] = float(match.group(2))
    return found


def flood_lines(count: int) -> list[bytes]:
    """Malformed JSON, and every tenth line a payload over 16 KB (also not valid telemetry)."""
    oversize = b'{"pad":"' + b"x" * (17 * 1024) + b'"}'
    return [
        oversize if n % 10 == 0 else b'{"run_state": running, ' + str(n).encode()
        for n in range(count)
    ]


async def flood(account: tuple[str, str], device_id: str) -> int:
    """~FLOOD_PER_S malformed/oversize QoS 1 messages a second for FLOOD_S s; returns the count."""
    broker = Broker.from_env()
    mosquitto_pub = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    proc = await asyncio.create_subprocess_exec(
        mosquitto_pub,
        *("-h", broker.host, "-p", str(broker.port), "-u", account[0], "-P", account[1]),
        *("-i", device_id, "-q", "1", "-l", "-t", f"devices/{device_id}/up/telemetry"),
        stdin=subprocess.PIPE,
    )
    assert proc.stdin is not None
    lines = flood_lines(FLOOD_PER_S * FLOOD_S)
    chunk = FLOOD_PER_S // 10
    started = time.monotonic()
    for n in range(0, len(lines), chunk):
        proc.stdin.write(b"\n".join(lines[n : n + chunk]) + b"\n")
        await proc.stdin.drain()
        # Paced to the wall clock: ~FLOOD_PER_S a second, whatever each write cost.
        await asyncio.sleep(max(0.0, started + (n + chunk) / FLOOD_PER_S - time.monotonic()))
    proc.stdin.close()
    await asyncio.wait_for(proc.wait(), timeout=120)
    return len(lines)


async def good_device(account: tuple[str, str], device_id: str) -> None:
    """PER_DEVICE valid telemetry messages, one a second, QoS 1."""
    broker = Broker.from_env()
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=account[0],
        password=account[1],
        identifier=device_id,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        for seq in range(PER_DEVICE):
            body = {
                "ts": time.time(),
                "run_state": "running",
                "battery_v": 12.7,
                "fuel_pct": 60.0,
                "engine_hours": float(seq),
            }
            await client.publish(f"devices/{device_id}/up/telemetry", json.dumps(body), qos=1)
            await asyncio.sleep(1.0)


async def test_flooding_device_is_contained_and_others_lose_nothing(  # noqa: PLR0915
    stack: StackAddresses,
    kafka_topics: KafkaTopics,
    fresh_database: Migrate,
    admin: DynsecAdmin,
    tmp_path: Path,
) -> None:
    await kafka_topics.create(
        device.TELEMETRY.name,
        device.PRESENCE.name,
        device.REPORT.name,
        device.DEADLETTER.name,
        "command.dispatch.v1",
        "command.status.v1",
        "platform.deadletter.v1",
    )
    telemetry = kafka_topics.prefix + device.TELEMETRY.name
    deadletter = kafka_topics.prefix + device.DEADLETTER.name
    url = await fresh_database("gateway")
    tag = uuid.uuid4().hex[:6]
    flooder = f"flood-{tag}-bad"
    good = [f"flood-{tag}-ok{n:03d}" for n in range(GOOD_DEVICES)]
    port = free_port()
    async with (
        bridge_account(admin) as gw,
        load_account(admin) as account,
        KafkaTail(stack.kafka_bootstrap_servers, [telemetry, deadletter]) as tail,
    ):
        env = {
            **os.environ,
            "GATEWAY_ENV": "test",
            "GATEWAY_DATABASE_URL": url,
            "GATEWAY_KAFKA_BOOTSTRAP_SERVERS": stack.kafka_bootstrap_servers,
            "GATEWAY_KAFKA_TOPIC_PREFIX": kafka_topics.prefix,
            "GATEWAY_MQTT_USERNAME": gw.username,
            "GATEWAY_MQTT_PASSWORD": gw.password,
            "GATEWAY_MQTT_SHARE_GROUP": gw.share_group,
            "GATEWAY_MQTT_CLIENT_ID": f"test-gw-{tag}",
            "GATEWAY_MQTT_SESSION_EXPIRY_S": "60",
            "GATEWAY_HTTP_PORT": str(port),
            "GATEWAY_LOG_LEVEL": "WARNING",
        }
        proc = await start_gateway(env, port, tmp_path / "gateway.log")
        try:
            idle_mb = rss_mb(proc.pid)
            peak_mb = idle_mb
            flooding = asyncio.create_task(flood(account, flooder))
            await asyncio.sleep(1.0)  # the flood is on before the good devices start
            reporting = asyncio.gather(*(good_device(account, d) for d in good))
            while not (flooding.done() and reporting.done()):
                peak_mb = max(peak_mb, rss_mb(proc.pid))
                await asyncio.sleep(0.5)
            sent = await flooding
            await reporting

            # Every good message arrives (wait with a deadline: the machine is shared).
            expected = {(d, float(s)) for d in good for s in range(PER_DEVICE)}

            def arrived() -> set[tuple[str, float]]:
                got = set()
                for record in tail.matching(telemetry, lambda e: e["key"] in good):
                    data = json.loads(record.value)["data"]
                    got.add((data["device_id"], data["engine_hours"]))
                return got

            # Every flood message is accounted for: dead-lettered (in Kafka) or dropped.
            def flood_outcomes() -> tuple[int, float, float]:
                dead = len(tail.matching(deadletter, lambda e: e["key"] == flooder))
                return dead, counters.get(rate_key, 0.0), counters.get(dead_key, 0.0)

            rate_key = 'autogen_gateway_dropped_total{reason="rate_limited"}'
            dead_key = 'autogen_gateway_uplinks_total{outcome="dead_lettered"}'
            counters: dict[str, float] = {}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                counters = await gateway_counters(port)
                dead, dropped, _ = flood_outcomes()
                if arrived() >= expected and dead + dropped >= sent:
                    break
                await asyncio.sleep(0.5)
            peak_mb = max(peak_mb, rss_mb(proc.pid))
            dead, dropped, dead_counted = flood_outcomes()
            lost = len(expected - arrived())
            flood_leaked = len(tail.matching(telemetry, lambda e: e["key"] == flooder))
            print(  # noqa: T201 - the fault suite reports its counts
                f"\ndevice flood: good sent {len(expected)}, lost {lost}; flood sent {sent}, "
                f"dead-lettered {dead}, dropped (rate limit) {dropped:.0f}, "
                f"forwarded {flood_leaked}; gateway RSS idle {idle_mb:.0f} MB, "
                f"peak {peak_mb:.0f} MB"
            )
            assert lost == 0, f"{lost} good messages lost"
            assert flood_leaked == 0
            # The drop counter is per gateway, not per device, and this gateway also sees any
            # other device publishing on the shared broker meanwhile: a lower bound, then.
            assert dead + dropped >= sent, (dead, dropped, sent)
            assert dead < sent / 5, "the rate limit let most of the flood through"
            assert dead_counted >= dead  # the counter agrees with the topic (others may add)
            assert dropped > 0, "the rate limit never engaged"
            assert peak_mb < RSS_BOUND_MB, f"gateway RSS peaked at {peak_mb:.0f} MB"
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
