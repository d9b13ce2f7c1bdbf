"""The tokens service against real PostgreSQL, Redis and Kafka, called the way nginx calls it:
`/auth/verify` with the bearer, then the route with the internal JWT it answered.

The access matrix walks every endpoint with admin, dealer A staff, dealer B staff, A's
customer, a read token, a control token, a device-restricted token, an expired token and a
revoked token, expecting exact status codes.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import SecretStr
from sqlalchemy import select, update

from common.contracts import fleet, platform
from common.contracts import tokens as contract
from common.events import encode, new_event
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses
from tokens import store
from tokens.app import create_app
from tokens.settings import TokensSettings

pytestmark = pytest.mark.stack

RUN = uuid.uuid4().hex[:8]
PASSWORD = "correct-horse-battery"


@dataclass
class World:
    client: httpx.AsyncClient
    app: Any
    bearers: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    async def call(
        self, who: str | None, method: str, path: str, body: Any = None
    ) -> httpx.Response:
        """As through the gateway: verify the bearer, then call with the internal JWT."""
        headers = {}
        if who is not None:
            verify = await self.client.get(
                "/auth/verify", headers={"Authorization": f"Bearer {self.bearers[who]}"}
            )
            if verify.status_code != 200:
                return verify
            headers["X-Internal-Token"] = verify.headers["x-internal-token"]
        return await self.client.request(method, path, json=body, headers=headers)

    async def login(self, email: str, password: str = PASSWORD) -> str:
        response = await self.client.post(
            "/api/v1/auth/login", json={"email": email, "password": password}
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    async def token(self, who: str, **body: Any) -> dict[str, Any]:
        body.setdefault("name", "t")
        body.setdefault("expires_in_days", 30)
        response = await self.call(who, "POST", "/api/v1/tokens", body)
        assert response.status_code == 201, response.text
        return dict(response.json())


def email(name: str) -> str:
    return f"{name}-{RUN}@example.com"


@pytest.fixture(scope="module")
async def world(
    stack: StackAddresses, fresh_database: Migrate, kafka_topics: KafkaTopics, topic_prefix: str
) -> AsyncIterator[World]:
    await kafka_topics.create(fleet.DEVICE.name, contract.TOKEN.name, platform.DEADLETTER.name)
    settings = TokensSettings(
        database_url=SecretStr(await fresh_database("tokens")),
        kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
        redis_url=SecretStr(stack.redis_url),
        kafka_topic_prefix=topic_prefix,
        admin_email=email("admin"),
        admin_password=SecretStr(PASSWORD),
        outbox_poll_interval_s=0.05,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://tokens") as client,
    ):
        w = World(client=client, app=app)
        w.bearers["admin"] = await w.login(email("admin"))
        for dealer in ("A", "B"):
            created = await w.call("admin", "POST", "/api/v1/dealers", {"name": f"{dealer}-{RUN}"})
            w.ids[f"dealer{dealer}"] = created.json()["id"]
        for key, role, dealer in (
            ("staffA", "dealer", "A"),
            ("staffB", "dealer", "B"),
            ("custA", "customer", "A"),
        ):
            body = {
                "email": email(key),
                "password": PASSWORD,
                "name": key,
                "role": role,
                "dealer_id": w.ids[f"dealer{dealer}"],
            }
            created = await w.call("admin", "POST", "/api/v1/users", body)
            assert created.status_code == 201, created.text
            w.ids[key] = created.json()["id"]
            w.bearers[key] = await w.login(email(key))
        await publish_devices(stack, topic_prefix, w)
        await eventually(lambda: projected(app, 3))
        staff = w.ids["staffA"]
        w.bearers["read"] = (await w.token("staffA", user_id=staff, access="read"))["token"]
        w.bearers["control"] = (await w.token("staffA", user_id=staff, access="control"))["token"]
        device = await w.token(
            "staffA", user_id=w.ids["custA"], access="control", device_ids=[f"dev-a1-{RUN}"]
        )
        w.bearers["device"] = device["token"]
        expired = await w.token("staffA", user_id=staff, access="control")
        async with app.state.ctx.sessions() as session, session.begin():
            await session.execute(
                update(store.api_tokens)
                .where(store.api_tokens.c.id == expired["id"])
                .values(expires_at=datetime.now(UTC) - timedelta(minutes=1))
            )
        w.bearers["expired"] = expired["token"]
        revoked = await w.token("staffA", user_id=staff, access="control")
        assert (
            await w.call("staffA", "DELETE", f"/api/v1/tokens/{revoked['id']}")
        ).status_code == 204
        w.bearers["revoked"] = revoked["token"]
        w.ids["revoked"] = revoked["id"]
        yield w


async def publish_devices(stack: StackAddresses, prefix: str, w: World) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        for device_id, dealer, customer in (
            (f"dev-a1-{RUN}", "A", email("custA")),
            (f"dev-a2-{RUN}", "A", None),
            (f"dev-b1-{RUN}", "B", None),
        ):
            data = fleet.FleetDevice(
                device_id=device_id,
                name=device_id,
                model="D100",
                engine="diesel",
                transport="gsm",
                gps=True,
                dealer_id=w.ids[f"dealer{dealer}"],
                customer_email=customer,
            )
            event = new_event(
                type=fleet.DEVICE.event_type, data=data, source="fleet", key=device_id
            )
            await producer.send_and_wait(
                prefix + fleet.DEVICE.name, encode(event), key=device_id.encode()
            )
    finally:
        await producer.stop()


async def projected(app: Any, count: int) -> bool:
    async with app.state.ctx.sessions() as session:
        rows = (await session.execute(select(store.devices.c.device_id))).all()
    return sum(1 for r in rows if r.device_id.endswith(RUN)) >= count


async def eventually(check: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


WHO = ["admin", "staffA", "staffB", "custA", "read", "control", "device", "expired", "revoked"]


def row(*codes: int) -> dict[str, int]:
    return dict(zip(WHO, codes, strict=True))


MATRIX: dict[str, dict[str, int]] = {
    "verify": row(200, 200, 200, 200, 200, 200, 200, 401, 401),
    "GET /me": row(200, 200, 200, 200, 200, 200, 200, 401, 401),
    "GET /users": row(200, 200, 200, 200, 200, 200, 200, 401, 401),
    "POST /users": row(201, 201, 403, 403, 403, 403, 403, 401, 401),
    "GET /dealers": row(200, 403, 403, 403, 403, 403, 403, 401, 401),
    "POST /dealers": row(201, 403, 403, 403, 403, 403, 403, 401, 401),
    "GET /tokens": row(200, 200, 200, 200, 200, 200, 200, 401, 401),
    "POST /tokens": row(201, 201, 403, 201, 403, 403, 403, 401, 401),
    "DELETE /tokens/{id}": row(204, 204, 404, 404, 403, 204, 404, 401, 401),
}


@pytest.mark.parametrize("endpoint", list(MATRIX))
@pytest.mark.parametrize("who", WHO)
async def test_access_matrix(world: World, endpoint: str, who: str) -> None:
    expected = MATRIX[endpoint][who]
    n = uuid.uuid4().hex[:6]
    if endpoint == "verify":
        response = await world.client.get(
            "/auth/verify", headers={"Authorization": f"Bearer {world.bearers[who]}"}
        )
    elif endpoint == "POST /users":
        body: dict[str, Any] = {
            "email": email(f"new-{n}"),
            "password": PASSWORD,
            "name": "New",
            "role": "customer",
            "dealer_id": world.ids["dealerA"],
        }
        response = await world.call(who, "POST", "/api/v1/users", body)
    elif endpoint == "POST /dealers":
        response = await world.call(who, "POST", "/api/v1/dealers", {"name": f"D-{n}"})
    elif endpoint == "POST /tokens":
        body = {
            "name": "m",
            "user_id": world.ids["custA"],
            "access": "read",
            "device_ids": [f"dev-a1-{RUN}"],
            "expires_in_days": 7,
        }
        response = await world.call(who, "POST", "/api/v1/tokens", body)
    elif endpoint == "DELETE /tokens/{id}":
        target = await world.token("staffA", user_id=world.ids["staffA"], access="read")
        response = await world.call(who, "DELETE", f"/api/v1/tokens/{target['id']}")
    else:
        method, path = endpoint.split(" ")
        response = await world.call(who, method, f"/api/v1{path[0:]}")
    assert response.status_code == expected, response.text
    if expected >= 400:
        assert response.headers["content-type"].startswith("application/problem+json")


async def test_lists_show_only_what_is_in_scope(world: World) -> None:
    users_b = (await world.call("staffB", "GET", "/api/v1/users?limit=500")).json()["items"]
    assert {u["dealer_id"] for u in users_b} == {world.ids["dealerB"]}
    customer = (await world.call("custA", "GET", "/api/v1/users")).json()["items"]
    assert [u["id"] for u in customer] == [world.ids["custA"]]
    tokens_b = (await world.call("staffB", "GET", "/api/v1/tokens")).json()["items"]
    assert tokens_b == []
    tokens_a = (await world.call("staffA", "GET", "/api/v1/tokens?limit=500")).json()["items"]
    assert tokens_a
    assert all("token" not in t and "secret_hash" not in t for t in tokens_a)
    assert {"last_used_at", "expires_at", "device_ids", "access"} <= set(tokens_a[0])


async def test_me_shows_the_narrowing_of_a_device_token(world: World) -> None:
    me = (await world.call("device", "GET", "/api/v1/me")).json()
    assert me["role"] == "customer"
    assert me["device_ids"] == [f"dev-a1-{RUN}"]
    assert me["access"] == "control"
    assert me["token_id"]
    read = (await world.call("read", "GET", "/api/v1/me")).json()
    assert read["access"] == "read"


async def test_tokens_for_devices_outside_scope_are_refused(world: World) -> None:
    for who, device in (
        ("staffA", f"dev-b1-{RUN}"),
        ("staffA", "dev-unknown"),
        ("custA", f"dev-a2-{RUN}"),
    ):
        body = {
            "name": "x",
            "user_id": world.ids["custA"] if who == "custA" else world.ids["staffA"],
            "access": "read",
            "device_ids": [device],
            "expires_in_days": 1,
        }
        response = await world.call(who, "POST", "/api/v1/tokens", body)
        assert response.status_code == 403, (who, device, response.text)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "user_id": "u", "access": "write", "expires_in_days": 1}, "access"),
        (
            {"name": "x", "user_id": "u", "access": "read", "expires_in_days": 366},
            "expires_in_days",
        ),
        ({"name": "x", "user_id": "u", "access": "read"}, "expires_in_days"),
        (
            {"name": "x", "user_id": "u", "access": "read", "expires_in_days": 1, "device_ids": []},
            "device_ids",
        ),
    ],
)
async def test_invalid_token_requests_name_the_field(world: World, body: Any, field: str) -> None:
    response = await world.call("admin", "POST", "/api/v1/tokens", body)
    assert response.status_code == 422
    assert field in response.json()["detail"]


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Basic abc",
        "Bearer",
        "Bearer a b",
        "Bearer agk_short",
        "Bearer not.a.jwt",
        "Bearer agk_" + "A" * 49,
    ],
)
async def test_malformed_or_unknown_bearers_get_401_problem(
    world: World, authorization: str
) -> None:
    response = await world.client.get("/auth/verify", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 401


async def test_unknown_well_formed_token_is_401(world: World) -> None:
    from tokens.domain import new_token_secret

    response = await world.client.get(
        "/auth/verify", headers={"Authorization": f"Bearer {new_token_secret()}"}
    )
    assert response.status_code == 401


async def test_login_rejects_bad_passwords_and_throttles_with_429(world: World) -> None:
    target = email("staffB")
    statuses = []
    for _ in range(6):
        response = await world.client.post(
            "/api/v1/auth/login", json={"email": target.upper(), "password": "wrong-password"}
        )
        statuses.append(response.status_code)
    assert statuses[:5] == [401] * 5
    assert statuses[5] == 429
    assert int(response.headers["Retry-After"]) > 0
    # Even the right password waits out the window.
    right = await world.client.post(
        "/api/v1/auth/login", json={"email": target, "password": PASSWORD}
    )
    assert right.status_code == 429
    await world.app.state.ctx.redis.delete(f"tokens:login:email:{target.lower()}")


async def test_taken_email_and_dealer_name_conflict(world: World) -> None:
    body = {
        "email": email("staffA").upper(),
        "password": PASSWORD,
        "name": "dup",
        "role": "dealer",
        "dealer_id": world.ids["dealerA"],
    }
    assert (await world.call("admin", "POST", "/api/v1/users", body)).status_code == 409
    dup = await world.call("admin", "POST", "/api/v1/dealers", {"name": f"A-{RUN}"})
    assert dup.status_code == 409


async def test_create_revoke_and_revoked_use_are_audited_and_published(
    world: World, stack: StackAddresses, topic_prefix: str
) -> None:
    created = await world.token("staffA", user_id=world.ids["staffA"], access="read", name="audit")
    secret = created.pop("token")
    assert secret.startswith("agk_")
    assert (
        await world.call("staffA", "DELETE", f"/api/v1/tokens/{created['id']}")
    ).status_code == 204
    used = await world.client.get("/auth/verify", headers={"Authorization": f"Bearer {secret}"})
    assert used.status_code == 401
    assert "revoked" in used.json()["detail"]

    async def audited() -> bool:
        async with world.app.state.ctx.sessions() as session:
            rows = await session.execute(
                select(store.audit_log.c.action).where(store.audit_log.c.target_id == created["id"])
            )
            return {r.action for r in rows} >= {
                "token.created",
                "token.revoked",
                "token.revoked_use",
            }

    await eventually(audited)
    async with world.app.state.ctx.sessions() as session:
        stored = (
            await session.execute(
                select(store.api_tokens.c.secret_hash).where(store.api_tokens.c.id == created["id"])
            )
        ).scalar_one()
    assert secret not in stored

    consumer = AIOKafkaConsumer(
        topic_prefix + contract.TOKEN.name,
        bootstrap_servers=stack.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    kinds: set[str] = set()
    try:
        async with asyncio.timeout(30):
            while kinds != {"created", "revoked", "revoked_use"}:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    for record in records:
                        event = contract.TOKEN.parse(record.value)
                        assert secret not in record.value.decode()
                        if event.data.token_id == created["id"]:
                            kinds.add(event.data.kind)
    finally:
        await consumer.stop()


async def test_last_used_is_recorded_off_the_request_path(world: World) -> None:
    token = await world.token("staffA", user_id=world.ids["staffA"], access="read")
    assert token["last_used_at"] is None
    assert (await world.call(None, "GET", "/healthz")).status_code == 200
    for _ in range(3):
        assert (await world.call("admin", "GET", "/api/v1/me")).status_code == 200
    world.bearers["lu"] = token["token"]
    assert (await world.call("lu", "GET", "/api/v1/me")).status_code == 200
    await world.app.state.verify.last_used.flush(world.app.state.ctx)

    async def recorded() -> bool:
        items = (await world.call("admin", "GET", "/api/v1/tokens?limit=500")).json()["items"]
        return any(t["id"] == token["id"] and t["last_used_at"] for t in items)

    await eventually(recorded)


async def test_jwks_publishes_the_key_that_signs_internal_tokens(world: World) -> None:
    import jwt

    jwks = (await world.client.get("/.well-known/jwks.json")).json()
    same = (await world.client.get("/api/v1/.well-known/jwks.json")).json()
    assert jwks == same
    assert jwks["keys"]
    verify = await world.client.get(
        "/auth/verify", headers={"Authorization": f"Bearer {world.bearers['admin']}"}
    )
    kid = jwt.get_unverified_header(verify.headers["x-internal-token"])["kid"]
    assert kid in {k["kid"] for k in jwks["keys"]}
    assert all("d" not in k for k in jwks["keys"]), "a private key part was published"
