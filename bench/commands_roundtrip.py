"""Command round trip: POST → device ack → `succeeded` visible by GET, beside a raw MQTT
request → ack round trip, in one run, over the same simulated devices.

1. Raw baseline: a client with a gateway-like broker account publishes the command payload
   straight to `devices/{id}/down/command` (QoS 1) and times the device's `succeeded` ack on
   `devices/{id}/up/ack`. What the broker and the simulator cost.
2. The project's path: `POST /api/v1/devices/{id}/commands` to the commands service (a real
   `python -m commands serve`), its outbox and relay, Kafka, the gateway (`python -m gateway
   serve`), the broker, the device's ack back through the gateway and Kafka into the commands
   service, and `GET /api/v1/commands/{id}` with `Prefer: wait=10`, which the service answers
   as soon as the command has ended: the moment `succeeded` is visible by GET.

Both send `set_setting` (acked `accepted` then `succeeded` at once by the simulator) at a fixed
rate to random devices of a simulated fleet (`python -m gateway.simulator --generate N`).
The HTTP calls go to the commands service directly, with an internal token (not through nginx
and the tokens service's auth_request, whose cost `bench/verify.py` measures), over keep-alive
connections of a lean client (`common.testing.lean_http`: httpx costs ~1.2 ms of Python per
request here, taken from the same two cores as the services).

Needs the local stack (`deploy/local/stack start`). Bounded: N devices, rate x seconds
commands per measurement. Prints readable lines, then one JSON line per metric.

Until session 6 the bench waited for the `succeeded` status event on Kafka and then GET the
command once (polling every command every few ms cost the service more CPU than the commands);
that added the status event's relay and Kafka hop to every figure. The platform phase also
prints, per stage, when the dispatch reached Kafka, when the gateway said `sent`, when the
device's `succeeded` report reached Kafka and when the service's `succeeded` status event was
published, after the POST (where the time goes: `--stages`, which costs CPU of its own), and
how busy the whole machine was.

Figures: services/commands/README.md ("Benchmark").
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from common.auth import Principal
from common.contracts import commands, device, fleet, platform
from common.events import encode, new_event
from common.migrations import upgrade
from common.testing.auth import TestIssuer
from common.testing.lean_http import LeanPool
from common.testing.stack import (
    StackAddresses,
    create_database,
    create_topics,
    delete_topics_with_prefix,
    drop_database,
    free_port,
    load_stack_env,
)
from gateway.dynsec import DynsecAdmin
from gateway.simulator.__main__ import generated
from gateway.simulator.runner import NODELAY
from gateway.testing import BridgeAccount, Broker, admin_session, bridge_account

ADMIN = Principal(user_id="bench-admin", role="admin")
TERMINAL = frozenset({"succeeded", "failed", "rejected", "expired"})
SETTING = {"key": "cooldown_s", "value": 60}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="commands per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="also read the command's topics to show when each stage was reached (costs this "
        "client ~2 ms of CPU per command at 50/s, taken from the machine the services share)",
    )
    return parser.parse_args()


async def start(module: str, env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """`python -m <module> serve`, ready."""
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", module, "serve"], env=env, stdout=out, stderr=out
        )
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            if proc.poll() is not None:
                raise SystemExit(f"{module} exited; see {log}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return proc
            await asyncio.sleep(0.2)
    stop(proc)  # not left running on its own once its database is dropped
    raise SystemExit(f"{module} not ready; see {log}")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


async def paced(
    rate: float, seconds: float, one: Callable[[int], Coroutine[Any, Any, float | None]]
) -> tuple[list[float], int]:
    """Start `one(i)` at `rate` per second for `seconds`; latencies (ms) and failures."""
    count = int(rate * seconds)
    started = time.perf_counter()
    tasks: list[asyncio.Task[float | None]] = []
    for i in range(count):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    results = await asyncio.gather(*tasks)
    done = [r for r in results if r is not None]
    return done, count - len(done)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def raw_round_trips(
    broker: Broker, account: BridgeAccount, ids: list[str], rate: float, seconds: float
) -> tuple[list[float], int]:
    """Publish commands straight to devices; time their `succeeded` acks."""
    waiting: dict[str, asyncio.Future[float]] = {}
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=account.username,
        password=account.password,
        identifier=f"bench-raw-{uuid.uuid4().hex[:6]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=(NODELAY,),  # as the gateway's own client (asyncio sets it)
    ) as client:
        await client.subscribe("devices/+/up/ack", qos=1)

        async def read() -> None:
            async for message in client.messages:
                body = json.loads(message.payload)
                future = waiting.get(body.get("command_id", ""))
                if future is not None and body.get("status") == "succeeded" and not future.done():
                    future.set_result(time.perf_counter())

        reader = asyncio.create_task(read())

        async def one(_: int) -> float | None:
            command_id = str(uuid.uuid4())
            device_id = random.choice(ids)
            expires = datetime.now(UTC) + timedelta(seconds=60)
            payload = json.dumps(
                {
                    "command_id": command_id,
                    "action": "set_setting",
                    "params": SETTING,
                    "expires_at": expires.isoformat(),
                }
            )
            future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            waiting[command_id] = future
            t0 = time.perf_counter()
            try:
                await client.publish(f"devices/{device_id}/down/command", payload, qos=1)
                return (await asyncio.wait_for(future, 10) - t0) * 1000
            except (TimeoutError, aiomqtt.MqttError):
                return None  # counted as lost (a broker too busy to acknowledge in time)

        try:
            return await paced(rate, seconds, one)
        finally:
            reader.cancel()


# The round trips on the critical path of one command, by kind (see `bare_hops`): the accept's
# two statements; the relay's BEGIN and claim before it sends; the gateway's BEGIN and delivery
# record before it publishes; two report batches of two statements each (the `succeeded` waits
# for the `accepted` one's); the GET's read after the wake-up. Kafka: the dispatch and the
# report, and the `succeeded` report's produce waiting for the `accepted` one's (one request in
# flight per broker). HTTP: the POST, and the GET's answer.
PATH_ROUND_TRIPS = {"postgres": 11, "kafka hop": 2, "kafka produce": 1, "http": 2}
HOP_TOPIC = "bench.hop"


async def bare_hops(
    bootstrap: str, topic: str, database_url: str, port: int, issuer: TestIssuer, *, n: int = 200
) -> dict[str, float]:
    """p50 of each kind of hop alone, on this machine now: a Kafka produce (acks=all) and
    the consume of that record; an asyncpg round trip; an HTTP round trip (`/healthz` of the
    commands service, lean client)."""
    found: dict[str, list[float]] = {kind: [] for kind in PATH_ROUND_TRIPS}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="latest")
    await producer.start()
    await consumer.start()
    try:
        await consumer.seek_to_end()
        for i in range(n):
            t0 = time.perf_counter()
            delivery = await producer.send(topic, b"x" * 300, key=str(i).encode())
            while not await consumer.getmany(timeout_ms=1000):
                pass
            found["kafka hop"].append((time.perf_counter() - t0) * 1000)
            await delivery
            await asyncio.sleep(0.01)
        for i in range(n):
            t0 = time.perf_counter()
            await (await producer.send(topic, b"x" * 300, key=str(i).encode()))
            found["kafka produce"].append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.01)
    finally:
        await consumer.stop()
        await producer.stop()
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await conn.fetchval("SELECT 1")
            found["postgres"].append((time.perf_counter() - t0) * 1000)
    finally:
        await conn.close()
    pool = LeanPool(port, issuer.headers(ADMIN))
    for _ in range(n):
        async with pool.connection() as http:
            t0 = time.perf_counter()
            await http.get("/healthz")
            found["http"].append((time.perf_counter() - t0) * 1000)
    return {kind: pct(values, 0.5) for kind, values in found.items()}


class StatusWatch:
    """What the commands service and the gateway publish about each command, with the time this
    process saw it: `command.dispatch.v1` (the commands service's relay published it),
    the gateway's `sent` (its MQTT publish was acknowledged by the broker) and `succeeded`
    (the commands service committed the device's ack). `succeeded` is the signal to GET a
    command once, instead of polling every command (a poll per command every few ms costs the
    service more CPU than the commands themselves on a small machine); the others show where
    the time goes."""

    STAGES = ("dispatched", "sent", "device succeeded", "succeeded")

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self._consumer = AIOKafkaConsumer(
            prefix + commands.DISPATCH.name, prefix + commands.STATUS.name,
            prefix + device.REPORT.name,
            bootstrap_servers=bootstrap, auto_offset_reset="latest", group_id=None,
            fetch_max_wait_ms=50,
        )  # fmt: skip
        self.seen: dict[str, dict[str, float]] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "StatusWatch":
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _read(self) -> None:
        async for record in self._consumer:
            at = time.perf_counter()
            data = json.loads(record.value or b"{}").get("data", {})
            stages = self.seen.setdefault(data.get("command_id", ""), {})
            if record.topic.endswith(commands.DISPATCH.name):
                stages.setdefault("dispatched", at)
            elif record.topic.endswith(device.REPORT.name):
                if data.get("status") == "succeeded":
                    stages.setdefault("device succeeded", at)
            elif data.get("reporter") == "gateway" and data.get("status") == "sent":
                stages.setdefault("sent", at)
            elif data.get("reporter") == "commands" and data.get("status") == "succeeded":
                stages.setdefault("succeeded", at)

    def stages(self, started: dict[str, float]) -> str:
        """p50/p99 of each stage's time after the POST, over the commands in `started`."""
        parts = []
        for stage in self.STAGES:
            times = [
                (self.seen[c][stage] - t0) * 1000
                for c, t0 in started.items()
                if stage in self.seen.get(c, {})
            ]
            parts.append(
                f"{stage} p50 {pct(times, 0.5):.0f} / p99 {pct(times, 0.99):.0f} ms "
                f"({len(times)} of {len(started)})"
            )
        return "; ".join(parts)


async def platform_round_trips(
    port: int, issuer: TestIssuer, watch: StatusWatch | None, ids: list[str], *, rate: float,
    seconds: float,
) -> tuple[list[float], int]:  # fmt: skip
    """POST, then one GET with `Prefer: wait=10`, answered when the command has ended."""
    pool = LeanPool(port, issuer.headers(ADMIN))
    outcomes: dict[str, int] = {}

    def failed(why: str) -> None:
        outcomes[why] = outcomes.get(why, 0) + 1

    async def one(_: int) -> float | None:
        device_id = random.choice(ids)
        body = {"action": "set_setting", "params": SETTING}
        t0 = time.perf_counter()
        try:
            async with pool.connection() as http:
                status, answer = await http.post(f"/api/v1/devices/{device_id}/commands", body)
                if status != 202:
                    failed(f"POST {status}")
                    return None
                command_id = json.loads(answer)["id"]
                started[command_id] = t0
                answered.append((time.perf_counter() - t0) * 1000)
                while (left := t0 + 10 - time.perf_counter()) > 0:
                    status, answer = await http.get(
                        f"/api/v1/commands/{command_id}", headers={"Prefer": f"wait={left:.0f}"}
                    )
                    if status != 200:
                        failed(f"GET {status}")
                        return None
                    if (state := json.loads(answer)["status"]) in TERMINAL:
                        if state != "succeeded":
                            failed(state)
                            return None
                        return (time.perf_counter() - t0) * 1000
        except (OSError, asyncio.IncompleteReadError):
            failed("connection error")
            return None
        failed("not succeeded in 10 s")
        return None

    started: dict[str, float] = {}
    answered: list[float] = []
    try:
        return await paced(rate, seconds, one)
    finally:
        await pool.close()
        if outcomes:
            print(f"  failures: {outcomes}", flush=True)
        print(
            f"  POST answered (202) p50 {pct(answered, 0.5):.0f} / p99 "
            f"{pct(answered, 0.99):.0f} ms",
            flush=True,
        )
        if watch is not None:
            print(f"  after the POST, seen on Kafka: {watch.stages(started)}", flush=True)


async def wait_known(base: str, issuer: TestIssuer, ids: list[str]) -> None:
    """Until the commands service's projection has every device (bounded)."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        end = time.monotonic() + 120
        pending = list(ids)
        while pending and time.monotonic() < end:
            r = await http.get(f"/devices/{pending[-1]}/commands", headers=issuer.headers(ADMIN))
            if r.status_code == 200:
                pending.pop()
            else:
                await asyncio.sleep(0.2)


async def register_fleet(bootstrap: str, prefix: str, rows: list[dict[str, Any]]) -> None:
    """What the fleet service would publish: one ownership snapshot per device."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for row in rows:
            data = fleet.FleetDevice(
                device_id=row["id"],
                name=row["id"],
                model=row["model"],
                engine=row["engine"],
                transport=row["transport"],
                gps=row["gps"],
                dealer_id="bench-dealer",
            )
            event = new_event(
                type=fleet.DEVICE.event_type, data=data, source="bench", key=row["id"]
            )
            await producer.send(prefix + fleet.DEVICE.name, encode(event), key=row["id"].encode())
        await producer.flush()
    finally:
        await producer.stop()


async def wait_online(bootstrap: str, topic: str, ids: set[str], deadline_s: float) -> int:
    """Until every device published `online` (or the deadline); returns how many did."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    online: set[str] = set()
    try:
        end = time.monotonic() + deadline_s
        while not ids <= online and time.monotonic() < end:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    data = json.loads(record.value or b"{}")["data"]
                    if data["state"] == "online":
                        online.add(data["device_id"])
    finally:
        await consumer.stop()
    return len(online & ids)


def served(procs: list[subprocess.Popen[bytes]]) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """The gateway and the commands service (started first, in that order)."""
    return list(zip(("gateway", "commands"), procs[:2], strict=False))


def stack_pids() -> dict[str, list[int]]:
    """The local stack's processes by name (PostgreSQL: the postmaster and its backends), from
    its pid files; what is not found is left out."""
    run = Path(os.environ.get("AUTOGEN_LOCAL_DIR", ".local")) / "run"
    found: dict[str, list[int]] = {}
    for name in ("kafka", "mosquitto", "postgres"):
        with contextlib.suppress(OSError, ValueError):
            found[name] = [int((run / f"{name}.pid").read_text().split()[0])]
    if "postgres" in found:
        postmaster = found["postgres"][0]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    found["postgres"].append(int(stat.parent.name))
    return found


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each of these processes still running."""
    found: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = cpu_s(pid)
    return found


def cpu_since(before: dict[int, float], pids: list[int]) -> float:
    """CPU seconds these processes used since `before` (a process started meanwhile: all of
    its time; one that exited meanwhile is not seen)."""
    return sum(now - before.get(pid, 0.0) for pid, now in cpu_by_pid(pids).items())


def machine_busy_s() -> "Busy":
    """Busy and total CPU time of the whole machine so far (Linux /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, steal = fields[3] + fields[4], fields[7]  # idle + iowait; what the hypervisor took
    return Busy(sum(fields) - idle - steal, sum(fields), steal)


@dataclass(frozen=True)
class Busy:
    """CPU ticks: busy and total, over every core."""

    busy: int
    total: int
    steal: int

    def __sub__(self, other: "Busy") -> "Busy":
        return Busy(self.busy - other.busy, self.total - other.total, self.steal - other.steal)

    def cores(self, ticks: int | None = None) -> float:
        """How many cores were busy (or, given `ticks`, spent on those) on average."""
        spent = self.busy if ticks is None else ticks
        return spent / self.total * (os.cpu_count() or 1) if self.total else float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc): what a command costs, which
    latency alone hides once the machine is saturated."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StatementCounts:
    """Statements each bench database ran during a phase, from `pg_stat_statements` (the local
    stack loads it; without it these lines are left out)."""

    def __init__(self, admin_url: str, databases: dict[str, str]) -> None:
        self._url = admin_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._databases = databases  # service -> database name
        self._before: dict[tuple[str, str], tuple[int, str]] = {}

    async def _snapshot(self) -> dict[tuple[str, str], tuple[int, str]] | None:
        conn = await asyncpg.connect(self._url)
        try:
            rows = await conn.fetch(
                "SELECT d.datname, s.queryid::text AS qid, sum(s.calls)::bigint AS calls,"
                " min(s.query) AS query FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = ANY($1::text[])"
                " GROUP BY d.datname, s.queryid",
                list(self._databases.values()),
            )
        except asyncpg.PostgresError:
            return None  # no pg_stat_statements here
        finally:
            await conn.close()
        return {(r["datname"], r["qid"]): (r["calls"], r["query"]) for r in rows}

    async def start(self) -> None:
        self._before = await self._snapshot() or {}

    async def report(self, commands_sent: int, top: int = 25) -> None:
        """Per command: transactions (BEGINs), statements, and the most frequent ones."""
        after = await self._snapshot()
        if after is None or not commands_sent:
            return
        for service, db in self._databases.items():
            delta = sorted(
                (
                    (calls - self._before.get(key, (0, ""))[0], query)
                    for key, (calls, query) in after.items()
                    if key[0] == db
                ),
                reverse=True,
            )
            total = sum(c for c, _ in delta)
            begins = sum(c for c, q in delta if q.strip().upper() == "BEGIN")
            print(
                f"  {service} database per command: {begins / commands_sent:.1f} transactions, "
                f"{total / commands_sent:.1f} statements",
                flush=True,
            )
            for calls, query in delta[:top]:
                if calls:
                    text = " ".join(query.split())[:110]
                    print(f"    {calls / commands_sent:5.2f}  {text}", flush=True)


def metric(name: str, value: float, baseline: float) -> str:
    return json.dumps(
        {
            "bench": "commands_roundtrip",
            "metric": name,
            "value": round(value, 1),
            "unit": "ms",
            "baseline": round(baseline, 1),
            "baseline_name": "raw MQTT command -> device ack",
            "ratio": round(value / baseline, 2) if baseline else None,
        }
    )


async def main() -> int:  # noqa: PLR0915 - one bounded run, start to cleanup
    args = parse_args()
    load_stack_env(Path.cwd())
    stack = StackAddresses.from_env(os.environ)
    if stack is None:
        print("start the local stack first: deploy/local/stack start", file=sys.stderr)
        return 2
    broker = Broker.from_env()
    tag = uuid.uuid4().hex[:6]
    prefix = f"bench.{tag}."
    names: list[Any] = [
        commands.REQUEST, commands.DISPATCH, commands.STATUS, device.TELEMETRY, device.PRESENCE,
        device.REPORT, device.DEADLETTER, fleet.DEVICE, platform.DEADLETTER,
    ]  # fmt: skip
    await create_topics(
        stack.kafka_bootstrap_servers,
        [prefix + t.name for t in names] + [prefix + "firmware.release.v1"],
        partitions=6,
    )
    await create_topics(stack.kafka_bootstrap_servers, [prefix + HOP_TOPIC], partitions=1)
    hops: dict[str, float] = {}
    dbs = {svc: f"bench_{svc}_{tag}" for svc in ("commands", "gateway")}
    urls = {svc: await create_database(stack.pg_admin_url, db) for svc, db in dbs.items()}
    for svc, url in urls.items():
        await asyncio.to_thread(upgrade, url, svc)
    logs = Path(os.environ.get("AUTOGEN_LOCAL_DIR", ".local")) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = generated(args.devices, f"bcmd-{tag}-", None, None)
    ids = [row["id"] for row in rows]
    issuer = TestIssuer()
    print(
        f"commands round trip: {args.devices} simulated devices, {args.rate:g} commands/s for "
        f"{args.seconds:g} s per measurement, on {os.cpu_count()} cores"
    )
    procs: list[subprocess.Popen[bytes]] = []
    async with admin_session(broker) as admin:
        try:
            async with bridge_account(admin) as account, bridge_account(admin) as raw_account:
                load_user, load_password = await load_account(admin, tag)
                gw_port, cmd_port = free_port(), free_port()
                gw_env = {
                    **os.environ,
                    "GATEWAY_DATABASE_URL": urls["gateway"],
                    "GATEWAY_KAFKA_TOPIC_PREFIX": prefix,
                    "GATEWAY_MQTT_USERNAME": account.username,
                    "GATEWAY_MQTT_PASSWORD": account.password,
                    "GATEWAY_MQTT_SHARE_GROUP": account.share_group,
                    "GATEWAY_MQTT_CLIENT_ID": f"bench-gw-{tag}",
                    "GATEWAY_MQTT_SESSION_EXPIRY_S": "60",
                    "GATEWAY_HTTP_PORT": str(gw_port),
                    "GATEWAY_LOG_LEVEL": "WARNING",
                    "GATEWAY_OUTBOX_POLL_INTERVAL_S": "0.01",
                    "GATEWAY_DISPATCH_GROUP_ID": f"bench-{tag}.gateway.dispatch",
                }
                procs.append(await start("gateway", gw_env, gw_port, logs / "bench-gateway.log"))
                with issuer.serve_jwks() as jwks_url:
                    cmd_env = {
                        **os.environ,
                        "COMMANDS_DATABASE_URL": urls["commands"],
                        "COMMANDS_KAFKA_TOPIC_PREFIX": prefix,
                        "COMMANDS_HTTP_PORT": str(cmd_port),
                        "COMMANDS_JWKS_URL": jwks_url,
                        "COMMANDS_LOG_LEVEL": "WARNING",
                    }
                    procs.append(
                        await start("commands", cmd_env, cmd_port, logs / "bench-commands.log")
                    )
                    await register_fleet(stack.kafka_bootstrap_servers, prefix, rows)
                    sim = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                        [
                            sys.executable, "-m", "gateway.simulator",
                            "--generate", str(args.devices), "--id-prefix", f"bcmd-{tag}-",
                            "--username", load_user, "--password", load_password,
                            "--telemetry-interval", "30", "--time-factor", "1",
                            "--log-level", "WARNING",
                        ],
                        stdout=subprocess.DEVNULL,
                    )  # fmt: skip
                    procs.append(sim)
                    online = await wait_online(
                        stack.kafka_bootstrap_servers,
                        prefix + device.PRESENCE.name,
                        set(ids),
                        deadline_s=180,
                    )
                    print(f"  {online} of {args.devices} devices online", flush=True)
                    base = f"http://127.0.0.1:{cmd_port}/api/v1"
                    await wait_known(base, issuer, ids)
                    watch = (
                        StatusWatch(stack.kafka_bootstrap_servers, prefix) if args.stages else None
                    )
                    async with watch or contextlib.nullcontext():
                        # Warm-up: connections, consumer groups, caches (not measured).
                        await platform_round_trips(
                            cmd_port, issuer, watch, ids, rate=args.rate, seconds=2
                        )
                        raw, raw_lost = await raw_round_trips(
                            broker, raw_account, ids, args.rate, args.seconds
                        )
                        statements = StatementCounts(stack.pg_admin_url, dbs)
                        await statements.start()
                        before = {name: cpu_s(proc.pid) for name, proc in served(procs)}
                        others = {
                            **stack_pids(),
                            "simulator": [sim.pid],
                            "this client": [os.getpid()],
                        }
                        others_before = {name: cpu_by_pid(p) for name, p in others.items()}
                        busy_before = machine_busy_s()
                        ours, ours_lost = await platform_round_trips(
                            cmd_port, issuer, watch, ids, rate=args.rate, seconds=args.seconds
                        )
                        busy = machine_busy_s() - busy_before
                        print(
                            f"  machine: {busy.cores():.2f} of {os.cpu_count()} cores busy "
                            "over the phase (every process: the stack, the services, the "
                            f"simulator and this client), {busy.cores(busy.steal):.2f} taken "
                            "by the hypervisor (steal)",
                            flush=True,
                        )
                        sent = int(args.rate * args.seconds)
                        print(
                            "  CPU per command (the phase's CPU time over its commands): "
                            + ", ".join(
                                f"{name} {(cpu_s(proc.pid) - before[name]) / sent * 1000:.1f} ms"
                                for name, proc in served(procs)
                            ),
                            flush=True,
                        )
                        # PostgreSQL's backends come and go: those running at the end count.
                        others["postgres"] = stack_pids().get("postgres", [])
                        print(
                            "  and the rest of the machine per command: "
                            + ", ".join(
                                f"{name} {cpu_since(others_before[name], p) / sent * 1000:.1f} ms"
                                for name, p in others.items()
                            ),
                            flush=True,
                        )
                        await statements.report(sent)
                        hops = await bare_hops(
                            stack.kafka_bootstrap_servers,
                            prefix + HOP_TOPIC,
                            urls["commands"],
                            cmd_port,
                            issuer,
                        )
        finally:
            for proc in reversed(procs):
                stop(proc)
            with contextlib.suppress(Exception):
                await remove_load_account(admin, tag)
            for db in dbs.values():
                await drop_database(stack.pg_admin_url, db)
            await delete_topics_with_prefix(stack.kafka_bootstrap_servers, prefix)
    for label, values, lost in (
        ("raw MQTT command -> device ack", raw, raw_lost),
        ("POST -> ack -> succeeded by GET", ours, ours_lost),
    ):
        print(
            f"  {label:<34} p50 {pct(values, 0.5):7.1f} ms  p99 {pct(values, 0.99):7.1f} ms  "
            f"mean {statistics.fmean(values) if values else float('nan'):7.1f} ms  "
            f"n={len(values)} lost={lost}"
        )
    if hops:
        floor = pct(raw, 0.5) + sum(hops[k] * count for k, count in PATH_ROUND_TRIPS.items())
        print(
            "  bare hops in this run, p50: "
            + ", ".join(f"{kind} {ms:.2f} ms" for kind, ms in hops.items())
            + f"; the path's own I/O ({', '.join(f'{c} {k}' for k, c in PATH_ROUND_TRIPS.items())}"
            f", and the raw MQTT round trip) adds up to {floor:.1f} ms with no service work"
        )
    print("  targets: p50 <= 15 ms, p99 <= 50 ms")
    print(metric("post_to_succeeded_p50_ms", pct(ours, 0.5), pct(raw, 0.5)))
    print(metric("post_to_succeeded_p99_ms", pct(ours, 0.99), pct(raw, 0.99)))
    return 0


async def load_account(admin: DynsecAdmin, tag: str) -> tuple[str, str]:
    """One broker account for all simulated devices (a thousand accounts are slow to make)."""
    username, password = f"bench-cmd-{tag}", uuid.uuid4().hex
    role = f"bench-cmd-{tag}"
    await admin.execute(
        [
            {"command": "createRole", "rolename": role},
            *(
                {"command": "addRoleACL", "rolename": role, "acltype": kind, "topic": topic,
                 "allow": True}
                for kind, topic in (
                    ("publishClientSend", "devices/+/up/#"),
                    ("subscribePattern", "devices/+/down/#"),
                )
            ),
            {"command": "createClient", "username": username, "password": password,
             "roles": [{"rolename": role}]},
        ]
    )  # fmt: skip
    return username, password


async def remove_load_account(admin: DynsecAdmin, tag: str) -> None:
    await admin.execute(
        [
            {"command": "deleteClient", "username": f"bench-cmd-{tag}"},
            {"command": "deleteRole", "rolename": f"bench-cmd-{tag}"},
        ]
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
