"""Telemetry from Kafka into device state: the fleet's batch consumer against bare aiokafka.

Seeds a throwaway database with devices (the fleet's migrations; COPY), produces telemetry
envelopes for them to a throwaway prefixed topic, then reads the same records three times:
1. ceiling: a bare aiokafka consumer that only fetches the records;
2. baseline: the same work written by hand with no framework: aiokafka `getmany`,
   `json.loads` of each value (no validation), latest per device, the fleet's own UPDATE ...
   FROM unnest statement through a bare asyncpg connection, offsets committed after the write;
3. the project's path: the fleet service's telemetry consumers (FastStream batch
   subscribers, envelope validation with dead letters, per-device coalescing, the same
   statement through SQLAlchemy, offsets committed after the write), in the app's lifespan.
Rates are measured from the first record (or batch) to the last, so consumer-group joins are
not counted. Each run gets its own database (state starts empty), topics (prefixed `bench-...`)
and groups; the databases are dropped and the topics deleted at the end.
"""

import argparse
import asyncio
import json
import os
import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import SecretStr
from sqlalchemy import TextClause
from sqlalchemy.dialects import postgresql

from common.contracts import device, platform
from common.events import encode, new_event
from common.migrations import upgrade
from common.testing.stack import (
    StackAddresses,
    create_database,
    create_topics,
    delete_topics_with_prefix,
    drop_database,
    load_stack_env,
)
from fleet import store
from fleet.app import create_app
from fleet.settings import FleetSettings

HISTORY = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2000, help="max records per batch")
    parser.add_argument("--consumers", type=int, default=2, help="group members in process")
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


def _asyncpg_statement(statement: TextClause) -> tuple[str, list[str]]:
    """The fleet's SQLAlchemy statement as asyncpg SQL (`$n`) and its parameter names in order."""
    sql = str(statement.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)s", number, sql).replace("%%", "%"), names


async def raw_apply(bootstrap: str, topic: str, url: str, events: int, batch: int) -> float:
    """The hand-written pipeline: fetch, json.loads, latest per device, one statement, commit."""
    sql, names = _asyncpg_statement(store._APPLY_TELEMETRY)
    conn = await asyncpg.connect(url)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"{topic}.raw-apply",
        auto_offset_reset="earliest", enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )  # fmt: skip
    await consumer.start()
    try:
        statement = await conn.prepare(sql)
        seen, first, got_first = 0, 0.0, 0
        async with asyncio.timeout(300):
            while seen < events:
                fetched = await consumer.getmany(timeout_ms=1000, max_records=batch)
                latest: dict[str, dict[str, Any]] = {}
                for records in fetched.values():
                    for record in records:
                        data = json.loads(record.value)["data"]
                        latest[data["device_id"]] = data
                if not latest:
                    continue
                rows = list(latest.values())
                now = [datetime.fromisoformat(r["received_at"]) for r in rows]
                params: dict[str, Any] = {
                    "ids": [r["device_id"] for r in rows], "received": now,
                    "ts": [datetime.fromisoformat(r["ts"]) for r in rows], "history": HISTORY,
                }  # fmt: skip
                for name in ("run_state", "battery_v", "fuel_pct", "engine_hours", "lat", "lon"):
                    params[name] = [r.get(name) for r in rows]
                async with conn.transaction():
                    await statement.fetch(*(params[n] for n in names))
                await consumer.commit()
                got = sum(len(records) for records in fetched.values())
                if not first:
                    first, got_first = time.perf_counter(), got
                seen += got
        return (events - got_first) / (time.perf_counter() - first)
    finally:
        await consumer.stop()
        await conn.close()


def _members_assigned(app: Any, topic: str) -> bool:
    """Every telemetry group member of the app holds partitions (the group is settled)."""
    members = [
        s.consumer for s in app.state.infra.broker.subscribers
        if getattr(s, "consumer", None) is not None and topic in s.consumer.subscription()
    ]  # fmt: skip
    return bool(members) and all(member.assignment() for member in members)


async def fleet_consume(settings: FleetSettings, topic: str, events: int) -> float:
    app = create_app(settings)
    stats = app.state.consumers.telemetry
    async with app.router.lifespan_context(app), asyncio.timeout(600):
        # Measured once every group member holds its partitions: the joins are not counted.
        while not _members_assigned(app, topic):  # noqa: ASYNC110 - polling the group
            await asyncio.sleep(0.005)
        first, first_count = time.perf_counter(), stats.handled + stats.dead_lettered
        while stats.handled + stats.dead_lettered < events:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - first
        if stats.dead_lettered:
            raise SystemExit(f"{stats.dead_lettered} records were dead-lettered")
        print(
            f"  fleet consumers: {stats.batches} batches, {stats.retried} retries, "
            f"{first_count:,} records handled before the group settled"
        )
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
    # Two databases seeded alike: state only moves forward, so each path starts from empty.
    names = [f"bench_fleet_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    raw_url, url = [await create_database(stack.pg_admin_url, name) for name in names]
    print(f"telemetry apply: {args.events:,} events for {args.devices:,} devices, topic {topic}")
    try:
        for each in (raw_url, url):
            await asyncio.to_thread(upgrade, each, "fleet")
            await seed(each.replace("postgresql+asyncpg://", "postgresql://", 1), args.devices)
        await produce(stack.kafka_bootstrap_servers, topic, args.events, args.devices)
        ceiling = await raw_consume(stack.kafka_bootstrap_servers, topic, args.events)
        print(f"  bare aiokafka consumer (fetch only, the ceiling): {ceiling:,.0f} events/s")
        baseline = await raw_apply(
            stack.kafka_bootstrap_servers, topic,
            raw_url.replace("postgresql+asyncpg://", "postgresql://", 1), args.events, args.batch,
        )  # fmt: skip
        print(f"  hand-written aiokafka + json.loads + asyncpg apply: {baseline:,.0f} events/s")
        settings = FleetSettings(
            database_url=SecretStr(url),
            kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
            redis_url=SecretStr(stack.redis_url),
            kafka_topic_prefix=prefix,
            telemetry_batch_max=args.batch,
            telemetry_consumers=args.consumers,
            log_level="WARNING",
        )
        value = await fleet_consume(settings, topic, args.events)
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
            "baseline_name": "hand-written aiokafka + json.loads + asyncpg, same statement",
            "ratio": round(value / baseline, 2),
        }))  # fmt: skip
    finally:
        for name in names:
            await drop_database(stack.pg_admin_url, name)
        await delete_topics_with_prefix(stack.kafka_bootstrap_servers, prefix)


if __name__ == "__main__":
    asyncio.run(main())
