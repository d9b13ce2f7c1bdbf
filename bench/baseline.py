"""Baseline: how fast 100-byte events reach Kafka, three ways, in one run.

1. Kafka's own producer (`org.apache.kafka.tools.ProducerPerformance`, from the same jars as the
   broker), acks=all, idempotent: what the broker and the JVM client can do here.
2. A bare aiokafka producer, same settings: the ceiling for any Python service.
3. The outbox relay (`common.outbox.OutboxRelay`): events already committed to a service's
   outbox table, read, published and marked sent — the project's path.

Needs the local stack (`deploy/local/stack start`). Prints readable lines, then one JSON line per
metric. Not a test: nothing here asserts a time.
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer
from sqlalchemy import MetaData, insert

from common.db import make_engine
from common.outbox import OutboxRelay, outbox_table
from common.testing.stack import (
    StackAddresses,
    create_database,
    create_topics,
    delete_topics_with_prefix,
    drop_database,
    load_stack_env,
)

PAYLOAD_BYTES = 100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per measurement")
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument("--relay-batch", type=int, default=1000)
    return parser.parse_args()


def kafka_producer_performance(bootstrap: str, topic: str, events: int, linger_ms: int) -> float:
    """Records/s reported by Kafka's ProducerPerformance tool."""
    libs = os.environ.get("AUTOGEN_KAFKA_LIBS")
    java = os.environ.get("AUTOGEN_JAVA") or shutil.which("java") or "java"
    if not libs or not Path(libs).is_dir():
        raise SystemExit(
            "AUTOGEN_KAFKA_LIBS is not set: start the stack (deploy/local/stack start)"
        )
    command = [
        java,
        "-Xmx512m",
        "-cp",
        f"{libs}/*",
        "org.apache.kafka.tools.ProducerPerformance",
        "--topic",
        topic,
        "--num-records",
        str(events),
        "--record-size",
        str(PAYLOAD_BYTES),
        "--throughput",
        "-1",
        "--producer-props",
        f"bootstrap.servers={bootstrap}",
        "acks=all",
        "enable.idempotence=true",
        f"linger.ms={linger_ms}",
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    summary = [line for line in output.splitlines() if "records sent" in line][-1]
    match = re.search(r"([\d.]+) records/sec", summary)
    if match is None:
        raise RuntimeError(f"unexpected ProducerPerformance output: {summary}")
    return float(match.group(1))


async def aiokafka_rate(bootstrap: str, topic: str, events: int, linger_ms: int) -> float:
    """Events/s of a bare aiokafka producer (acks=all, idempotent), keyed like our events."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    value = b"x" * PAYLOAD_BYTES
    try:
        started = time.perf_counter()
        futures = [
            await producer.send(topic, value=value, key=f"dev-{i % 5000}".encode())
            for i in range(events)
        ]
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
    finally:
        await producer.stop()
    return events / elapsed


async def relay_rate(
    stack: StackAddresses, topic: str, events: int, linger_ms: int, batch: int
) -> float:
    """Events/s of the outbox relay draining `events` committed 100-byte events."""
    name = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    url = await create_database(stack.pg_admin_url, name)
    engine = make_engine(url)
    metadata = MetaData()
    outbox = outbox_table(metadata)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            payload = b"x" * PAYLOAD_BYTES
            rows = [
                {
                    "event_id": uuid.uuid4(),
                    "topic": topic,
                    "key": f"dev-{i % 5000}",
                    "payload": payload,
                    "headers": {"content-type": "application/json", "event-type": "bench"},
                }
                for i in range(events)
            ]
            for start in range(0, events, 10_000):
                await conn.execute(insert(outbox), rows[start : start + 10_000])
        relay = OutboxRelay(
            engine=engine,
            outbox=outbox,
            bootstrap_servers=stack.kafka_bootstrap_servers,
            client_id="bench",
            batch_size=batch,
            linger_ms=linger_ms,
        )
        await relay.start()
        try:
            started = time.perf_counter()
            while await relay.relay_once():
                pass
            elapsed = time.perf_counter() - started
        finally:
            await relay.stop()
        if relay.stats.published != events:
            raise RuntimeError(f"relay published {relay.stats.published} of {events}")
        return events / elapsed
    finally:
        await engine.dispose()
        await drop_database(stack.pg_admin_url, name)


def metric(name: str, value: float, baseline: float, baseline_name: str) -> str:
    return json.dumps(
        {
            "bench": "baseline",
            "metric": name,
            "value": round(value),
            "unit": "events/s",
            "baseline": round(baseline),
            "baseline_name": baseline_name,
            "ratio": round(value / baseline, 2),
        }
    )


async def main() -> int:
    args = parse_args()
    load_stack_env(Path.cwd())
    stack = StackAddresses.from_env(os.environ)
    if stack is None:
        print("start the local stack first: deploy/local/stack start", file=sys.stderr)
        return 2
    run = uuid.uuid4().hex[:8]
    topics = [f"bench.{run}.java", f"bench.{run}.aiokafka", f"bench.{run}.relay"]
    await create_topics(stack.kafka_bootstrap_servers, topics, partitions=6)
    java_topic, py_topic, relay_topic = topics
    try:
        print(
            f"baseline: {args.events} events of {PAYLOAD_BYTES} bytes, acks=all, idempotent, "
            f"linger.ms={args.linger_ms}, 6 partitions, on {os.cpu_count()} cores"
        )

        java = await asyncio.to_thread(
            kafka_producer_performance,
            stack.kafka_bootstrap_servers,
            java_topic,
            args.events,
            args.linger_ms,
        )
        print(f"  Kafka ProducerPerformance (Java client) {java:>10,.0f} events/s")
        bare = await aiokafka_rate(
            stack.kafka_bootstrap_servers, py_topic, args.events, args.linger_ms
        )
        print(f"  bare aiokafka producer                  {bare:>10,.0f} events/s")
        relay = await relay_rate(stack, relay_topic, args.events, args.linger_ms, args.relay_batch)
        print(
            f"  outbox relay (read, publish, mark)      {relay:>10,.0f} events/s  (target >= 5,000)"
        )
    finally:
        await delete_topics_with_prefix(stack.kafka_bootstrap_servers, f"bench.{run}.")
    print(metric("aiokafka_producer_events_per_s", bare, java, "Kafka ProducerPerformance"))
    print(metric("outbox_relay_events_per_s", relay, bare, "bare aiokafka producer"))
    print(metric("outbox_relay_vs_java_events_per_s", relay, java, "Kafka ProducerPerformance"))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
