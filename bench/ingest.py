"""Ingest: 100-byte QoS 1 telemetry from devices to Kafka, and the gateway's memory at 10k devices.

One run, same publishers (`mosquitto_pub -l`, one per simulated device account) for each path:
1. raw broker → `mosquitto_sub` (QoS 1): what the broker delivers to a C client;
2. raw aiomqtt subscriber (QoS 1, auto-ack, counting only): the ceiling for a Python consumer;
3. the gateway (`python -m gateway serve`, a real process): broker → validation → Kafka
   (acks=all, idempotent), PUBACK only after Kafka's ack; zero loss checked by sequence number.
Then the gateway's RSS with 10,000 simulated devices connected (`python -m gateway.simulator
--generate`, one process). Needs the local stack. Not a test: nothing here asserts a time.
A running `gateway` service also receives the bench's uplinks (it subscribes to every device):
stop it (`deploy/local/services stop gateway`) for clean figures. Wall-clock rates depend on
what else runs; the CPU seconds per message of the gateway process and of the aiomqtt
subscriber (the bench process while it only receives) do not, so both are printed.

One run (2 shared cores, load 5-15, 60,000 messages): mosquitto_sub 24,046 msg/s; raw aiomqtt
2,613 msg/s (203 us CPU/msg); gateway 3,589 msg/s, 0 lost (59 us CPU/msg: 1.37x aiomqtt,
3.46x per CPU second); gateway RSS 148 MB idle, 149 MB with 9,996 simulated devices.
Later runs beside other benchmarks (load 7-15): ratio 0.57, 0.34, 0.54 (gateway 832-994 msg/s,
119-135 us CPU/msg; aiomqtt 1,541-2,963 msg/s, 187-226 us/msg), zero loss; see the README.
"""

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiomqtt
import httpx
from aiokafka import AIOKafkaConsumer

from common.contracts import device
from common.testing.stack import (
    StackAddresses,
    create_database,
    create_topics,
    delete_topics_with_prefix,
    drop_database,
    load_stack_env,
)
from gateway.dynsec import DynsecAdmin
from gateway.testing import TOPICS, BridgeAccount, Broker, admin_session, bridge_account

PAYLOAD_BYTES = 100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000, help="messages per measurement")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--devices", type=int, default=10_000, help="for the RSS measurement")
    parser.add_argument("--skip-rss", action="store_true")
    return parser.parse_args()


def payload(seq: int) -> bytes:
    """A valid telemetry message of exactly 100 bytes carrying `seq` in engine_hours."""
    body = (
        '{"ts":1700000000.0,"run_state":"running","battery_v":12.6,"fuel_pct":55.0,'
        f'"engine_hours":{seq}.0'
    )
    pad = PAYLOAD_BYTES - len(body) - 1
    return (body + " " * pad + "}").encode()


def mosquitto_bin(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if not found:
        raise SystemExit(f"{name} not found (Debian package mosquitto-clients)")
    return found


class Publishers:
    """K device accounts, each publishing its share with `mosquitto_pub -l` at QoS 1."""

    def __init__(self, broker: Broker, devices: list[tuple[str, str]]) -> None:
        self.broker, self.devices = broker, devices
        self._lines: dict[int, list[bytes]] = {}

    def prepare(self, total: int) -> list[bytes]:
        """Each publisher's input, generated before any clock starts."""
        if total not in self._lines:
            share = total // len(self.devices)
            self._lines[total] = [
                b"\n".join(payload(index * share + n) for n in range(share)) + b"\n"
                for index in range(len(self.devices))
            ]
        return self._lines[total]

    async def publish(self, total: int) -> None:
        procs = []
        for (device_id, password), lines in zip(self.devices, self.prepare(total), strict=True):
            proc = await asyncio.create_subprocess_exec(
                mosquitto_bin("mosquitto_pub"),
                "-h",
                self.broker.host,
                "-p",
                str(self.broker.port),
                "-u",
                device_id,
                "-P",
                password,
                "-i",
                device_id,
                "-q",
                "1",
                "-l",
                "-t",
                f"devices/{device_id}/up/telemetry",
                stdin=subprocess.PIPE,
            )
            procs.append((proc, lines))
        await asyncio.gather(*(p.communicate(lines) for p, lines in procs))


async def raw_mosquitto_sub(
    broker: Broker, account: BridgeAccount, pubs: Publishers, n: int
) -> float:
    sub = await asyncio.create_subprocess_exec(
        mosquitto_bin("mosquitto_sub"),
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-u",
        account.username,
        "-P",
        account.password,
        "-q",
        "1",
        "-t",
        f"$share/{account.share_group}/devices/+/up/#",
        "-C",
        str(n),
        "-V",
        "mqttv5",
        stdout=subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)  # subscribed
    started = time.perf_counter()
    await pubs.publish(n)
    await sub.wait()
    return n / (time.perf_counter() - started)


async def raw_aiomqtt(
    broker: Broker, account: BridgeAccount, pubs: Publishers, n: int
) -> tuple[float, float]:
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=account.username,
        password=account.password,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(f"$share/{account.share_group}/devices/+/up/#", qos=1)
        started, cpu_started = time.perf_counter(), time.process_time()
        publishing = asyncio.create_task(pubs.publish(n))
        count = 0
        async for _ in client.messages:
            count += 1
            if count >= n:
                break
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started  # includes feeding the publishers' pipes
        await publishing
    return n / elapsed, cpu / n * 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_gateway(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "gateway", "serve"], env=env, stdout=out, stderr=out
        )
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            if proc.poll() is not None:
                raise SystemExit(f"gateway exited: {log.read_text()[-2000:]}")  # noqa: ASYNC240
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return proc
            await asyncio.sleep(0.2)
    raise SystemExit(f"gateway not ready: {log.read_text()[-2000:]}")  # noqa: ASYNC240


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def gateway_rate(  # noqa: PLR0917
    stack: StackAddresses,
    env: dict[str, str],
    port: int,
    log: Path,
    pubs: Publishers,
    n: int,
    topic: str,
) -> tuple[float, int, float, subprocess.Popen[bytes]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    proc = await start_gateway(env, port, log)
    seen: set[int] = set()
    try:
        started, cpu_started = time.perf_counter(), cpu_s(proc.pid)
        publishing = asyncio.create_task(pubs.publish(n))
        deadline = time.monotonic() + 300
        while len(seen) < n and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batch.values():
                for record in records:
                    seen.add(int(json.loads(record.value)["data"]["engine_hours"]))
        elapsed = time.perf_counter() - started
        cpu = cpu_s(proc.pid) - cpu_started
        await publishing
    finally:
        await consumer.stop()
    return n / elapsed, n - len(seen), cpu / n * 1e6, proc


async def connected_clients(broker: Broker) -> int:
    async with aiomqtt.Client(
        broker.host, broker.port, username=broker.admin_username, password=broker.admin_password
    ) as client:
        await client.subscribe("$SYS/broker/clients/connected")
        async for message in client.messages:
            return int(message.payload)
    return 0


async def load_account(admin: DynsecAdmin, tag: str) -> tuple[str, str]:
    """One account for all load devices (10k dynsec accounts would be slow to make and remove)."""
    username, password = f"bench-load-{tag}", secrets.token_urlsafe(16)
    role = f"bench-load-{tag}"
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
                "command": "addRoleACL",
                "rolename": role,
                "acltype": "subscribePattern",
                "topic": "devices/+/down/#",
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
    return username, password


async def rss_with_devices(
    broker: Broker, admin: DynsecAdmin, gateway_pid: int, count: int, tag: str
) -> tuple[float, float, int]:
    username, password = await load_account(admin, tag)
    idle = rss_mb(gateway_pid)
    before = await connected_clients(broker)
    sim = subprocess.Popen(  # noqa: ASYNC220 - returns at once
        [
            sys.executable,
            "-m",
            "gateway.simulator",
            "--generate",
            str(count),
            "--id-prefix",
            f"bench-{tag}-",
            "--username",
            username,
            "--password",
            password,
            "--telemetry-interval",
            "30",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        now = before
        while time.monotonic() < deadline:
            now = await connected_clients(broker)
            if now - before >= count:
                break
            await asyncio.sleep(2)
        await asyncio.sleep(35)  # a full telemetry round from every device through the gateway
        return idle, rss_mb(gateway_pid), now - before
    finally:
        sim.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.wait(timeout=60)
        if sim.poll() is None:
            sim.kill()
        # Best effort: a lost admin session must not hide the figures measured above.
        with contextlib.suppress(aiomqtt.MqttError, ConnectionError):
            await admin.execute(
                [
                    {"command": "deleteClient", "username": username},
                    {"command": "deleteRole", "rolename": f"bench-load-{tag}"},
                ]
            )


def metric(name: str, value: float, unit: str, baseline: float, baseline_name: str) -> str:
    return json.dumps(
        {
            "bench": "ingest",
            "metric": name,
            "value": round(value),
            "unit": unit,
            "baseline": round(baseline),
            "baseline_name": baseline_name,
            "ratio": round(value / baseline, 2) if baseline else None,
        }
    )


async def main() -> int:
    args = parse_args()
    load_stack_env(Path.cwd())
    stack = StackAddresses.from_env(os.environ)
    if stack is None:
        print("start the local stack first: deploy/local/stack start", file=sys.stderr)
        return 2
    broker = Broker.from_env()
    tag = uuid.uuid4().hex[:6]
    prefix = f"bench.{tag}."
    await create_topics(stack.kafka_bootstrap_servers, [prefix + t for t in TOPICS], partitions=6)
    db_name = f"bench_gateway_{tag}"
    url = await create_database(stack.pg_admin_url, db_name)
    subprocess.run(  # noqa: ASYNC221 - set-up, before any measurement
        [sys.executable, "-m", "gateway", "migrate"],
        env={**os.environ, "GATEWAY_DATABASE_URL": url},
        check=True,
        capture_output=True,
    )
    n = args.messages - args.messages % args.publishers
    print(
        f"ingest: {n} QoS 1 telemetry messages of {PAYLOAD_BYTES} bytes, {args.publishers} "
        f"mosquitto_pub publishers, on {os.cpu_count()} cores"
    )
    proc: subprocess.Popen[bytes] | None = None
    async with admin_session(broker) as admin:
        devices = [
            (f"bench-{tag}-pub{i}", secrets.token_urlsafe(12)) for i in range(args.publishers)
        ]
        for device_id, password in devices:
            await admin.ensure_device(device_id, password)
        pubs = Publishers(broker, devices)
        pubs.prepare(n)
        try:
            async with bridge_account(admin) as raw_account:
                sub_rate = await raw_mosquitto_sub(broker, raw_account, pubs, n)
                print(f"  raw broker -> mosquitto_sub            {sub_rate:>9,.0f} msg/s")
            async with bridge_account(admin) as raw_account:
                aio_rate, aio_cpu = await raw_aiomqtt(broker, raw_account, pubs, n)
                print(
                    f"  raw aiomqtt subscriber                 {aio_rate:>9,.0f} msg/s"
                    f"  (CPU {aio_cpu:.0f} us/msg: {1e6 / aio_cpu:,.0f} msg/s per core)"
                )
            async with bridge_account(admin) as account:
                port = free_port()
                env = {
                    **os.environ,
                    "GATEWAY_DATABASE_URL": url,
                    "GATEWAY_KAFKA_TOPIC_PREFIX": prefix,
                    "GATEWAY_MQTT_USERNAME": account.username,
                    "GATEWAY_MQTT_PASSWORD": account.password,
                    "GATEWAY_MQTT_SHARE_GROUP": account.share_group,
                    "GATEWAY_MQTT_CLIENT_ID": f"bench-gw-{tag}",
                    "GATEWAY_MQTT_SESSION_EXPIRY_S": "60",
                    "GATEWAY_HTTP_PORT": str(port),
                    "GATEWAY_LOG_LEVEL": "WARNING",
                    # A handful of publisher accounts stand for many devices here.
                    "GATEWAY_DEVICE_RATE_PER_S": "0",
                }
                log = (
                    Path(os.environ.get("AUTOGEN_LOCAL_DIR", ".local"))
                    / "logs"
                    / "bench-gateway.log"
                )
                log.parent.mkdir(parents=True, exist_ok=True)
                gw_rate, lost, gw_cpu, proc = await gateway_rate(
                    stack, env, port, log, pubs, n, prefix + device.TELEMETRY.name
                )
                print(
                    f"  gateway broker -> Kafka (acks=all)     {gw_rate:>9,.0f} msg/s, lost {lost}"
                    f"  (targets >= 8,000 and >= 0.7x raw aiomqtt)\n"
                    f"  gateway CPU {gw_cpu:.0f} us/msg: {1e6 / gw_cpu:,.0f} msg/s per core"
                )
                if not args.skip_rss:
                    idle, loaded, connected = await rss_with_devices(
                        broker, admin, proc.pid, args.devices, tag
                    )
                    print(
                        f"  gateway RSS: {idle:.0f} MB right after the rate run, {loaded:.0f} MB "
                        f"with {connected:,} simulated devices connected (target <= 150 MB)"
                    )
        finally:
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=20)
            for device_id, _ in devices:
                await admin.remove_device(device_id)
            await asyncio.gather(
                drop_database(stack.pg_admin_url, db_name),
                delete_topics_with_prefix(stack.kafka_bootstrap_servers, prefix),
            )
    results = [
        metric(
            "raw_aiomqtt_msgs_per_s", aio_rate, "msg/s", sub_rate, "raw broker -> mosquitto_sub"
        ),
        metric("gateway_msgs_per_s", gw_rate, "msg/s", aio_rate, "raw aiomqtt subscriber"),
        metric(
            "gateway_msgs_per_cpu_s", 1e6 / gw_cpu, "msg/s", 1e6 / aio_cpu, "raw aiomqtt subscriber"
        ),
        json.dumps(
            {
                "bench": "ingest",
                "metric": "gateway_lost_messages",
                "value": lost,
                "unit": "messages",
                "baseline": 0,
                "baseline_name": "zero loss",
                "ratio": None,
            }
        ),
    ]
    if not args.skip_rss:
        results.append(
            metric(
                f"gateway_rss_mb_{args.devices}_devices",
                loaded,
                "MB",
                idle,
                "gateway RSS after the rate run",
            )
        )
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
