"""Fleet search at 1,000,000 devices: through the service, and the same query as raw SQL.

Seeds a throwaway database (the fleet's real migrations; rows by COPY, not the API; the
secondary indexes are dropped for the load and rebuilt from their own definitions), then runs
searches by id prefix, customer email fragment and name fragment as an admin (whose scope is
every device: the largest search space). Each search runs through the service as a client meets
it (`GET /api/v1/devices` on `python -m fleet serve`, a real uvicorn on a loopback port, over one
keep-alive HTTP/1.1 connection from a lean client: auth, validation, the store's query,
serialization; the same through httpx is printed beside, see `common.testing.lean_http`) and as the
same SQL on one bare asyncpg connection (which, like the service's, gets the database's
`plan_cache_mode = force_custom_plan` from migration 0003). The database is dropped at the end.

Needs the local stack (PostgreSQL). Prints readable lines, then one JSON line per metric.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from common.auth import Principal
from common.contracts.device import PRESENCE, REPORT, TELEMETRY
from common.migrations import upgrade
from common.testing.auth import TestIssuer
from common.testing.lean_http import LeanHttp
from common.testing.stack import (
    StackAddresses,
    create_database,
    create_topics,
    delete_topics_with_prefix,
    drop_database,
    free_port,
    load_stack_env,
)

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
    of load from elsewhere on the machine hits both alike. Who goes first rotates: the first
    search of a text reads its index and heap pages into the buffer cache, the others find
    them there (with a fixed order, the first path paid that for all and looked 1.5x slower)."""
    for text in texts[:10]:  # warm caches and connections
        for run in paths:
            await run(text)
    results: list[tuple[list[float], int]] = [([], 0) for _ in paths]
    for turn, text in enumerate(texts):
        for step in range(len(paths)):
            i = (turn + step) % len(paths)
            run = paths[i]
            started = time.perf_counter()
            hits = await run(text)
            samples, total = results[i]
            samples.append((time.perf_counter() - started) * 1000)
            results[i] = (samples, total + hits)
    return results


def fleet_env(
    *, url: str, port: int, jwks_url: str, stack: StackAddresses, prefix: str
) -> dict[str, str]:
    """The served fleet's environment: the bench database, the test JWKS, its own topics."""
    return {
        **os.environ,
        "FLEET_DATABASE_URL": url,
        "FLEET_HTTP_PORT": str(port),
        "FLEET_JWKS_URL": jwks_url,
        "FLEET_KAFKA_BOOTSTRAP_SERVERS": stack.kafka_bootstrap_servers,
        "FLEET_REDIS_URL": stack.redis_url,
        "FLEET_KAFKA_TOPIC_PREFIX": prefix,
        "FLEET_LOG_LEVEL": "WARNING",
        # The live/offline count scans the whole table; not during the measurement.
        "FLEET_STATE_METRICS_INTERVAL_S": "3600",
    }


async def start_fleet(env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    """`python -m fleet serve` as deployed (uvicorn, lifespan, consumers); waits until ready."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fleet",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as probe:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise SystemExit(f"the fleet service exited with {process.returncode}")
            try:
                if (await probe.get("/readyz")).status_code == 200:
                    return process
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    process.terminate()
    raise SystemExit("the fleet service did not come up within 60 s")


async def measure(
    *, port: int, headers: dict[str, str], plain: str, texts: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """Each kind of search through the served fleet (lean client and httpx) and as raw SQL,
    taking turns."""
    raw = await asyncpg.connect(plain)
    results: list[dict[str, Any]] = []
    # One keep-alive HTTP/1.1 connection per client, reused: how an API client (or nginx)
    # meets it.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with (
        LeanHttp(port, headers) as lean,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, headers=headers
        ) as client,
    ):

        async def via_service(text: str) -> int:
            status, body = await lean.get("/api/v1/devices", {"q": text, "limit": 50})
            if status != 200:
                raise SystemExit(f"search {text!r}: HTTP {status} {body[:200]!r}")
            return len(json.loads(body)["items"])

        async def via_httpx(text: str) -> int:
            response = await client.get("/api/v1/devices", params={"q": text, "limit": 50})
            response.raise_for_status()
            return len(response.json()["items"])

        async def via_sql(text: str) -> int:
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            # LIMIT 51, as the service asks (one more than the page, to know there is more);
            # a page shows at most 50.
            return min(50, len(await raw.fetch(SQL, f"%{escaped}%")))

        async def lean_health(_: str) -> int:
            status, _body = await lean.get("/healthz")
            if status != 200:
                raise SystemExit(f"/healthz: HTTP {status}")
            return 0

        async def httpx_health(_: str) -> int:
            (await client.get("/healthz")).raise_for_status()
            return 0

        # The floor under any answer of this service to each client: an HTTP round trip to a
        # route with no auth, no database and a tiny body (context for the ratio, not a target).
        (floor, _), (httpx_floor, _) = await timed(
            [lean_health, httpx_health], next(iter(texts.values()))
        )
        print(
            f"  HTTP floor (GET /healthz, same connection) p50 {statistics.median(floor):6.2f} ms "
            f"p95 {p95(floor):6.2f} ms; through httpx p50 {statistics.median(httpx_floor):6.2f} "
            f"ms p95 {p95(httpx_floor):6.2f} ms",
            flush=True,
        )
        for kind, kind_texts in texts.items():
            (service, hits), (through_httpx, httpx_hits), (sql, sql_hits) = await timed(
                [via_service, via_httpx, via_sql], kind_texts
            )
            line = (
                f"  {kind:15s} service p50 {statistics.median(service):6.2f} ms "
                f"p95 {p95(service):6.2f} ms | raw SQL p50 {statistics.median(sql):6.2f} ms "
                f"p95 {p95(sql):6.2f} ms | {hits / len(kind_texts):.1f} hits/query "
                f"| through httpx p50 {statistics.median(through_httpx):6.2f} ms "
                f"p95 {p95(through_httpx):6.2f} ms"
            )
            print(line, flush=True)
            if not hits == httpx_hits == sql_hits:
                raise SystemExit(f"the paths disagree: {hits}, {httpx_hits}, {sql_hits} results")
            results.append(
                {
                    "bench": "search",
                    "metric": f"{kind}_p95_ms",
                    "value": round(p95(service), 2),
                    "unit": "ms",
                    "baseline": round(p95(sql), 2),
                    "baseline_name": "same query, raw SQL over asyncpg",
                    "ratio": round(p95(service) / p95(sql), 2),
                    "through_httpx_p95_ms": round(p95(through_httpx), 2),
                }
            )
    await raw.close()
    return results


async def main() -> None:
    args = parse_args()
    load_stack_env(Path.cwd())
    stack = StackAddresses.from_env(os.environ)
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
    prefix = f"bench-search-{uuid.uuid4().hex[:8]}."
    print(f"search benchmark: {args.devices:,} devices in database {name}")
    process: asyncio.subprocess.Process | None = None
    jwks = contextlib.ExitStack()
    try:
        if not args.database:
            await asyncio.to_thread(upgrade, url, "fleet")
            await seed(plain, args.devices)
        issuer = TestIssuer()
        jwks_url = jwks.enter_context(issuer.serve_jwks())
        # The consumers the service starts read their own (empty) prefixed topics.
        await create_topics(
            stack.kafka_bootstrap_servers, [prefix + t.name for t in (PRESENCE, TELEMETRY, REPORT)]
        )
        port = free_port()
        env = fleet_env(url=url, port=port, jwks_url=jwks_url, stack=stack, prefix=prefix)
        process = await start_fleet(env, port)
        results = await measure(
            port=port,
            headers=issuer.headers(Principal(user_id="bench", role="admin")),
            plain=plain,
            texts=fragments(args.devices, args.queries),
        )
        print("targets: p95 <= 50 ms through the service and <= 2x raw SQL")
        for result in results:
            print(json.dumps(result))
    finally:
        if process is not None and process.returncode is None:
            process.terminate()
            await process.wait()
        jwks.close()
        await delete_topics_with_prefix(stack.kafka_bootstrap_servers, prefix)
        if not keep:
            await drop_database(stack.pg_admin_url, name)


if __name__ == "__main__":
    asyncio.run(main())
