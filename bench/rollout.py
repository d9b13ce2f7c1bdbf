"""Rollout benchmark: 10,000 simulated devices with fast OTA, unthrottled then throttled.

The firmware service runs as its own process (`python -m firmware serve`) on a fresh database
and a unique topic prefix. The devices (and the commands service's status) are played by a raw
aiokafka driver that answers every `command.request.v1` at once with the device protocol's
events (acked, downloading, installing, rebooting, offline, online with the new version): the
simulator cannot hold 10k MQTT sessions here, so device events go straight onto Kafka.

Measured, in one run:
1. baseline: a bare aiokafka producer writing 10,000 command requests (the dispatch ceiling);
2. unthrottled rollout: dispatch rate, two ways: the requests' Kafka timestamps (first to last
   published by the service's outbox relay, which also publishes every device's state changes),
   and devices per second from `POST /rollouts` until no device is pending any more (each one
   committed as `sent` with its request in the outbox); time until every device is confirmed;
3. throttled rollout (`max_per_minute`): requests published within a fixed window (default
   30 s, from 10 s after the first) per minute, against the setting; and over the whole run.

Figures (2 cores shared with the stack; before = e73edbb, after = this revision, same moment):
committed dispatch 1,882 -> 7,390 devices/s, published to Kafka 2,109 -> 3,506 devices/s (raw
producer 21,604-22,761/s), all 10k confirmed 19.4 -> 9.3 s, pace at 12,000/min 0.998 -> 0.996
over a 30 s window (1.011 -> 1.007 over the whole run). See services/firmware/README.md.

Needs the local stack (`deploy/local/stack start`). Not a test: nothing here asserts a time.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel
from sqlalchemy import func, select

from common.auth import Principal
from common.contracts import ALL_TOPICS, commands, device, fleet
from common.contracts.topic import Topic
from common.db import make_engine
from common.events import encode, new_event
from common.migrations import upgrade
from common.testing.auth import TestIssuer
from common.testing.stack import (
    create_database,
    create_topics,
    delete_topics_with_prefix,
    drop_database,
    free_port,
    load_stack_env,
)
from firmware import store

ADMIN = Principal(user_id="bench-admin", role="admin")
DEALER = "bench-dealer"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--max-per-minute", type=int, default=12_000)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument(
        "--window-s",
        type=float,
        default=30.0,
        help="throttled run: the pace is counted over this window (bounded, past the start)",
    )
    parser.add_argument("--window-start-s", type=float, default=10.0)
    return parser.parse_args()


def envelope(topic: Topic[Any], key: str, data: BaseModel) -> bytes:
    return encode(new_event(type=topic.event_type, data=data, source="bench", key=key))


class Devices:
    """The fake fleet: answers each OTA request with the whole device-side story at once."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.versions: dict[str, str] = {}
        self.requests: dict[str, list[int]] = {}  # rollout id -> Kafka timestamps (ms)
        self.last_answer: dict[str, float] = {}  # rollout id -> monotonic time of last answer
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)

    async def send(self, topic: Topic[Any], key: str, data: BaseModel) -> None:
        await self.producer.send(
            self.prefix + topic.name, envelope(topic, key, data), key=key.encode()
        )

    async def register(self, count: int) -> list[str]:
        ids = [f"BENCH-{i:05d}" for i in range(count)]
        now = datetime.now(UTC)
        for device_id in ids:
            await self.send(
                fleet.DEVICE,
                device_id,
                fleet.FleetDevice(
                    device_id=device_id,
                    name=device_id,
                    model="Ultra",
                    transport="wifi",
                    gps=False,
                    dealer_id=DEALER,
                ),
            )
            await self.send(
                device.PRESENCE,
                device_id,
                device.DevicePresence(
                    device_id=device_id, received_at=now, state="online", fw="1.0.0"
                ),
            )
        await self.producer.flush()
        return ids

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            self.prefix + commands.REQUEST.name,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
        )
        await consumer.start()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
                for records in batches.values():
                    for record in records:
                        await self._answer(record)
        finally:
            await consumer.stop()

    async def _answer(self, record: Any) -> None:
        request = commands.REQUEST.parse(record.value).data
        rollout_id = request.correlation.get("rollout_id", "")
        self.requests.setdefault(rollout_id, []).append(record.timestamp)
        device_id, command_id = request.device_id, f"cmd-{uuid.uuid4().hex[:12]}"
        now = datetime.now(UTC)
        await self.send(
            commands.STATUS,
            device_id,
            commands.CommandStatus(
                command_id=command_id,
                device_id=device_id,
                action=request.action,
                status="acked",
                at=now,
                correlation=request.correlation,
            ),
        )
        for phase in ("downloading", "installing", "rebooting"):
            await self.send(
                device.REPORT,
                device_id,
                device.DeviceReport(
                    device_id=device_id,
                    received_at=now,
                    kind="ota",
                    command_id=command_id,
                    phase=phase,
                ),
            )
        version = self.versions[request.params["release_id"]]
        for state, fw in (("offline", None), ("online", version)):
            await self.send(
                device.PRESENCE,
                device_id,
                device.DevicePresence(
                    device_id=device_id, received_at=datetime.now(UTC), state=state, fw=fw
                ),
            )
        self.last_answer[rollout_id] = time.monotonic()


async def raw_baseline(bootstrap: str, topic: str, count: int) -> float:
    """Command requests per second from a bare aiokafka producer (same envelope, same acks)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        started = time.perf_counter()
        futures = []
        for i in range(count):
            device_id = f"RAW-{i:05d}"
            data = commands.CommandRequest(
                request_id=f"raw:{device_id}:1",
                device_id=device_id,
                action="force_ota",
                params={"release_id": "raw"},
                ttl_s=600,
                requested_by="bench",
                correlation={"rollout_id": "raw", "device_id": device_id, "attempt": "1"},
            )
            futures.append(
                await producer.send(
                    topic, envelope(commands.REQUEST, device_id, data), key=device_id.encode()
                )
            )
        await asyncio.gather(*futures)
        return count / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def wait_for(check: Any, limit_s: float, what: str, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        await asyncio.sleep(every_s)


async def rollout(
    client: httpx.AsyncClient,
    issuer: TestIssuer,
    devices: Devices,
    *,
    version: str,
    count: int,
    max_per_minute: int | None,
    limit_s: float,
    window: tuple[float, float] = (0.0, 1.0),
) -> dict[str, float]:
    """One rollout to every device; returns its figures."""
    headers = issuer.headers(ADMIN)
    release = await client.post(
        "/api/v1/firmware/releases",
        headers=headers,
        json={
            "console": "ultra",
            "version": version,
            "models": ["Ultra"],
            "transport": "wifi",
            "artifact_url": f"https://firmware.example/ultra-{version}.bin",
            "sha256": "cd" * 32,
            "size": 4096,
        },
    )
    release.raise_for_status()
    devices.versions[release.json()["id"]] = version
    started = time.monotonic()
    created = await client.post(
        "/api/v1/rollouts",
        headers=headers,
        json={
            "release_id": release.json()["id"],
            "scope": "my_fleet",
            "dealer_id": DEALER,
            "strategy": {
                "batch_size": count,
                "max_per_minute": max_per_minute,
                "failure_threshold_pct": 50,
            },
            "override": True,
            "override_reason": "benchmark",
        },
    )
    created.raise_for_status()
    rollout_id = created.json()["id"]

    dispatched_at: list[float] = []

    async def completed() -> bool:
        r = await client.get(f"/api/v1/rollouts/{rollout_id}", headers=issuer.headers(ADMIN))
        if not dispatched_at and r.json()["counts"].get("pending", 0) == 0:
            # Every device is `sent` or beyond: its request committed to the service's outbox.
            dispatched_at.append(time.monotonic())
        return bool(r.json()["status"] == "completed")

    await wait_for(completed, limit_s, f"rollout {rollout_id} to complete", every_s=0.05)
    elapsed = time.monotonic() - started
    final = (
        await client.get(f"/api/v1/rollouts/{rollout_id}", headers=issuer.headers(ADMIN))
    ).json()
    stamps = sorted(devices.requests.get(rollout_id, []))
    span_s = max(1e-3, (stamps[-1] - stamps[0]) / 1000)
    # The pace over a fixed window past the start: requests published in it, per minute.
    start = stamps[0] + window[0] * 1000
    end = start + window[1] * 1000
    in_window = sum(1 for t in stamps if start <= t < end)
    return {
        "window_per_min": in_window * 60 / window[1] if stamps[-1] >= end else float("nan"),
        "window_count": in_window,
        "confirmed": final["counts"]["confirmed"],
        "failed": final["counts"]["failed"],
        "requests": len(stamps),
        "dispatch_per_s": (len(stamps) - 1) / span_s,
        "committed_per_s": len(stamps) / max(1e-3, dispatched_at[0] - started),
        "committed_s": dispatched_at[0] - started,
        "dispatch_span_s": span_s,
        "all_confirmed_s": elapsed,
        "devices_done_s": devices.last_answer.get(rollout_id, time.monotonic()) - started,
    }


async def main() -> int:  # noqa: PLR0915 - one linear script
    args = parse_args()
    load_stack_env(__import__("pathlib").Path.cwd())
    bootstrap = os.environ["AUTOGEN_KAFKA_BOOTSTRAP_SERVERS"]
    admin_url = os.environ["AUTOGEN_PG_ADMIN_URL"]
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    database = f"bench_firmware_{uuid.uuid4().hex[:8]}"
    raw_topic = f"{prefix}bench.raw.requests"
    names = [prefix + t.name for t in ALL_TOPICS] + [raw_topic]
    await create_topics(bootstrap, names, partitions=6)
    url = await create_database(admin_url, database)
    await asyncio.to_thread(upgrade, url, "firmware")
    issuer = TestIssuer()
    jwks = contextlib.ExitStack()
    jwks_url = jwks.enter_context(issuer.serve_jwks())
    port = free_port()
    env = dict(os.environ) | {
        "FIRMWARE_DATABASE_URL": url,
        "FIRMWARE_KAFKA_TOPIC_PREFIX": prefix,
        "FIRMWARE_HTTP_PORT": str(port),
        "FIRMWARE_JWKS_URL": jwks_url,
        "FIRMWARE_DISPATCH_INTERVAL_S": "0.1",
        "FIRMWARE_DISPATCH_MAX_PER_PASS": "5000",
        "FIRMWARE_OUTBOX_BATCH_SIZE": "5000",
        "FIRMWARE_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "firmware",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    devices = Devices(bootstrap, prefix)
    await devices.producer.start()
    driver = asyncio.create_task(devices.run())
    engine = make_engine(url, pool_size=1)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, 60, "the firmware service")
            baseline = await raw_baseline(bootstrap, raw_topic, args.devices)
            print(
                f"baseline: bare aiokafka producer, {args.devices} command requests: "
                f"{baseline:,.0f}/s"
            )
            await devices.register(args.devices)

            async def projected() -> bool:
                async with engine.connect() as conn:
                    count = await conn.scalar(
                        select(func.count()).select_from(store.device_presence)
                    )
                return bool(int(count or 0) >= args.devices)

            await wait_for(projected, 120, "the device projection")
            fast = await rollout(
                client,
                issuer,
                devices,
                version="2.0.0",
                count=args.devices,
                max_per_minute=None,
                limit_s=args.timeout_s,
            )
            print(
                f"unthrottled: {fast['requests']:.0f} dispatched in {fast['dispatch_span_s']:.2f}s "
                f"= {fast['dispatch_per_s']:,.0f} devices/s published to Kafka; all dispatched "
                f"(committed with their request to the outbox) {fast['committed_s']:.2f}s after "
                f"POST /rollouts = {fast['committed_per_s']:,.0f} devices/s; "
                f"all {fast['confirmed']:.0f} confirmed "
                f"after {fast['all_confirmed_s']:.1f}s (devices had answered after "
                f"{fast['devices_done_s']:.1f}s); failed {fast['failed']:.0f}"
            )
            slow = await rollout(
                client,
                issuer,
                devices,
                version="3.0.0",
                count=args.devices,
                max_per_minute=args.max_per_minute,
                limit_s=args.timeout_s,
                window=(args.window_start_s, args.window_s),
            )
            achieved = slow["window_per_min"]
            whole = slow["dispatch_per_s"] * 60
            print(
                f"throttled at {args.max_per_minute:,}/min: {slow['window_count']:.0f} requests "
                f"published in {args.window_s:g}s from {args.window_start_s:g}s after the first "
                f"= {achieved:,.0f}/min ({achieved / args.max_per_minute:.4f} of the setting); "
                f"whole run {whole:,.0f}/min over {slow['dispatch_span_s']:.1f}s "
                f"({whole / args.max_per_minute:.4f}); all {slow['confirmed']:.0f} confirmed "
                f"after {slow['all_confirmed_s']:.1f}s"
            )
            if math.isnan(achieved):  # the run ended inside the window
                raise SystemExit("the throttled run was shorter than the window; more devices")
    finally:
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        await devices.producer.stop()
        if process.returncode is None:
            process.terminate()
            await process.wait()
        jwks.close()
        await engine.dispose()
        await drop_database(admin_url, database)
        await delete_topics_with_prefix(bootstrap, prefix)

    metrics = [
        (
            "dispatch_devices_per_s",
            fast["dispatch_per_s"],
            "devices/s",
            baseline,
            "bare aiokafka producer of command requests",
        ),
        (
            "dispatch_committed_devices_per_s",
            fast["committed_per_s"],
            "devices/s",
            baseline,
            "bare aiokafka producer of command requests",
        ),
        (
            "time_to_all_confirmed_s",
            fast["all_confirmed_s"],
            "s",
            fast["devices_done_s"],
            "devices' last answer published (driver side)",
        ),
        (
            "throttled_dispatch_per_min",
            achieved,
            "devices/min",
            float(args.max_per_minute),
            "configured max_per_minute",
        ),
        (
            "throttled_dispatch_per_min_whole_run",
            whole,
            "devices/min",
            float(args.max_per_minute),
            "configured max_per_minute",
        ),
        (
            "throttled_time_to_all_confirmed_s",
            slow["all_confirmed_s"],
            "s",
            args.devices / args.max_per_minute * 60,
            "devices / max_per_minute",
        ),
    ]
    for metric, value, unit, base, base_name in metrics:
        print(
            json.dumps(
                {
                    "bench": "rollout",
                    "metric": metric,
                    "value": round(value, 2),
                    "unit": unit,
                    "baseline": round(base, 2),
                    "baseline_name": base_name,
                    "ratio": round(value / base, 3) if base else None,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
