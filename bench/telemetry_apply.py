"""Telemetry from Kafka into device state: the fleet's batch consumer against bare aiokafka.

Seeds a throwaway database with devices (the fleet's migrations; COPY), produces telemetry
envelopes for them to a throwaway prefixed topic, then reads the same records twice:
1. baseline: a bare aiokafka consumer that only fetches the records (the ceiling);
2. the project's path: the fleet service's telemetry consumer (FastStream batch subscriber,
   envelope validation, per-device coalescing, one UPDATE ... FROM unnest per batch plus the
   position ring, offsets committed after the write), running in the app's lifespan.
Rates are measured from the first record (or batch) to the last, so consumer-group joins are
not counted. Topics stay (prefixed `bench-...`); the database is dropped at the end.
"""

import argparse
import asyncio
import json
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import SecretStr

from common.contracts import device, platform
from common.events import encode, new_event
from common.migrations import upgrade
from common.testing.stack import (
    StackAddresses,
    create_database,
    create_topics,
    drop_database,
    load_stack_env,
)
from fleet.app import create_app
from fleet.settings import FleetSettings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2000, help="max records per batch")
    return parser.parse_args()


async def seed(url: str, count: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        rows = [
            (f"TB{n:07d}", f"Bench {n}", "X Pro", None, "gsm", True, "dealer-bench")
            for n in range(count)
        ]
        await conn.copy_records_to_table(
            "devices",
            records=rows,
            columns=["id", "name", "model", "engine", "transport", "gps", "dealer_id"],
        )
        await conn.execute("ANALYZE devices")
    finally:
        await conn.close()


async def produce(bootstrap: str, topic: str, events: int, devices: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024, acks=1
    )
    await producer.start()
    try:
        started = time.perf_counter()
        pending = []
        for n in range(events):
            device_id = f"TB{n % devices:07d}"
            now = datetime.now(UTC)
            data = device.DeviceTelemetry(
                device_id=device_id, received_at=now, ts=now, run_state="running",
                battery_v=12.6, fuel_pct=55.0, engine_hours=100 + n / 1000,
                lat=30 + (n % 100) / 1000, lon=-97 + (n % 77) / 1000,
            )  # fmt: skip
            event = new_event(type=device.TELEMETRY.event_type, data=data, source="bench",
                              key=device_id)  # fmt: skip
            pending.append(await producer.send(topic, encode(event), key=device_id.encode()))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        print(f"  produced {events:,} telemetry events in {time.perf_counter() - started:.1f} s")
    finally:
        await producer.stop()


async def raw_consume(bootstrap: str, topic: str, events: int) -> float:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )  # fmt: skip
    await consumer.start()
    try:
        seen, first = 0, None
        async with asyncio.timeout(300):
            while seen < events:
                batches = await consumer.getmany(timeout_ms=1000, max_records=2000)
                got = sum(len(records) for records in batches.values())
                if got and first is None:
                    first = time.perf_counter()
                    got_first = got
                seen += got
        if first is None:
            raise SystemExit("no records")
        return (events - got_first) / (time.perf_counter() - first)
    finally:
        await consumer.stop()


async def fleet_consume(settings: FleetSettings, events: int) -> float:
    app = create_app(settings)
    stats = app.state.consumers.telemetry
    async with app.router.lifespan_context(app), asyncio.timeout(600):
        while stats.handled == 0:  # noqa: ASYNC110 - polling the consumer's counters
            await asyncio.sleep(0.005)
        first, first_count = time.perf_counter(), stats.handled
        while stats.handled + stats.dead_lettered < events:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - first
        if stats.dead_lettered:
            raise SystemExit(f"{stats.dead_lettered} records were dead-lettered")
        print(f"  fleet consumer: {stats.batches} batches, {stats.retried} retries")
    return float((events - first_count) / elapsed)


async def main() -> None:
    args = parse_args()
    load_stack_env(Path.cwd())
    stack = StackAddresses.from_env(os.environ)
    if stack is None:
        raise SystemExit("start the local stack first (deploy/local/stack start)")
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    topic = prefix + device.TELEMETRY.name
    await create_topics(
        stack.kafka_bootstrap_servers,
        [prefix + t.name for t in (device.TELEMETRY, device.PRESENCE, device.REPORT,
                                   platform.DEADLETTER)] + [prefix + "fleet.device.v1"],
        partitions=6,
    )  # fmt: skip
    name = f"bench_fleet_{uuid.uuid4().hex[:8]}"
    url = await create_database(stack.pg_admin_url, name)
    print(f"telemetry apply: {args.events:,} events for {args.devices:,} devices, topic {topic}")
    try:
        await asyncio.to_thread(upgrade, url, "fleet")
        await seed(url.replace("postgresql+asyncpg://", "postgresql://", 1), args.devices)
        await produce(stack.kafka_bootstrap_servers, topic, args.events, args.devices)
        baseline = await raw_consume(stack.kafka_bootstrap_servers, topic, args.events)
        print(f"  bare aiokafka consumer (fetch only): {baseline:,.0f} events/s")
        settings = FleetSettings(
            database_url=SecretStr(url),
            kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
            redis_url=SecretStr(stack.redis_url),
            kafka_topic_prefix=prefix,
            telemetry_batch_max=args.batch,
            log_level="WARNING",
        )
        value = await fleet_consume(settings, args.events)
        print(f"  fleet telemetry consumer into device state: {value:,.0f} events/s")
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            applied = await conn.fetchval(
                "SELECT count(*) FROM devices WHERE telemetry_at IS NOT NULL"
            )
        finally:
            await conn.close()
        print(f"  devices with applied telemetry: {applied:,} of {args.devices:,}")
        print("target: >= 10,000 events/s")
        print(json.dumps({
            "bench": "telemetry_apply", "metric": "events_per_s", "value": round(value),
            "unit": "events/s", "baseline": round(baseline),
            "baseline_name": "bare aiokafka consumer, fetch only",
            "ratio": round(value / baseline, 2),
        }))  # fmt: skip
    finally:
        await drop_database(stack.pg_admin_url, name)


if __name__ == "__main__":
    asyncio.run(main())
