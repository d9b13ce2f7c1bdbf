"""Fleet search at 1,000,000 devices: through the service, and the same query as raw SQL.

Seeds a throwaway database (the fleet's real migrations; rows by COPY, not the API; the
secondary indexes are dropped for the load and rebuilt from their own definitions), then runs
searches by id prefix, customer email fragment and name fragment as an admin (whose scope is
every device: the largest search space). Each search runs through the service (`GET
/api/v1/devices` in-process over ASGI: auth, validation, the store's query, serialization) and as
the same SQL on a bare asyncpg connection (which, like the service's, gets the database's
`plan_cache_mode = force_custom_plan` from migration 0003). The database is dropped at the end.

Needs the local stack (PostgreSQL). Prints readable lines, then one JSON line per metric.
"""

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from pydantic import SecretStr

from common.auth import Principal
from common.migrations import upgrade
from common.testing.auth import TestIssuer
from common.testing.stack import StackAddresses, create_database, drop_database, load_stack_env
from fleet.app import create_app
from fleet.settings import FleetSettings

MODELS = [("XP", "X Pro", None), ("DA", "D100", "diesel"), ("DB", "D180", "gas"),
          ("VA", "V100", "dual-fuel"), ("VB", "V5", "diesel"), ("UL", "Ultra", None)]  # fmt: skip
FIRST = ["anna", "ben", "carla", "dmitri", "elena", "farid", "greta", "hugo", "ines"]
LAST = ["smith", "garcia", "muller", "rossi", "novak", "silva", "jensen", "okafor"]
DOMAINS = ["farmco.test", "buildit.test", "hospital.test", "mines.test", "telecom.test"]
PLACES = ["North", "South", "East", "West", "River", "Hill", "Lake", "Harbor", "Quarry", "Depot"]
THINGS = ["Pump", "Tower", "Barn", "Clinic", "Site", "Station", "Yard", "Camp", "Mill", "Gate"]

SQL = """
SELECT id, name, model, engine, transport, gps, dealer_id, customer_email, test_device,
       firmware_version, connection, last_seen_at, run_state, battery_v, fuel_pct, lat, lon,
       position_at, created_at
FROM devices
WHERE id ILIKE $1 OR name ILIKE $1 OR customer_email ILIKE $1
ORDER BY id LIMIT 51
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200, help="searches per kind and path")
    parser.add_argument("--keep", action="store_true", help="keep the database (debugging)")
    parser.add_argument("--database", help="reuse a database a --keep run left (no seeding)")
    return parser.parse_args()


def device_row(n: int, now: datetime) -> tuple[Any, ...]:
    code, model, engine = MODELS[n % len(MODELS)]
    customer = n // 3
    email = None
    if n % 10 >= 3:
        first, last = FIRST[customer % len(FIRST)], LAST[(customer // 20) % len(LAST)]
        email = f"{first}.{last}{customer}@{DOMAINS[customer % len(DOMAINS)]}"
    name = f"{PLACES[n % 10]} {THINGS[(n // 10) % 10]} {n}"
    gps = n % 3 == 0
    live = n % 4 != 0
    return (
        f"{code}{n:07d}", name, model, engine, "gsm" if n % 2 else "wifi", gps,
        f"dealer-{n % 200:03d}", email, n % 97 == 0, f"2.{n % 7}.{n % 3}",
        "live" if live else "offline", now, now, None, "running" if n % 5 else "stopped",
        12.8, 60.0, 40.0 + (n % 1000) / 100 if gps else None,
        -100.0 + (n % 997) / 100 if gps else None, now if gps else None, now, now,
    )  # fmt: skip


COLUMNS = [
    "id", "name", "model", "engine", "transport", "gps", "dealer_id", "customer_email",
    "test_device", "firmware_version", "connection", "last_seen_at", "presence_at",
    "telemetry_at", "run_state", "battery_v", "fuel_pct", "lat", "lon", "position_at",
    "created_at", "updated_at",
]  # fmt: skip


async def seed(url: str, count: int) -> None:
    """COPY `count` devices, with the secondary indexes rebuilt afterwards."""
    conn = await asyncpg.connect(url)
    try:
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'devices' "
            "AND indexname <> 'devices_pkey'"
        )
        for index in indexes:
            await conn.execute(f'DROP INDEX "{index["indexname"]}"')
        now = datetime.now(UTC)
        started = time.perf_counter()
        chunk = 100_000
        for start in range(0, count, chunk):
            rows = [device_row(n, now) for n in range(start, min(count, start + chunk))]
            await conn.copy_records_to_table("devices", records=rows, columns=COLUMNS)
        print(f"  COPY {count:,} devices: {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        await conn.execute("SET maintenance_work_mem = '512MB'")
        for index in indexes:
            await conn.execute(index["indexdef"])
        await conn.execute("ANALYZE devices")
        print(f"  rebuilt {len(indexes)} indexes + ANALYZE: {time.perf_counter() - started:.1f} s")
    finally:
        await conn.close()


def fragments(count: int, queries: int) -> dict[str, list[str]]:
    """Realistic search texts, taken from devices that exist."""
    rnd = random.Random(7)
    picks = [rnd.randrange(count) for _ in range(queries)]
    now = datetime.now(UTC)
    rows = [device_row(n, now) for n in picks]
    with_email = [device_row(n if n % 10 >= 3 else n + 3, now)[7] for n in picks]
    return {
        "id_prefix": [row[0][:7] for row in rows],  # e.g. DA01234 -> 10 devices
        "email_fragment": [e.split("@")[0][-9:].upper() for e in with_email],
        "name_fragment": [" ".join(row[1].split()[1:]).lower() for row in rows],
    }


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[94]


async def timed(
    paths: list[Callable[[str], Awaitable[int]]], texts: list[str]
) -> list[tuple[list[float], int]]:
    """Latencies (ms) and total hits per path; the paths take turns on each text, so a burst
    of load from elsewhere on the machine hits both alike."""
    for text in texts[:10]:  # warm caches and connections
        for run in paths:
            await run(text)
    results: list[tuple[list[float], int]] = [([], 0) for _ in paths]
    for text in texts:
        for i, run in enumerate(paths):
            started = time.perf_counter()
            hits = await run(text)
            samples, total = results[i]
            samples.append((time.perf_counter() - started) * 1000)
            results[i] = (samples, total + hits)
    return results


async def main() -> None:
    args = parse_args()
    load_stack_env(Path.cwd())
    stack = StackAddresses.from_env(__import__("os").environ)
    if stack is None:
        raise SystemExit("start the local stack first (deploy/local/stack start)")
    if args.database:
        name, keep = args.database, True
        url = stack.pg_admin_url.replace("postgresql://", "postgresql+asyncpg://", 1)
        url = url.rsplit("/", 1)[0] + "/" + name
    else:
        name, keep = f"bench_fleet_{uuid.uuid4().hex[:8]}", args.keep
        url = await create_database(stack.pg_admin_url, name)
    plain = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    print(f"search benchmark: {args.devices:,} devices in database {name}")
    try:
        if not args.database:
            await asyncio.to_thread(upgrade, url, "fleet")
            await seed(plain, args.devices)
        issuer = TestIssuer()
        settings = FleetSettings(
            database_url=SecretStr(url),
            kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
            redis_url=SecretStr(stack.redis_url),
        )
        app = create_app(settings, verifier=issuer.verifier())
        headers = issuer.headers(Principal(user_id="bench", role="admin"))
        raw = await asyncpg.connect(plain)
        transport = httpx.ASGITransport(app=app)
        results: list[dict[str, Any]] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:

            async def via_service(text: str) -> int:
                response = await client.get(
                    "/api/v1/devices", params={"q": text, "limit": 50}, headers=headers
                )
                response.raise_for_status()
                return len(response.json()["items"])

            async def via_sql(text: str) -> int:
                escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                return len(await raw.fetch(SQL, f"%{escaped}%"))

            for kind, texts in fragments(args.devices, args.queries).items():
                (service, hits), (sql, sql_hits) = await timed([via_service, via_sql], texts)
                line = (
                    f"  {kind:15s} service p50 {statistics.median(service):6.2f} ms "
                    f"p95 {p95(service):6.2f} ms | raw SQL p50 {statistics.median(sql):6.2f} ms "
                    f"p95 {p95(sql):6.2f} ms | {hits / len(texts):.1f} hits/query"
                )
                print(line)
                if hits != sql_hits:
                    raise SystemExit(f"the paths disagree: {hits} vs {sql_hits} results")
                results.append(
                    {
                        "bench": "search",
                        "metric": f"{kind}_p95_ms",
                        "value": round(p95(service), 2),
                        "unit": "ms",
                        "baseline": round(p95(sql), 2),
                        "baseline_name": "same query, raw SQL over asyncpg",
                        "ratio": round(p95(service) / p95(sql), 2),
                    }
                )
        await raw.close()
        await app.state.infra.engine.dispose()
        print("targets: p95 <= 50 ms through the service and <= 2x raw SQL")
        for result in results:
            print(json.dumps(result))
    finally:
        if not keep:
            await drop_database(stack.pg_admin_url, name)


if __name__ == "__main__":
    asyncio.run(main())
