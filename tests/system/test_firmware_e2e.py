"""Firmware rollouts end to end: the real services as processes, the device simulator over MQTT.

`python -m gateway|commands|fleet|firmware serve` run as subprocesses of this test (the
interpreter itself, so a SIGKILL hits the service) on fresh databases and this module's own
topic prefix; devices are registered through the fleet service (which has the gateway create
their broker accounts) and played by `python -m gateway.simulator`. An OTA
goes firmware → `command.request.v1` → commands → gateway → MQTT → simulator, and the device's
phases and its return come back through the gateway to firmware and fleet.

`test_firmware_rollouts.py` covers every rule against devices faked on Kafka (bad input, 403,
422, supersede, retries); this module checks that the outcomes hold with real devices.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from common.auth import Principal
from common.contracts import ALL_TOPICS
from common.db import make_engine
from common.testing.auth import TestIssuer
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses, free_port
from gateway.dynsec import DynsecAdmin
from gateway.testing import Broker, admin_session, bridge_account

# Four services, twenty devices and their broker accounts take minutes on a busy 2-core box.
pytestmark = [pytest.mark.stack, pytest.mark.timeout(1200)]

ADMIN = Principal(user_id="fw-e2e-admin", role="admin", email="admin@example.com")
OLD = "1.0.0"
# The simulator's own delays (time factor 1): WiFi units are back about 8 s after the OTA
# starts, GSM and GPS units after about 48 s. The WiFi deadline (30 s) lies between, with room
# for a slow pipeline on a busy machine (every test gateway receives the whole broker's
# uplinks, other runs' floods included): a GSM unit judged by it would fail.
TIME_FACTOR = "1.0"
DEADLINES = {"FIRMWARE_DEADLINE_WIFI_S": "30", "FIRMWARE_DEADLINE_GSM_S": "180"}
OTA_WAIT_S = 240.0


def dealer(dealer_id: str) -> Principal:
    return Principal(user_id=f"staff-{dealer_id}", role="dealer", dealer_id=dealer_id)


async def eventually(
    what: str, check: Callable[[], Awaitable[bool]], timeout: float = OTA_WAIT_S
) -> None:
    """Poll `check` until it holds; fail naming `what` at the deadline."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(f"gave up waiting for {what}")


@dataclass
class Service:
    """`python -m <name> serve` as a child process of this test."""

    name: str
    env: dict[str, str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [sys.executable, "-m", self.name, "serve"], env=self.env, stdout=out, stderr=out
            )
        async with httpx.AsyncClient() as http:

            async def ready() -> bool:
                assert self.proc is not None
                assert self.proc.poll() is None, f"{self.name} exited; see {self.log}"
                with contextlib.suppress(httpx.TransportError):
                    r = await http.get(f"http://127.0.0.1:{self.port}/readyz")
                    return r.status_code == 200
                return False

            await eventually(f"{self.name} to be ready (log {self.log})", ready, 90)

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush, no outbox relay finishing its batch."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class World:
    """The running services, a client for each API, and who the devices are."""

    issuer: TestIssuer
    http: dict[str, httpx.AsyncClient]
    firmware: Service
    databases: dict[str, str]
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    registering: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(4))

    async def call(
        self, service: str, method: str, path: str, who: Principal = ADMIN, body: Any = None
    ) -> httpx.Response:
        return await self.http[service].request(
            method, f"/api/v1{path}", json=body, headers=self.issuer.headers(who)
        )

    async def release(self, version: str) -> dict[str, Any]:
        """An X Pro release (no transport: for GSM and WiFi units alike)."""
        body = {
            "console": "xpro",
            "version": version,
            "models": ["X Pro"],
            "artifact_url": f"https://firmware.example/xpro-{version}.bin",
            "sha256": "ef" * 32,
            "size": 2048,
        }
        r = await self.call("firmware", "POST", "/firmware/releases", ADMIN, body)
        assert r.status_code == 201, r.text
        # The commands service resolves an OTA's version from `firmware.release.v1`; a request
        # read before the release would be rejected (production retries it; these tests run
        # without retries, so they wait).
        await rows_in(
            self.databases["commands"],
            "the release in the commands service",
            text("SELECT count(*) FROM releases WHERE release_id = :id"),
            {"id": r.json()["id"]},
            1,
        )
        return r.json()  # type: ignore[no-any-return]

    async def rollout_for(self, dealer_id: str, release_id: str, **strategy: Any) -> str:
        """An admin's `my_fleet` rollout for a dealer (validation overridden)."""
        r = await self.call(
            "firmware",
            "POST",
            "/rollouts",
            ADMIN,
            {
                "release_id": release_id,
                "scope": "my_fleet",
                "dealer_id": dealer_id,
                "strategy": strategy,
                "override": True,
                "override_reason": "end-to-end test fleet",
            },
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def rollout(self, rollout_id: str) -> dict[str, Any]:
        r = await self.call("firmware", "GET", f"/rollouts/{rollout_id}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def until(self, rollout_id: str, check: Callable[[dict[str, Any]], bool]) -> Any:
        found: dict[str, Any] = {}

        async def holds() -> bool:
            found.update(await self.rollout(rollout_id))
            return check(found)

        await eventually(f"rollout {rollout_id}", holds)
        return found

    async def states(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        r = await self.call("firmware", "GET", f"/rollouts/{rollout_id}/devices?limit=500")
        assert r.status_code == 200, r.text
        return {d["device_id"]: d for d in r.json()["items"]}

    async def fleet_version(self, device_id: str) -> str | None:
        r = await self.call("fleet", "GET", f"/devices/{device_id}")
        assert r.status_code == 200, r.text
        return r.json()["firmware_version"]  # type: ignore[no-any-return]

    async def ota_commands(self, device_id: str) -> list[dict[str, Any]]:
        """Every OTA command the commands service holds for the device."""
        r = await self.call("commands", "GET", f"/devices/{device_id}/commands?limit=500")
        if r.status_code == 404:
            return []  # not even known there: certainly nothing sent
        assert r.status_code == 200, r.text
        return [c for c in r.json()["items"] if c["action"] in ("force_ota", "fw_update")]

    async def register(
        self, device_id: str, dealer_id: str, group: str, spec: "DeviceSpec"
    ) -> dict[str, Any]:
        """Register the device through the fleet service; its row for the simulator's file."""
        model, transport, gps, test_device, _ = spec
        body = {
            "id": device_id,
            "name": device_id,
            "model": model,
            "engine": None,
            "transport": transport,
            "gps": gps,
            "dealer_id": dealer_id,
            "customer_email": f"{device_id.lower()}@example.com",
            "firmware_version": OLD,
            "test_device": test_device,
        }
        async with self.registering:
            r = await self.call("fleet", "POST", "/devices", ADMIN, body)
            assert r.status_code == 201, r.text
            password = r.json()["mqtt_password"] or await self.credentials(device_id)
        self.devices[device_id] = {"group": group, "dealer_id": dealer_id}
        return {
            "id": device_id,
            "name": device_id,
            "model": model,
            "engine": None,
            "transport": transport,
            "gps": gps,
            "lat": 52.0 if gps else None,
            "lon": 5.0 if gps else None,
            "password": password,
            "firmware_version": OLD,
        }

    async def credentials(self, device_id: str) -> str:
        """The device's MQTT password, re-issued (the documented way when registration could
        not reach the gateway in time, as happens on a busy machine)."""
        for _ in range(5):
            r = await self.call("fleet", "POST", f"/devices/{device_id}/mqtt-credentials")
            if r.status_code == 201:
                return str(r.json()["password"])
            await asyncio.sleep(1)
        pytest.fail(f"no MQTT credentials for {device_id}: {r.status_code} {r.text}")

    def of(self, group: str) -> list[str]:
        return sorted(d for d, spec in self.devices.items() if spec["group"] == group)


# model, transport, gps, test device, simulator fault
DeviceSpec = tuple[str, str, bool, bool, str | None]
# Every device of the module by group; a group's first letter names its dealer.
FLEET: dict[str, list[DeviceSpec]] = {
    "a-test": [("X Pro", "wifi", False, True, None)],
    "a-wifi": [("X Pro", "wifi", False, False, None)] * 2,
    "a-gsm": [("X Pro", "gsm", False, False, None), ("X Pro", "wifi", True, False, None)],
    "a-ultra": [("Ultra", "wifi", False, False, None)],  # not an X Pro: never targeted
    "b": [("X Pro", "wifi", False, False, None), ("X Pro", "gsm", False, False, None)],
    # Device ids sort "c-bad" before "c-ok": with one OTA at a time, it finishes first.
    "c-bad": [("X Pro", "wifi", False, False, "wrong_version")],
    "c-ok": [("X Pro", "wifi", False, False, None)] * 3,
    "d": [("X Pro", "wifi", False, False, None)] * 4,
    "e": [("X Pro", "wifi", False, False, None)] * 4,
}


async def receive_only(admin: DynsecAdmin, share_group: str, device_ids: list[str]) -> None:
    """Narrow this run's bridge account to its own devices' uplinks.

    A gateway's shared subscription receives every device of the broker, so another run's
    load devices (a benchmark's flood) would queue ahead of ours and stall the command
    publishes of this module's gateway past the OTA deadlines. The broker checks
    `publishClientReceive` on every delivery: deny all uplinks, allow ours (higher priority).
    """
    role = f"bridge:{share_group}"
    commands: list[dict[str, Any]] = [
        {
            "command": "removeRoleACL",
            "rolename": role,
            "acltype": "publishClientReceive",
            "topic": "devices/+/up/#",
        },
        {
            "command": "addRoleACL",
            "rolename": role,
            "acltype": "publishClientReceive",
            "topic": "devices/+/up/#",
            "allow": False,
            "priority": 0,
        },
    ]
    commands += [
        {
            "command": "addRoleACL",
            "rolename": role,
            "acltype": "publishClientReceive",
            "topic": f"devices/{device_id}/up/#",
            "allow": True,
            "priority": 10,
        }
        for device_id in device_ids
    ]
    for answer in await admin.execute(commands):
        assert not answer.get("error"), answer


@pytest.fixture(scope="module")
async def world(  # noqa: PLR0915 - one linear setup of a small world
    stack: StackAddresses,
    kafka_topics: KafkaTopics,
    fresh_database: Migrate,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[World]:
    tag = uuid.uuid4().hex[:6]
    # Topics of their own within the session's prefix: the real services here consume every
    # command request and presence on them, which must not meet other modules' fakes.
    sub = f"fwe2e{tag}."
    await kafka_topics.create(*(sub + t.name for t in ALL_TOPICS))
    prefix = kafka_topics.prefix + sub
    urls = {svc: await fresh_database(svc) for svc in ("gateway", "commands", "fleet", "firmware")}
    ports = {svc: free_port() for svc in urls}
    logs = tmp_path_factory.mktemp("logs")
    issuer = TestIssuer()
    broker = Broker.from_env()
    services: list[Service] = []
    simulator: subprocess.Popen[bytes] | None = None
    device_ids: list[str] = []
    todo = [
        (f"FWE{tag}-{group}-{i}", f"fwe-{group[0]}-{tag}", group, spec)
        for group, specs in FLEET.items()
        for i, spec in enumerate(specs)
    ]  # a dealer per group's first letter
    async with admin_session(broker) as admin, bridge_account(admin) as account:
        try:
            await receive_only(admin, account.share_group, [one[0] for one in todo])
            with issuer.serve_jwks() as jwks_url:
                common = {**os.environ, "AUTOGEN_LOG_LEVEL": "WARNING"}
                envs = {
                    "gateway": {
                        "GATEWAY_MQTT_USERNAME": account.username,
                        "GATEWAY_MQTT_PASSWORD": account.password,
                        "GATEWAY_MQTT_SHARE_GROUP": account.share_group,
                        "GATEWAY_MQTT_CLIENT_ID": f"fw-e2e-gw-{tag}",
                        "GATEWAY_MQTT_SESSION_EXPIRY_S": "60",
                        "GATEWAY_DISPATCH_GROUP_ID": f"fw-e2e-{tag}.gateway.dispatch",
                    },
                    "commands": {},
                    "fleet": {
                        "FLEET_GATEWAY_URL": f"http://127.0.0.1:{ports['gateway']}",
                        "FLEET_GATEWAY_TIMEOUT_S": "30",
                    },
                    "firmware": {
                        **DEADLINES,
                        "FIRMWARE_OTA_MAX_RETRIES": "0",
                        "FIRMWARE_DISPATCH_INTERVAL_S": "0.1",
                        "FIRMWARE_CONSUMER_BATCH_TIMEOUT_MS": "50",
                    },
                }
                for svc, extra in envs.items():
                    up = svc.upper()
                    env = (
                        common
                        | extra
                        | {
                            f"{up}_DATABASE_URL": urls[svc],
                            f"{up}_KAFKA_TOPIC_PREFIX": prefix,
                            f"{up}_HTTP_PORT": str(ports[svc]),
                            f"{up}_JWKS_URL": jwks_url,
                            f"{up}_OUTBOX_POLL_INTERVAL_S": "0.05",
                        }
                    )
                    services.append(Service(svc, env, ports[svc], logs / f"{svc}.log"))
                await asyncio.gather(*(service.start() for service in services))
                http = {
                    svc: httpx.AsyncClient(base_url=f"http://127.0.0.1:{p}", timeout=30)
                    for svc, p in ports.items()
                }
                world = World(issuer, http, services[-1], urls)
                # One authenticated call each before any concurrent ones: the services' token
                # verifiers fetch the JWKS on first use, and requests arriving during that
                # fetch are refused as "signed by an unknown key" (common.auth; reported).
                await world.call("fleet", "GET", "/devices")
                await world.call("firmware", "GET", "/firmware/consoles")
                await world.call("commands", "GET", "/devices/none/commands")
                await http["gateway"].get(
                    "/internal/v1/devices/none/credentials", headers=issuer.headers(ADMIN)
                )
                rows = await asyncio.gather(*(world.register(*one) for one in todo))
                device_ids += [row["id"] for row in rows]
                faults: dict[str, list[str]] = {}
                for device_id, _, _, spec in todo:
                    if spec[4]:
                        faults.setdefault(spec[4], []).append(device_id)
                path = logs / "devices.json"
                devices_file = {"mqtt": {"host": broker.host, "port": broker.port}, "devices": rows}
                path.write_text(json.dumps(devices_file))
                fault_args = []
                for kind, ids in faults.items():
                    fault_args += ["--fault", f"{kind}={','.join(ids)}"]
                with (logs / "simulator.log").open("ab") as out:
                    simulator = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                        [
                            sys.executable, "-m", "gateway.simulator", "--devices", str(path),
                            "--time-factor", TIME_FACTOR, "--telemetry-interval", "30",
                            "--log-level", "INFO", *fault_args,
                        ],
                        stdout=out, stderr=out,
                    )  # fmt: skip

                async def all_live() -> bool:
                    for device_id in device_ids:
                        r = await world.call("fleet", "GET", f"/devices/{device_id}")
                        if r.json()["connection"] != "live" or r.json()["firmware_version"] != OLD:
                            return False
                    return True

                try:
                    await eventually("every simulated device live in the fleet", all_live, 120)
                except pytest.fail.Exception:
                    seen = {}
                    for device_id in device_ids:
                        r = await world.call("fleet", "GET", f"/devices/{device_id}")
                        seen[device_id] = (r.json()["connection"], r.json()["firmware_version"])
                    log = (logs / "simulator.log").read_text()[-2000:]
                    pytest.fail(f"not live: {seen}; simulator {simulator.poll()}: {log}")
                yield world
        finally:
            if simulator is not None:
                simulator.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    simulator.wait(timeout=10)
            for service in reversed(services):
                service.stop()
            for device_id in device_ids:
                with contextlib.suppress(Exception):
                    await admin.remove_device(device_id)


async def rows_in(url: str, what: str, query: Any, params: dict[str, Any], count: int) -> None:
    """Wait until `query` (a count) on the database at `url` reaches `count`."""
    engine = make_engine(url, pool_size=1)
    try:

        async def enough() -> bool:
            async with engine.connect() as conn:
                return int(await conn.scalar(query, params) or 0) >= count

        await eventually(what, enough, 60)
    finally:
        await engine.dispose()


async def known_to_firmware(world: World, device_ids: list[str]) -> None:
    """Firmware's projection has these devices online on the old version (a rollout created
    before would not find them), and the commands service knows them (or refuses the OTA)."""
    ids = {"ids": device_ids}
    await rows_in(
        world.databases["firmware"],
        "firmware's projection of the devices",
        text(
            "SELECT count(*) FROM devices d JOIN device_presence p USING (device_id) "
            "WHERE d.device_id = ANY(:ids) AND p.online AND p.fw = '1.0.0'"
        ),
        ids,
        len(device_ids),
    )
    await rows_in(
        world.databases["commands"],
        "the commands service's projection of the devices",
        text("SELECT count(*) FROM devices WHERE device_id = ANY(:ids)"),
        ids,
        len(device_ids),
    )


# ------------------------------------------------------------------ the whole flow


async def test_validate_then_my_fleet_confirms_every_matching_device_and_no_other(
    world: World,
) -> None:
    test_unit = world.of("a-test")[0]
    a = world.devices[test_unit]["dealer_id"]
    wifi, slow = world.of("a-wifi"), world.of("a-gsm")  # slow: a GSM unit and a GPS unit
    others = world.of("b")
    await known_to_firmware(world, [test_unit, *wifi, *slow, *others, *world.of("a-ultra")])
    release = await world.release("2.1.0")

    # Not validated yet: the dealer's my_fleet rollout is refused.
    body = {"release_id": release["id"], "scope": "my_fleet"}
    refused = await world.call("firmware", "POST", "/rollouts", dealer(a), body)
    assert refused.status_code == 409, refused.text

    started = await world.call(
        "firmware",
        "POST",
        f"/firmware/releases/{release['id']}/validations",
        dealer(a),
        {"device_id": test_unit},
    )
    assert started.status_code == 201, started.text

    async def validated() -> bool:
        r = await world.call("firmware", "GET", f"/firmware/releases/{release['id']}", dealer(a))
        return bool(r.json()["validated"])

    await eventually("the validation on the test device", validated)
    assert await world.fleet_version(test_unit) == "2.1.0"

    created = await world.call("firmware", "POST", "/rollouts", dealer(a), body)
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    # The test unit already runs 2.1.0 (skipped); the Ultra unit is not an X Pro.
    assert created.json()["skipped"] == 1
    assert created.json()["counts"]["pending"] == len(wifi) + len(slow)

    done = await world.until(rollout_id, lambda r: r["status"] == "completed")
    assert (done["counts"].get("confirmed"), done["counts"].get("failed", 0)) == (4, 0)
    states = await world.states(rollout_id)
    assert set(states) == {*wifi, *slow}
    for device_id in (*wifi, *slow):
        assert states[device_id]["state"] == "confirmed", states[device_id]
        assert await world.fleet_version(device_id) == "2.1.0"
    # The GSM and GPS units were confirmed later than the WiFi deadline after their request,
    # on their first attempt (no retries here): judged by their own, longer deadline.
    wifi_deadline = float(DEADLINES["FIRMWARE_DEADLINE_WIFI_S"])
    for device_id in slow:
        took = datetime.fromisoformat(states[device_id]["updated_at"]) - datetime.fromisoformat(
            states[device_id]["sent_at"]
        )
        assert took.total_seconds() > wifi_deadline, states[device_id]
        assert states[device_id]["attempts"] == 1
    # No other dealer's device, and no device outside the release's model, received anything.
    for device_id in (*others, *world.of("a-ultra")):
        assert await world.ota_commands(device_id) == []
        assert await world.fleet_version(device_id) == OLD


async def test_wrong_version_fails_crossing_the_threshold_pauses_resume_finishes(
    world: World,
) -> None:
    wrong, good = world.of("c-bad")[0], world.of("c-ok")
    c = world.devices[wrong]["dealer_id"]
    await known_to_firmware(world, [wrong, *good])
    release = await world.release("2.2.0")
    rollout_id = await world.rollout_for(
        c, release["id"], batch_size=1, failure_threshold_pct=20, failure_min_finished=1
    )
    paused = await world.until(rollout_id, lambda r: r["status"] == "paused")
    assert paused["status_reason"] == "threshold"
    assert (paused["counts"].get("failed"), paused["counts"].get("pending")) == (1, 3)
    failed = (await world.states(rollout_id))[wrong]
    assert failed["state"] == "failed"
    assert failed["reported_version"] == OLD
    assert "expected 2.2.0" in failed["detail"]
    assert await world.fleet_version(wrong) == OLD
    for device_id in good:
        assert await world.ota_commands(device_id) == []

    resumed = await world.call("firmware", "POST", f"/rollouts/{rollout_id}/resume", dealer(c))
    assert resumed.status_code == 200, resumed.text
    done = await world.until(rollout_id, lambda r: r["status"] == "completed")
    assert (done["counts"].get("confirmed"), done["counts"].get("failed")) == (3, 1)
    for device_id in good:
        assert await world.fleet_version(device_id) == "2.2.0"


async def test_pause_stops_dispatch_resume_continues_clear_cancels_the_rest(world: World) -> None:
    units = world.of("d")
    d = world.devices[units[0]]["dealer_id"]
    await known_to_firmware(world, units)
    release = await world.release("2.3.0")
    # One device a second at most: unpaused, the whole fleet is out within a few seconds.
    rollout_id = await world.rollout_for(d, release["id"], batch_size=4, max_per_minute=60)
    paused = await world.call("firmware", "POST", f"/rollouts/{rollout_id}/pause", dealer(d))
    assert paused.status_code == 200, paused.text
    pending = paused.json()["counts"]["pending"]
    assert pending >= 2, paused.json()

    # In-flight devices finish while paused; nothing new goes out meanwhile.
    def settled(r: dict[str, Any]) -> bool:
        return not any(r["counts"].get(s, 0) for s in ("sent", "updating", "awaiting_return"))

    while_paused = await world.until(rollout_id, settled)
    assert while_paused["status"] == "paused"
    assert while_paused["counts"]["pending"] == pending
    assert while_paused["counts"].get("confirmed", 0) == len(units) - pending

    resumed = await world.call("firmware", "POST", f"/rollouts/{rollout_id}/resume", dealer(d))
    assert resumed.status_code == 200, resumed.text
    await world.until(rollout_id, lambda r: r["counts"].get("pending", 0) < pending)
    cleared = await world.call("firmware", "POST", f"/rollouts/{rollout_id}/clear", dealer(d))
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["status"] == "cleared"
    final = await world.until(rollout_id, settled)
    assert final["status"] == "cleared"
    assert final["counts"].get("pending", 0) == 0
    states = await world.states(rollout_id)
    cancelled = [u for u in units if states[u]["state"] == "cancelled"]
    assert cancelled, states
    assert all(states[u]["state"] in ("confirmed", "cancelled") for u in units), states
    for device_id in units:
        sent = await world.ota_commands(device_id)
        if device_id in cancelled:
            assert sent == []
            assert await world.fleet_version(device_id) == OLD
        else:
            assert len(sent) == 1
            assert await world.fleet_version(device_id) == "2.3.0"


async def test_sigkill_of_the_firmware_service_mid_rollout_changes_nothing(world: World) -> None:
    units = world.of("e")
    e = world.devices[units[0]]["dealer_id"]
    await known_to_firmware(world, units)
    release = await world.release("2.4.0")
    rollout_id = await world.rollout_for(e, release["id"], batch_size=4, max_per_minute=30)
    # Mid-rollout: some devices sent, some still waiting for the pace (one every 2 s).
    await world.until(
        rollout_id,
        lambda r: r["counts"].get("pending", 0) <= len(units) - 2 and r["counts"].get("pending"),
    )
    world.firmware.kill()
    await world.firmware.start()
    done = await world.until(rollout_id, lambda r: r["status"] == "completed")
    assert done["counts"].get("confirmed") == len(units), done
    for device_id in units:
        # Dispatched once: a request re-published after the kill is deduplicated downstream.
        assert len(await world.ota_commands(device_id)) == 1
        assert await world.fleet_version(device_id) == "2.4.0"
