"""`python -m fleet seed`: the demo fleet, registered through the public API.

Reads the accounts the tokens service seeded, logs in as each dealer's staff and registers
about 200 devices across every model and transport (GPS units around one region per dealer,
some assigned to the dealer's customers, a few test devices) with `POST /api/v1/devices`, the
same path as any API client. Idempotent: devices already registered are kept; when their MQTT
password is not in the previous output file it is re-issued through
`POST /api/v1/devices/{id}/mqtt-credentials`. Writes the simulator's device file (mode 0600).
"""

import argparse
import asyncio
import json
import os
import random
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from common.catalog import MODELS

Authenticate = Callable[[str, str], Awaitable[dict[str, str]]]

# (centre lat, centre lon) of each dealer's region: Central Texas, Upper Bavaria.
REGIONS = [(30.27, -97.74), (48.14, 11.58)]
PLACES = ["North", "South", "River", "Hill", "Lake", "Harbor", "Quarry", "Depot", "Farm", "Mill"]
THINGS = ["Pump", "Tower", "Barn", "Clinic", "Site", "Station", "Yard", "Camp", "Backup", "Gate"]
FIRMWARE = {"X Pro": "3.2.0", "Ultra": "5.1.4"}
UNIFIED_FIRMWARE = "2.4.1"


class SeedError(Exception):
    """The API refused something the seed needs."""


def plan(accounts: dict[str, Any], total: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(dealer, registration body) for every demo device; deterministic, so reruns match."""
    dealers = accounts["dealers"]
    per_dealer = max(1, total // max(1, len(dealers)))
    models = list(MODELS.values())
    planned = []
    for d, dealer in enumerate(dealers):
        rnd = random.Random(f"autogen-demo-{d}")  # noqa: S311 - demo data, not security
        centre_lat, centre_lon = REGIONS[d % len(REGIONS)]
        customers = [c["email"] for c in dealer.get("customers", [])]
        for k in range(per_dealer):
            model = models[k % len(models)]
            transport = model.transports[(k // len(models)) % len(model.transports)]
            engine = model.engines[k % len(model.engines)] if model.engines else None
            gps = k % 5 != 4  # most field units have GPS
            body: dict[str, Any] = {
                "id": f"AG{d + 1}{k:04d}",
                "name": f"{PLACES[k % 10]} {THINGS[(k // 10) % 10]} {k}",
                "model": model.name,
                "engine": engine,
                "transport": transport,
                "gps": gps,
                "dealer_id": dealer["id"],
                "customer_email": customers[k % len(customers)]
                if customers and k % 3 == 0
                else None,
                "firmware_version": FIRMWARE.get(model.name, UNIFIED_FIRMWARE),
                "test_device": k < 2,
            }
            lat = centre_lat + rnd.uniform(-0.6, 0.6)
            lon = centre_lon + rnd.uniform(-0.8, 0.8)
            planned.append(
                (dealer, body | {"_lat": lat if gps else None, "_lon": lon if gps else None})
            )
    return planned


async def seed_fleet(
    client: httpx.AsyncClient,
    accounts: dict[str, Any],
    *,
    authenticate: Authenticate,
    previous: dict[str, str],
    total: int = 200,
) -> list[dict[str, Any]]:
    """Register the demo fleet through `client` (base URL: the API's `/api/v1`)."""
    headers_of: dict[str, dict[str, str]] = {}
    devices = []
    for dealer, planned in plan(accounts, total):
        if dealer["id"] not in headers_of:
            staff = dealer["staff"][0]
            headers_of[dealer["id"]] = await authenticate(staff["email"], staff["password"])
        headers = headers_of[dealer["id"]]
        body = {k: v for k, v in planned.items() if not k.startswith("_")}
        response = await client.post("/devices", json=body, headers=headers)
        password: str | None
        if response.status_code == 201:
            password = response.json()["mqtt_password"]
        elif response.status_code == 409:
            password = previous.get(body["id"])
        else:
            raise SeedError(f"POST /devices {body['id']}: {response.status_code} {response.text}")
        if password is None:
            path = f"/devices/{body['id']}/mqtt-credentials"
            issued = await client.post(path, headers=headers)
            if issued.status_code != 201:
                raise SeedError(f"POST {path}: {issued.status_code} {issued.text}")
            password = issued.json()["password"]
        devices.append(
            {
                "id": body["id"],
                "name": body["name"],
                "model": body["model"],
                "engine": body["engine"],
                "transport": body["transport"],
                "gps": body["gps"],
                "lat": planned["_lat"],
                "lon": planned["_lon"],
                "password": password,
                "firmware_version": body["firmware_version"],
            }
        )
    return devices


def write_private(path: Path, document: dict[str, Any]) -> None:
    """Write `document` as JSON readable only by its owner (it holds device passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2)
    os.chmod(temporary, 0o600)
    temporary.replace(path)


def _previous_passwords(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        known = json.loads(path.read_text())["devices"]
        return {d["id"]: d["password"] for d in known if d.get("password")}
    except (ValueError, KeyError, TypeError):
        return {}


async def _run(
    args: argparse.Namespace, accounts: dict[str, Any], previous: dict[str, str]
) -> None:
    out = Path(args.out)
    async with httpx.AsyncClient(base_url=args.api.rstrip("/"), timeout=15.0) as client:

        async def login(email: str, password: str) -> dict[str, str]:
            response = await client.post("/auth/login", json={"email": email, "password": password})
            if response.status_code != 200:
                raise SeedError(f"login as {email}: {response.status_code} {response.text}")
            return {"Authorization": f"Bearer {response.json()['access_token']}"}

        devices = await seed_fleet(
            client, accounts, authenticate=login, previous=previous,
            total=args.count,
        )  # fmt: skip
    mqtt = {"host": os.environ.get("AUTOGEN_MQTT_HOST", "127.0.0.1"),
            "port": int(os.environ.get("AUTOGEN_MQTT_PORT", "1883"))}  # fmt: skip
    write_private(out, {"mqtt": mqtt, "devices": devices})
    sys.stdout.write(f"fleet seed: {len(devices)} devices registered or kept; wrote {out}\n")


def main(argv: list[str]) -> int:
    """Entry point of `python -m fleet seed`."""
    parser = argparse.ArgumentParser(
        prog="python -m fleet seed", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--accounts", required=True, help="accounts file the tokens seed wrote")
    parser.add_argument("--out", required=True, help="the simulator's device file to write")
    parser.add_argument(
        "--api", default=os.environ.get("AUTOGEN_API_BASE_URL", "http://127.0.0.1:8080/api/v1")
    )
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        accounts = json.loads(Path(args.accounts).read_text())
        asyncio.run(_run(args, accounts, _previous_passwords(Path(args.out))))
    except (SeedError, httpx.HTTPError, OSError, KeyError, ValueError) as exc:
        sys.stderr.write(f"fleet seed failed: {exc}\n")
        return 1
    return 0
