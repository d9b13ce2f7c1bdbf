"""Firmware rollouts against real Kafka and PostgreSQL, driven by device-style events.

The firmware service runs in-process (its real consumers, dispatcher and outbox relay) on this
session's prefixed topics. `FakeFleet` plays the fleet service (publishes `fleet.device.v1`), the
commands service and the devices: it reads the OTA requests the firmware service puts on
`command.request.v1` and answers the way the device protocol does (command status with the
correlation echoed, `up/ota` phases, offline while rebooting, back online with a firmware
version), per device as each test tells it. The simulator-driven end-to-end flow lives in
`test_firmware_e2e.py`.
"""

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, SecretStr
from sqlalchemy import select

from common.auth import Principal
from common.contracts import ALL_TOPICS, commands, device, firmware, fleet
from common.contracts.topic import Topic
from common.events import encode, new_event
from common.testing.auth import TestIssuer
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses, free_port
from firmware import store
from firmware.app import create_app
from firmware.settings import FirmwareSettings

pytestmark = pytest.mark.stack

ADMIN = Principal(user_id="admin-1", role="admin", email="admin@example.com")
SHA = "ab" * 32


def dealer(dealer_id: str) -> Principal:
    return Principal(user_id=f"staff-{dealer_id}", role="dealer", dealer_id=dealer_id)


@dataclass
class Behaviour:
    """How a fake device answers an OTA: `ok`, `wrong` version, `never` back, OTA `fail`,
    `blip` (its connection drops mid-download and comes back on the old version, then the
    update goes on and succeeds)."""

    outcome: str = "ok"
    return_after_s: float = 0.0


@dataclass
class FakeFleet:
    """Fleet registry, commands service and devices, speaking only Kafka (see module doc)."""

    bootstrap: str
    prefix: str
    versions: dict[str, str] = field(default_factory=dict)  # release id -> version
    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    requests: list[commands.CommandRequest] = field(default_factory=list)
    request_events: list[str] = field(default_factory=list)
    producer: AIOKafkaProducer | None = None
    _tasks: set["asyncio.Task[None]"] = field(default_factory=set)
    _handled: set[str] = field(default_factory=set)

    async def publish(self, topic: Topic[Any], key: str, data: BaseModel) -> None:
        assert self.producer is not None
        event = new_event(type=topic.event_type, data=data, source="tests", key=key)
        await self.producer.send_and_wait(self.prefix + topic.name, encode(event), key=key.encode())

    async def register(
        self,
        device_id: str,
        *,
        dealer_id: str,
        model: str = "Ultra",
        transport: str = "wifi",
        engine: str | None = None,
        gps: bool = False,
        test_device: bool = False,
        fw: str = "1.0.0",
    ) -> None:
        """A device in the registry, online on firmware `fw`."""
        await self.publish(
            fleet.DEVICE,
            device_id,
            fleet.FleetDevice(
                device_id=device_id,
                name=device_id,
                model=model,
                engine=engine,
                transport=transport,
                gps=gps,
                dealer_id=dealer_id,
                customer_email=f"{device_id.lower()}@example.com",
                test_device=test_device,
            ),
        )
        await self.presence(device_id, online=True, fw=fw)

    async def presence(self, device_id: str, *, online: bool, fw: str | None) -> None:
        await self.publish(
            device.PRESENCE,
            device_id,
            device.DevicePresence(
                device_id=device_id,
                received_at=datetime.now(UTC),
                state="online" if online else "offline",
                fw=fw,
            ),
        )

    async def run(self) -> None:
        """Answer every OTA request until cancelled."""
        consumer = AIOKafkaConsumer(
            self.prefix + commands.REQUEST.name,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        try:
            async for record in consumer:
                envelope = commands.REQUEST.parse(record.value)
                if envelope.data.params.get("release_id") not in self.versions:
                    continue  # another test's request on the session's shared topic
                self.requests.append(envelope.data)
                self.request_events.append(str(envelope.event_id))
                if envelope.data.request_id in self._handled:
                    continue  # a redelivered request: the commands service dedups it
                self._handled.add(envelope.data.request_id)
                task = asyncio.create_task(self._answer(envelope.data))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            await consumer.stop()

    async def _answer(self, request: commands.CommandRequest) -> None:
        device_id = request.device_id
        behaviour = self.behaviour.get(device_id, Behaviour())
        version = self.versions[request.params["release_id"]]
        command_id = f"cmd-{uuid.uuid4().hex[:12]}"
        await self._status(request, command_id, "sent")
        await self._status(request, command_id, "acked")
        await self._ota(device_id, command_id, "downloading")
        if behaviour.outcome == "blip":
            await asyncio.sleep(0.3)
            await self.presence(device_id, online=False, fw=None)
            await asyncio.sleep(0.3)
            await self.presence(device_id, online=True, fw="1.0.0")
            await asyncio.sleep(0.3)
        if behaviour.outcome == "fail":
            await self._ota(device_id, command_id, "failed", detail="checksum mismatch")
            return
        await self._ota(device_id, command_id, "installing")
        await self._ota(device_id, command_id, "rebooting")
        await asyncio.sleep(0.3)  # devices take a moment: keeps the phases ahead of presence
        await self.presence(device_id, online=False, fw=None)
        if behaviour.outcome == "never":
            return
        await asyncio.sleep(0.3 + behaviour.return_after_s)
        fw = "9.9.9" if behaviour.outcome == "wrong" else version
        await self.presence(device_id, online=True, fw=fw)

    async def _status(self, request: commands.CommandRequest, command_id: str, status: str) -> None:
        await self.publish(
            commands.STATUS,
            request.device_id,
            commands.CommandStatus(
                command_id=command_id,
                device_id=request.device_id,
                action=request.action,
                status=status,
                at=datetime.now(UTC),
                correlation=request.correlation,
            ),
        )

    async def _ota(
        self, device_id: str, command_id: str, phase: str, detail: str | None = None
    ) -> None:
        await self.publish(
            device.REPORT,
            device_id,
            device.DeviceReport(
                device_id=device_id,
                received_at=datetime.now(UTC),
                kind="ota",
                command_id=command_id,
                phase=phase,
                detail=detail,
            ),
        )

    def devices_asked(self) -> set[str]:
        return {r.device_id for r in self.requests}


@dataclass
class Firmware:
    """The running service, a client acting as anyone, and the fake fleet."""

    client: httpx.AsyncClient
    issuer: TestIssuer
    fake: FakeFleet
    app: Any
    database_url: str

    async def call(
        self, method: str, path: str, who: Principal, body: Any = None
    ) -> httpx.Response:
        return await self.client.request(
            method, f"/api/v1{path}", json=body, headers=self.issuer.headers(who)
        )

    async def release(self, **overrides: Any) -> dict[str, Any]:
        body = {
            "console": "ultra",
            "version": f"2.{uuid.uuid4().int % 1000}.0",
            "models": ["Ultra"],
            "transport": "wifi",
            "artifact_url": "https://firmware.example/ultra.bin",
            "sha256": SHA,
            "size": 1024,
        } | overrides
        response = await self.call("POST", "/firmware/releases", ADMIN, body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        self.fake.versions[created["id"]] = created["version"]
        return created

    async def rollout(self, rollout_id: str, who: Principal = ADMIN) -> dict[str, Any]:
        response = await self.call("GET", f"/rollouts/{rollout_id}", who)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    async def devices(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        response = await self.call("GET", f"/rollouts/{rollout_id}/devices?limit=500", ADMIN)
        assert response.status_code == 200, response.text
        return {d["device_id"]: d for d in response.json()["items"]}

    async def until_status(
        self, rollout_id: str, *statuses: str, timeout: float = 60
    ) -> dict[str, Any]:
        found: dict[str, Any] = {}

        async def done() -> bool:
            found.update(await self.rollout(rollout_id))
            return found["status"] in statuses

        await eventually(done, timeout)
        return found


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


def settings_for(
    stack: StackAddresses, prefix: str, url: str, **overrides: Any
) -> FirmwareSettings:
    values: dict[str, Any] = {
        "database_url": SecretStr(url),
        "kafka_bootstrap_servers": stack.kafka_bootstrap_servers,
        "redis_url": SecretStr(stack.redis_url),
        "kafka_topic_prefix": prefix,
        "outbox_poll_interval_s": 0.05,
        "dispatch_interval_s": 0.05,
        "consumer_batch_timeout_ms": 50,
        "deadline_wifi_s": 60,
        "deadline_gsm_s": 120,
        "deadline_gps_s": 120,
        "ota_max_retries": 0,
        "retry_backoff_s": 0.1,
    }
    return FirmwareSettings(**(values | overrides))


@pytest.fixture
async def topics(kafka_topics: KafkaTopics) -> str:
    await kafka_topics.create(*(t.name for t in ALL_TOPICS))
    return kafka_topics.prefix


@pytest.fixture
def service_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Per-test overrides of the firmware settings (tests parametrize this indirectly)."""
    return dict(getattr(request, "param", {}))


@pytest.fixture
async def fw(
    stack: StackAddresses,
    fresh_database: Migrate,
    topics: str,
    service_settings: dict[str, Any],
) -> AsyncIterator[Firmware]:
    # Each test gets its own prefix-within-the-prefix consumer groups by a fresh database and
    # its own fake; topics are shared by the session, so device ids are unique per test.
    url = await fresh_database("firmware")
    issuer = TestIssuer()
    app = create_app(
        settings_for(stack, topics, url, **service_settings), verifier=issuer.verifier()
    )
    fake = FakeFleet(bootstrap=stack.kafka_bootstrap_servers, prefix=topics)
    fake.producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await fake.producer.start()
    runner = asyncio.create_task(fake.run())
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://firmware") as client:
                yield Firmware(client, issuer, fake, app, url)
    finally:
        runner.cancel()
        await asyncio.gather(runner, *fake._tasks, return_exceptions=True)
        await fake.producer.stop()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def projected(fw: Firmware, *device_ids: str) -> None:
    """Wait until the service's device projection knows these devices (and their firmware)."""
    engine = fw.app.state.infra.engine

    async def known() -> bool:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    store.devices_with_presence().where(
                        store.devices.c.device_id.in_(device_ids),
                        store.device_presence.c.fw.is_not(None),
                    )
                )
            ).all()
        return len(rows) == len(device_ids)

    await eventually(known)


async def projected_in(url: str, device_ids: list[str]) -> None:
    """Wait until the database at `url` projects these devices with their firmware."""
    from common.db import make_engine

    engine = make_engine(url, pool_size=1)
    try:

        async def known() -> bool:
            async with engine.connect() as conn:
                rows = (
                    await conn.execute(
                        store.devices_with_presence().where(
                            store.devices.c.device_id.in_(device_ids),
                            store.device_presence.c.fw.is_not(None),
                        )
                    )
                ).all()
            return len(rows) == len(device_ids)

        await eventually(known, 60)
    finally:
        await engine.dispose()


async def read_topic(
    bootstrap: str, topic: str, *, until: Callable[[list[Any]], bool]
) -> list[Any]:
    """Records of `topic` from the start, read until `until(records)` holds."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while not until(records):
                batches = await consumer.getmany(timeout_ms=500)
                records += [json.loads(r.value) for rs in batches.values() for r in rs]
    finally:
        await consumer.stop()
    return records


# ------------------------------------------------------------------ the whole flow


async def test_validate_then_deploy_my_fleet_confirms_every_matching_device(  # noqa: PLR0915
    fw: Firmware, stack: StackAddresses, topics: str
) -> None:
    a, b = unique("dealer-a"), unique("dealer-b")
    test_unit, mine, gsm_unit, theirs = (
        unique("T"),
        [unique(f"A{i}") for i in range(4)],
        unique("AG"),
        unique("B"),
    )
    await fw.fake.register(test_unit, dealer_id=a, test_device=True)
    for d in mine:
        await fw.fake.register(d, dealer_id=a)
    await fw.fake.register(gsm_unit, dealer_id=a, transport="gsm")
    await fw.fake.register(theirs, dealer_id=b, test_device=True)
    await projected(fw, test_unit, *mine, gsm_unit, theirs)
    release = await fw.release()

    # Not validated yet: the dealer's rollout is refused.
    deploy = {"release_id": release["id"], "scope": "my_fleet", "strategy": {"batch_size": 2}}
    refused = await fw.call("POST", "/rollouts", dealer(a), deploy)
    assert refused.status_code == 409, refused.text
    assert "validat" in refused.json()["detail"]

    # Validation only on a test device in the dealer's own scope.
    not_test = await fw.call(
        "POST", f"/firmware/releases/{release['id']}/validations", dealer(a), {"device_id": mine[0]}
    )
    assert not_test.status_code == 422, not_test.text
    other = await fw.call(
        "POST", f"/firmware/releases/{release['id']}/validations", dealer(a), {"device_id": theirs}
    )
    assert other.status_code == 404, other.text
    validation = await fw.call(
        "POST",
        f"/firmware/releases/{release['id']}/validations",
        dealer(a),
        {"device_id": test_unit},
    )
    assert validation.status_code == 201, validation.text

    async def validated() -> bool:
        r = await fw.call("GET", f"/firmware/releases/{release['id']}", dealer(a))
        return bool(r.json()["validated"])

    await eventually(validated)
    b_view = await fw.call("GET", f"/firmware/releases/{release['id']}", dealer(b))
    assert b_view.json()["validated"] is False  # validated for dealer A, not for B
    listing = await fw.call("GET", f"/firmware/releases/{release['id']}/validations", dealer(a))
    assert [(v["device_id"], v["state"], v["passed"]) for v in listing.json()["items"]] == [
        (test_unit, "confirmed", True)
    ]

    created = await fw.call("POST", "/rollouts", dealer(a), deploy)
    assert created.status_code == 201, created.text
    rollout = created.json()
    assert rollout["status"] == "running"
    assert rollout["skipped"] == 1  # the test device already runs the version
    done = await fw.until_status(rollout["id"], "completed")
    assert done["counts"]["confirmed"] == len(mine)
    assert done["counts"]["failed"] == 0
    per_device = await fw.devices(rollout["id"])
    assert set(per_device) == set(mine)  # WiFi variant only: the GSM unit is not targeted
    assert {d["state"] for d in per_device.values()} == {"confirmed"}
    assert {d["reported_version"] for d in per_device.values()} == {release["version"]}
    assert theirs not in fw.fake.devices_asked()
    assert gsm_unit not in fw.fake.devices_asked()
    assert fw.fake.devices_asked() == {test_unit, *mine}

    # The dealer sees its rollout; the other dealer does not.
    assert (await fw.call("GET", f"/rollouts/{rollout['id']}", dealer(b))).status_code == 404
    mine_listed = await fw.call("GET", "/rollouts", dealer(a))
    assert [r["id"] for r in mine_listed.json()["items"]] == [rollout["id"]]

    # Events: the release went out for the commands service; each device's path is recorded.
    def has_completed(records: list[Any]) -> bool:
        return any(
            r["data"]["rollout_id"] == rollout["id"] and r["data"]["kind"] == "completed"
            for r in records
        )

    events = await read_topic(
        stack.kafka_bootstrap_servers, topics + firmware.ROLLOUT.name, until=has_completed
    )
    ours = [e["data"] for e in events if e["data"]["rollout_id"] == rollout["id"]]
    assert ours[0]["kind"] == "created"
    assert ours[-1]["kind"] == "completed"
    path = [e["state"] for e in ours if e["device_id"] == mine[0]]
    assert path == ["sent", "updating", "awaiting_return", "confirmed"]
    releases = await read_topic(
        stack.kafka_bootstrap_servers,
        topics + firmware.RELEASE.name,
        until=lambda rs: any(r["data"]["release_id"] == release["id"] for r in rs),
    )
    published = next(r["data"] for r in releases if r["data"]["release_id"] == release["id"])
    assert (published["version"], published["transport"]) == (release["version"], "wifi")


# ------------------------------------------------------------------ bad input


async def test_bad_input_gets_the_right_problem(fw: Firmware) -> None:
    a = unique("dealer-a")
    wifi_test, wifi_unit = unique("TW"), unique("W")
    await fw.fake.register(wifi_test, dealer_id=a, test_device=True)
    await fw.fake.register(wifi_unit, dealer_id=a)
    await projected(fw, wifi_test, wifi_unit)
    gsm_release = await fw.release(transport="gsm")

    async def status(method: str, path: str, who: Principal, body: Any = None) -> tuple[int, str]:
        response = await fw.call(method, path, who, body)
        assert response.headers["content-type"].startswith("application/problem+json")
        return response.status_code, response.json()["detail"]

    # A dealer's global rollout.
    code, _ = await status(
        "POST", "/rollouts", dealer(a), {"release_id": gsm_release["id"], "scope": "global"}
    )
    assert code == 403
    # An Ultra GSM release aimed at an Ultra WiFi device: validation and rollout.
    code, detail = await status(
        "POST",
        f"/firmware/releases/{gsm_release['id']}/validations",
        dealer(a),
        {"device_id": wifi_test},
    )
    assert (code, "transport" in detail) == (422, True)
    code, detail = await status(
        "POST",
        "/rollouts",
        ADMIN,
        {
            "release_id": gsm_release["id"],
            "scope": "my_fleet",
            "dealer_id": a,
            "target": {"device_ids": [wifi_unit]},
            "override": True,
            "override_reason": "testing",
        },
    )
    assert (code, "transport" in detail, "gsm" in detail) == (422, True, True)
    code, detail = await status(
        "POST",
        "/rollouts",
        ADMIN,
        {"release_id": gsm_release["id"], "scope": "global", "target": {"transport": "wifi"}},
    )
    assert (code, "target.transport" in detail) == (422, True)
    # Unknown release, out-of-scope device.
    code, _ = await status(
        "POST", "/rollouts", dealer(a), {"release_id": "nope", "scope": "my_fleet"}
    )
    assert code == 404
    code, _ = await status(
        "POST",
        f"/firmware/releases/{gsm_release['id']}/validations",
        dealer(unique("other")),
        {"device_id": wifi_test},
    )
    assert code == 404
    # Invalid strategy numbers, unknown console/model/engine, a dealer creating a release.
    for strategy in ({"batch_size": 0}, {"max_per_minute": -5}, {"failure_threshold_pct": 101}):
        code, _ = await status(
            "POST",
            "/rollouts",
            dealer(a),
            {"release_id": gsm_release["id"], "scope": "my_fleet", "strategy": strategy},
        )
        assert code == 422, strategy
    base = {
        "version": "3.0.0",
        "artifact_url": "https://firmware.example/x.bin",
        "sha256": SHA,
        "size": 10,
    }
    for bad, named in (
        ({"console": "nova", "models": ["Ultra"], "transport": "gsm"}, "console"),
        ({"console": "ultra", "models": ["Ultra", "D100"], "transport": "gsm"}, "models"),
        (
            {"console": "unified", "models": ["D100"], "engine": "steam", "transport": "gsm"},
            "engine",
        ),
        ({"console": "ultra", "models": ["Ultra"], "transport": "lora"}, "transport"),
        (
            {"console": "ultra", "models": ["Ultra"], "transport": "gsm", "version": "two"},
            "version",
        ),
    ):
        code, detail = await status("POST", "/firmware/releases", ADMIN, base | bad)
        assert code == 422, bad
        assert named in detail, (bad, detail)
    code, _ = await status(
        "POST", "/firmware/releases", dealer(a), base | {"console": "xpro", "models": ["X Pro"]}
    )
    assert code == 403
    code, _ = await status("GET", "/firmware/releases/nope", dealer(a))
    assert code == 404
    consoles = await fw.call("GET", "/firmware/consoles", dealer(a))
    assert [c["id"] for c in consoles.json()["items"]] == ["xpro", "unified", "ultra"]
    unified = consoles.json()["items"][1]
    assert [m["name"] for m in unified["models"]] == ["D100", "D180", "V100", "V5"]


# ------------------------------------------------------------------ failures


async def test_wrong_version_fails_and_crossing_the_threshold_pauses(fw: Firmware) -> None:
    a = unique("dealer-a")
    units = [unique(f"U{i}") for i in range(4)]
    for d in units:
        await fw.fake.register(d, dealer_id=a)
    await projected(fw, *units)
    fw.fake.behaviour[units[0]] = Behaviour("wrong")
    fw.fake.behaviour[units[1]] = Behaviour("fail")
    release = await fw.release()
    created = await fw.call(
        "POST",
        "/rollouts",
        ADMIN,
        {
            "release_id": release["id"],
            "scope": "my_fleet",
            "dealer_id": a,
            # Judged from the first finished device (the minimum sample has its own test).
            "strategy": {"batch_size": 1, "failure_threshold_pct": 40, "failure_min_finished": 1},
            "override": True,
            "override_reason": "lab fleet, validated by hand",
        },
    )
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    assert created.json()["override_reason"] == "lab fleet, validated by hand"

    paused = await fw.until_status(rollout_id, "paused")
    assert paused["status_reason"] == "threshold"
    # Twice in CI (loaded machine) the first pause counted 2 failed, 2 pending: the dispatcher
    # read the counts twice per pass, and a failure committed in between freed the batch's
    # slot without pausing. It reads them once now; the devices' states say what went out.
    assert (paused["counts"]["failed"], paused["counts"]["pending"]) == (1, 3), (
        paused,
        await fw.devices(rollout_id),
    )
    first = (await fw.devices(rollout_id))[units[0]]
    assert first["state"] == "failed"
    assert "9.9.9" in first["detail"]
    assert first["reported_version"] == "9.9.9"

    # Resume acknowledges that failure; the next one (OTA failed) is a new failure: paused again.
    assert (await fw.call("POST", f"/rollouts/{rollout_id}/resume", ADMIN)).status_code == 200
    again = await fw.until_status(rollout_id, "paused")
    assert again["counts"]["failed"] == 2
    second = (await fw.devices(rollout_id))[units[1]]
    assert "checksum mismatch" in second["detail"]
    assert (await fw.call("POST", f"/rollouts/{rollout_id}/resume", ADMIN)).status_code == 200
    done = await fw.until_status(rollout_id, "completed")
    assert (done["counts"]["confirmed"], done["counts"]["failed"]) == (2, 2)

    engine = fw.app.state.infra.engine
    async with engine.connect() as conn:
        audit = (await conn.execute(select(store.audit_log))).all()
    assert [(r.action, r.reason, r.actor) for r in audit] == [
        ("rollout.override_validation", "lab fleet, validated by hand", ADMIN.user_id)
    ]


async def test_one_early_failure_does_not_pause_before_the_minimum_sample(fw: Firmware) -> None:
    a = unique("dealer-a")
    # Device ids sort the failing unit first: with one OTA in flight at a time, its failure is
    # the first finished device (100% failed of 1), which must not pause the rollout.
    first = f"A-{unique('U')}"
    rest = [f"B{i:02d}-{unique('U')}" for i in range(11)]
    for d in (first, *rest):
        await fw.fake.register(d, dealer_id=a)
    await projected(fw, first, *rest)
    fw.fake.behaviour[first] = Behaviour("wrong")
    release = await fw.release()
    created = await fw.call(
        "POST",
        "/rollouts",
        ADMIN,
        {
            "release_id": release["id"],
            "scope": "my_fleet",
            "dealer_id": a,
            "strategy": {"batch_size": 1, "failure_threshold_pct": 10, "failure_min_finished": 10},
            "override": True,
            "override_reason": "minimum sample",
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["strategy"]["failure_min_finished"] == 10
    rollout_id = created.json()["id"]
    done = await fw.until_status(rollout_id, "completed")
    assert (done["counts"]["confirmed"], done["counts"]["failed"]) == (11, 1)
    # Nothing resumes a paused rollout by itself: completing means it never paused.
    assert (await fw.devices(rollout_id))[first]["state"] == "failed"


@pytest.mark.parametrize(
    "service_settings", [{"deadline_wifi_s": 2.0, "deadline_gsm_s": 60.0}], indirect=True
)
async def test_gsm_units_returning_later_than_wifi_units_are_not_failed_early(
    fw: Firmware,
) -> None:
    a = unique("dealer-a")
    gsm_late, wifi_gone = unique("G"), unique("W")
    await fw.fake.register(gsm_late, dealer_id=a, model="X Pro", transport="gsm")
    await fw.fake.register(wifi_gone, dealer_id=a, model="X Pro", transport="wifi")
    await projected(fw, gsm_late, wifi_gone)
    # The GSM unit comes back well after the WiFi deadline; the WiFi unit never does.
    fw.fake.behaviour[gsm_late] = Behaviour("ok", return_after_s=4.0)
    fw.fake.behaviour[wifi_gone] = Behaviour("never")
    release = await fw.release(console="xpro", models=["X Pro"], transport=None)
    created = await fw.call(
        "POST",
        "/rollouts",
        ADMIN,
        {
            "release_id": release["id"],
            "scope": "global",
            "strategy": {"batch_size": 10, "failure_threshold_pct": 100},
            "override": True,
            "override_reason": "deadline test",
        },
    )
    assert created.status_code == 201, created.text
    done = await fw.until_status(created.json()["id"], "completed")
    devices = await fw.devices(created.json()["id"])
    assert devices[gsm_late]["state"] == "confirmed"
    assert devices[wifi_gone]["state"] == "failed"
    assert "not back" in devices[wifi_gone]["detail"]
    assert (done["counts"]["confirmed"], done["counts"]["failed"]) == (1, 1)


async def test_a_connection_lost_mid_download_does_not_fail_the_device(fw: Firmware) -> None:
    a = unique("dealer-a")
    blip, steady = unique("B"), unique("S")
    for d in (blip, steady):
        await fw.fake.register(d, dealer_id=a)
    await projected(fw, blip, steady)
    fw.fake.behaviour[blip] = Behaviour("blip")
    release = await fw.release()
    created = await fw.call(
        "POST",
        "/rollouts",
        ADMIN,
        {
            "release_id": release["id"],
            "scope": "my_fleet",
            "dealer_id": a,
            "strategy": {"batch_size": 10, "failure_threshold_pct": 100},
            "override": True,
            "override_reason": "network blip test",
        },
    )
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    done = await fw.until_status(rollout_id, "completed")
    devices = await fw.devices(rollout_id)
    assert {d: devices[d]["state"] for d in (blip, steady)} == {
        blip: "confirmed",
        steady: "confirmed",
    }, devices
    assert (done["counts"]["confirmed"], done["counts"]["failed"]) == (2, 0)


# ------------------------------------------------------------------ metrics


async def gauges(fw: Firmware) -> dict[tuple[str, str, str], float]:
    """The rollout gauges on /metrics: (metric, purpose, status or state) -> value."""
    response = await fw.client.get("/metrics")
    assert response.status_code == 200
    found = {}
    for family in text_string_to_metric_families(response.text):
        if family.name.startswith("autogen_firmware_rollout"):
            for sample in family.samples:
                label = sample.labels.get("status") or sample.labels.get("state", "")
                found[(sample.name, sample.labels["purpose"], label)] = sample.value
    return found


@pytest.mark.parametrize("service_settings", [{"metrics_interval_s": 0.1}], indirect=True)
async def test_metrics_count_rollouts_by_status_and_devices_by_state(fw: Firmware) -> None:
    a = unique("dealer-a")
    units = [unique(f"M{i}") for i in range(3)]
    for d in units:
        await fw.fake.register(d, dealer_id=a)
        fw.fake.behaviour[d] = Behaviour("never")
    await projected(fw, *units)
    release = await fw.release()
    created = await fw.call(
        "POST",
        "/rollouts",
        ADMIN,
        {
            "release_id": release["id"],
            "scope": "my_fleet",
            "dealer_id": a,
            "strategy": {"batch_size": 2},
            "override": True,
            "override_reason": "metrics",
        },
    )
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    rollouts, devices = "autogen_firmware_rollouts", "autogen_firmware_rollout_devices"

    async def waiting() -> bool:
        g = await gauges(fw)
        return (
            g.get((rollouts, "rollout", "running")) == 1
            and g.get((devices, "rollout", "awaiting_return")) == 2
            and g.get((devices, "rollout", "pending")) == 1
        )

    await eventually(waiting)
    assert (await fw.call("POST", f"/rollouts/{rollout_id}/clear", ADMIN)).status_code == 200

    async def cleared() -> bool:
        g = await gauges(fw)
        return (
            g.get((rollouts, "rollout", "cleared")) == 1
            and g.get((rollouts, "rollout", "running")) == 0
            and g.get((devices, "rollout", "awaiting_return")) == 0
        )

    await eventually(cleared)


# ------------------------------------------------------------------ pause, resume, clear


async def test_pause_stops_dispatch_resume_continues_clear_cancels_the_rest(fw: Firmware) -> None:
    a = unique("dealer-a")
    test_unit = unique("T")
    units = [unique(f"P{i}") for i in range(8)]
    await fw.fake.register(test_unit, dealer_id=a, test_device=True)
    for d in units:
        await fw.fake.register(d, dealer_id=a)
    await projected(fw, test_unit, *units)
    release = await fw.release()
    validation = await fw.call(
        "POST",
        f"/firmware/releases/{release['id']}/validations",
        dealer(a),
        {"device_id": test_unit},
    )
    assert validation.status_code == 201

    async def validated() -> bool:
        r = await fw.call("GET", f"/firmware/releases/{release['id']}", dealer(a))
        return bool(r.json()["validated"])

    await eventually(validated)
    created = await fw.call(
        "POST",
        "/rollouts",
        dealer(a),
        {"release_id": release["id"], "scope": "my_fleet", "strategy": {"max_per_minute": 60}},
    )
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    paused = await fw.call("POST", f"/rollouts/{rollout_id}/pause", dealer(a))
    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused"
    assert (await fw.call("POST", f"/rollouts/{rollout_id}/pause", dealer(a))).status_code == 409
    dispatcher = fw.app.state.dispatcher
    before = await fw.rollout(rollout_id)
    # Paused: a dispatcher pass sends nothing, whatever the pace allows.
    assert await dispatcher.run_once() == 0
    assert (await fw.rollout(rollout_id))["counts"]["pending"] == before["counts"]["pending"]
    assert before["counts"]["pending"] >= 6

    resumed = await fw.call("POST", f"/rollouts/{rollout_id}/resume", dealer(a))
    assert resumed.json()["status"] == "running"

    async def one_more_confirmed() -> bool:
        counts = (await fw.rollout(rollout_id))["counts"]
        return bool(counts["confirmed"] >= 1 and counts["pending"] < before["counts"]["pending"])

    await eventually(one_more_confirmed)
    cleared = await fw.call("POST", f"/rollouts/{rollout_id}/clear", dealer(a))
    assert cleared.status_code == 200, cleared.text
    body = cleared.json()
    assert body["status"] == "cleared"
    assert body["counts"]["pending"] == 0
    assert body["counts"]["cancelled"] >= 1
    asked = fw.fake.devices_asked()
    assert await dispatcher.run_once() == 0

    # Devices in flight finish; nothing new goes out; the rollout stays cleared.
    async def settled() -> bool:
        counts = (await fw.rollout(rollout_id))["counts"]
        return bool(counts["sent"] + counts["updating"] + counts["awaiting_return"] == 0)

    await eventually(settled)
    final = await fw.rollout(rollout_id)
    assert final["status"] == "cleared"
    assert final["counts"]["confirmed"] + final["counts"]["cancelled"] == len(units)
    assert fw.fake.devices_asked() == asked
    cancelled = [d for d in (await fw.devices(rollout_id)).values() if d["state"] == "cancelled"]
    assert cancelled
    assert all(d["attempts"] == 0 for d in cancelled)
    assert not {d["device_id"] for d in cancelled} & asked
    assert (await fw.call("POST", f"/rollouts/{rollout_id}/resume", dealer(a))).status_code == 409


async def test_a_device_is_in_one_active_rollout_at_most(fw: Firmware) -> None:
    a = unique("dealer-a")
    units = [unique(f"S{i}") for i in range(3)]
    for d in units:
        await fw.fake.register(d, dealer_id=a)
    await projected(fw, *units)
    release = await fw.release()
    body = {
        "release_id": release["id"],
        "scope": "my_fleet",
        "dealer_id": a,
        "strategy": {"max_per_minute": 1},
        "override": True,
        "override_reason": "one at a time",
    }
    first = await fw.call("POST", "/rollouts", ADMIN, body)
    assert first.status_code == 201, first.text
    await fw.call("POST", f"/rollouts/{first.json()['id']}/pause", ADMIN)
    second = await fw.call("POST", "/rollouts", ADMIN, body)
    assert second.status_code == 409, second.text
    # An admin's supersede takes over devices still waiting, never one with an OTA in flight.
    first_devices = await fw.devices(first.json()["id"])
    waiting = [d for d, v in first_devices.items() if v["state"] == "pending"]
    taken = await fw.call(
        "POST", "/rollouts", ADMIN, body | {"supersede": True, "target": {"device_ids": waiting}}
    )
    assert taken.status_code == 201, taken.text
    after = await fw.devices(first.json()["id"])
    assert all(after[d]["state"] == "cancelled" for d in waiting)
    dealer_supersede = await fw.call(
        "POST", "/rollouts", dealer(a), body | {"supersede": True, "override": False}
    )
    assert dealer_supersede.status_code == 403


# ------------------------------------------------------------------ SIGKILL


@dataclass
class Process:
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        # The interpreter itself, not `uv run`: a SIGKILL must hit the service, not a wrapper
        # whose child would live on.
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "firmware",
            "serve",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown hooks, no flush
        await self.proc.wait()


async def test_sigkill_mid_rollout_changes_nothing_in_the_outcome(  # noqa: PLR0915
    stack: StackAddresses, fresh_database: Migrate, topics: str, unused_port: int, jwks_server: str
) -> None:
    issuer: TestIssuer = jwks_server.issuer  # type: ignore[attr-defined]
    url = await fresh_database("firmware")
    env = dict(os.environ) | {
        "FIRMWARE_DATABASE_URL": url,
        "FIRMWARE_KAFKA_TOPIC_PREFIX": topics,
        "FIRMWARE_HTTP_PORT": str(unused_port),
        "FIRMWARE_JWKS_URL": jwks_server.url,  # type: ignore[attr-defined]
        "FIRMWARE_DISPATCH_INTERVAL_S": "0.05",
        "FIRMWARE_OUTBOX_POLL_INTERVAL_S": "0.05",
        "FIRMWARE_CONSUMER_BATCH_TIMEOUT_MS": "50",
        "FIRMWARE_OTA_MAX_RETRIES": "0",
        "FIRMWARE_LOG_LEVEL": "WARNING",
    }
    fake = FakeFleet(bootstrap=stack.kafka_bootstrap_servers, prefix=topics)
    fake.producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await fake.producer.start()
    runner = asyncio.create_task(fake.run())
    service = Process(env)
    base = f"http://127.0.0.1:{unused_port}"
    a = unique("dealer-k")
    units = [unique(f"K{i:03d}") for i in range(120)]
    try:
        await service.start()
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, 60)
            for d in units:
                await fake.register(d, dealer_id=a)
            headers = issuer.headers(ADMIN)
            response = await client.post(
                "/api/v1/firmware/releases",
                headers=headers,
                json={
                    "console": "ultra",
                    "version": "7.0.0",
                    "models": ["Ultra"],
                    "transport": "wifi",
                    "artifact_url": "https://firmware.example/u7.bin",
                    "sha256": SHA,
                    "size": 7,
                },
            )
            assert response.status_code == 201, response.text
            release_id = response.json()["id"]
            fake.versions[release_id] = "7.0.0"

            await projected_in(url, units)
            created = (
                await client.post(
                    "/api/v1/rollouts",
                    headers=issuer.headers(ADMIN),
                    json={
                        "release_id": release_id,
                        "scope": "my_fleet",
                        "dealer_id": a,
                        "strategy": {"batch_size": 15, "max_per_minute": 3000},
                        "override": True,
                        "override_reason": "sigkill test",
                    },
                )
            ).json()
            assert created["counts"]["pending"] == len(units), created
            rollout_id = created["id"]

            async def some_confirmed() -> bool:
                return (
                    sum(1 for r in fake.requests if r.correlation["rollout_id"] == rollout_id) >= 30
                )

            await eventually(some_confirmed, 60)
            await service.kill()
            await service.start()
            await eventually(ready, 60)

            async def completed() -> bool:
                r = await client.get(
                    f"/api/v1/rollouts/{rollout_id}", headers=issuer.headers(ADMIN)
                )
                return r.status_code == 200 and r.json()["status"] == "completed"

            await eventually(completed, 120)
            final = (
                await client.get(f"/api/v1/rollouts/{rollout_id}", headers=issuer.headers(ADMIN))
            ).json()
    finally:
        if service.proc is not None and service.proc.returncode is None:
            service.proc.terminate()
            await service.proc.wait()
        runner.cancel()
        await asyncio.gather(runner, *fake._tasks, return_exceptions=True)
        await fake.producer.stop()

    assert final["counts"]["confirmed"] == len(units)
    assert final["counts"]["failed"] == 0
    ours = [r for r in fake.requests if r.correlation["rollout_id"] == rollout_id]
    # Exactly one OTA request per device (attempt 1); a relay re-publish would repeat the same
    # request id, which the commands service deduplicates, so count distinct ids per device.
    per_device: dict[str, set[str]] = {}
    for r in ours:
        per_device.setdefault(r.device_id, set()).add(r.request_id)
    assert set(per_device) == set(units)
    assert all(ids == {f"{rollout_id}:{d}:1"} for d, ids in per_device.items())


@dataclass
class JwksServer:
    url: str
    issuer: TestIssuer


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def jwks_server() -> Any:
    """The test issuer's JWKS over HTTP, for a firmware process started as a subprocess."""
    issuer = TestIssuer()
    with issuer.serve_jwks() as url:
        yield JwksServer(url=url, issuer=issuer)
