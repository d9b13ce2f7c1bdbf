# mypy: allow-untyped-defs, disable-error-code="no-any-return,index"
"""The fleet's public API against a real PostgreSQL: registration, scopes, search, map, errors."""

import json
from typing import Any

import pytest
from sqlalchemy import select

from common.contracts.fleet import DEVICE
from fleet import store

pytestmark = pytest.mark.stack

DEVICE_FIELDS = {
    "id", "name", "model", "engine", "transport", "gps", "dealer_id", "customer_email",
    "firmware_version", "connection", "last_seen_at", "run_state", "position", "attention",
    "test_device",
}  # fmt: skip


async def register(api: Any, principal: Any, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.client.post("/api/v1/devices", json=body, headers=api.as_(principal))
    assert response.status_code == 201, response.text
    return response.json()


async def visible_ids(api: Any, principal: Any, q: str) -> set[str]:
    response = await api.client.get(
        "/api/v1/devices", params={"q": q, "limit": 500}, headers=api.as_(principal)
    )
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()["items"]}


async def test_admin_registers_a_device_gets_its_password_once_and_an_event_is_staged(api, h):
    device_id = h.unique("REG")
    body = await register(api, h.admin(), h.registration(device_id, "dealer-a"))

    assert set(body) == DEVICE_FIELDS | {"mqtt_password", "mqtt_credentials_error"}
    assert body["mqtt_password"] == api.gateway.issued[device_id]
    assert body["connection"] == "offline"
    assert body["dealer_id"] == "dealer-a"
    assert body["position"] is None
    # The gateway was called as the caller (its internal token forwarded).
    assert api.gateway.tokens[-1]

    detail = await api.client.get(f"/api/v1/devices/{device_id}", headers=api.as_(h.admin()))
    assert detail.status_code == 200
    assert set(detail.json()) == DEVICE_FIELDS, "the password is shown only at registration"

    engine = api.client._transport.app.state.infra.engine
    async with engine.connect() as conn:
        rows = (
            await conn.execute(select(store.outbox).where(store.outbox.c.key == device_id))
        ).all()
    assert [row.topic for row in rows] == [DEVICE.name]
    snapshot = json.loads(rows[0].payload)["data"]
    assert snapshot["device_id"] == device_id
    assert snapshot["dealer_id"] == "dealer-a"
    assert snapshot["model"] == "D100"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model": "Z9"}, "model"),
        ({"model": "D180", "engine": None}, "engine"),
        ({"model": "V5", "engine": "steam"}, "engine"),
        ({"model": "X Pro", "engine": "diesel"}, "engine"),
        ({"model": "Ultra", "engine": None, "transport": "lte"}, "transport"),
        ({"customer_email": "not an email"}, "customer_email"),
        ({"id": "bad/id+#"}, "id"),
        ({"gps": "sometimes"}, "gps"),
    ],
)
async def test_invalid_registration_is_422_naming_the_field(api, h, overrides, field):
    body = h.registration(h.unique("BAD"), "dealer-a", **overrides)
    response = await api.client.post("/api/v1/devices", json=body, headers=api.as_(h.admin()))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"].startswith(f"{field}:"), response.json()


async def test_taken_id_is_409(api, h):
    device_id = h.unique("DUP")
    await register(api, h.admin(), h.registration(device_id, "dealer-a"))
    again = await api.client.post(
        "/api/v1/devices", json=h.registration(device_id, "dealer-b"), headers=api.as_(h.admin())
    )
    assert again.status_code == 409
    assert device_id in again.json()["detail"]


async def test_who_may_register_where(api, h):
    staff_a = h.dealer("dealer-a")
    own = await register(api, staff_a, h.registration(h.unique("OWN"), None))
    assert own["dealer_id"] == "dealer-a", "a dealer omitting dealer_id registers into its own"

    cases = [
        (staff_a, "dealer-b", 403),
        (h.customer("dealer-a", "c@a.test"), "dealer-a", 403),
        (h.dealer("dealer-a", access="read"), "dealer-a", 403),
        (h.dealer("dealer-a", device_ids=frozenset({"X"})), "dealer-a", 403),
        (h.admin(), None, 422),
    ]
    for principal, dealer_id, status in cases:
        response = await api.client.post(
            "/api/v1/devices",
            json=h.registration(h.unique("NO"), dealer_id),
            headers=api.as_(principal),
        )
        assert response.status_code == status, (principal, response.text)
    missing = await api.client.post("/api/v1/devices", json=h.registration("X1", "dealer-a"))
    assert missing.status_code == 401


async def test_each_scope_sees_exactly_its_devices(api, h):
    tag = h.unique("SCOPE")
    a, b = f"dealer-a-{tag}", f"dealer-b-{tag}"
    email = f"Owner.{tag}@Example.test"
    a1, a2, a3, b1 = (f"{tag}-{n}" for n in ("A1", "A2", "A3", "B1"))
    await register(api, h.admin(), h.registration(a1, a))
    await register(api, h.admin(), h.registration(a2, a, customer_email=email))
    await register(api, h.admin(), h.registration(a3, a))
    await register(api, h.admin(), h.registration(b1, b, customer_email=email))

    scopes = {
        "admin": (h.admin(), {a1, a2, a3, b1}),
        "dealer A": (h.dealer(a), {a1, a2, a3}),
        "dealer B": (h.dealer(b), {b1}),
        # Same email at dealer B, but this account is A's customer: only A's device.
        "A's customer": (h.customer(a, email.upper()), {a2}),
        "device-restricted token": (h.dealer(a, device_ids=frozenset({a1, b1})), {a1}),
    }
    for name, (principal, expected) in scopes.items():
        assert await visible_ids(api, principal, tag) == expected, name
        for device_id in (a1, a2, a3, b1):
            response = await api.client.get(
                f"/api/v1/devices/{device_id}", headers=api.as_(principal)
            )
            assert response.status_code == (200 if device_id in expected else 404), (
                name,
                device_id,
            )


async def test_search_is_partial_case_insensitive_filtered_and_paginated(api, h):
    tag = h.unique("SRCH")
    dealer_id = f"dealer-{tag}"
    for n in range(7):
        await register(
            api,
            h.admin(),
            h.registration(
                f"{tag}-{n:02d}",
                dealer_id,
                name=f"Pump house {n} {tag.lower()}",
                customer_email=f"farmer{n}.{tag.lower()}@fields.test",
                model="X Pro" if n % 2 else "D100",
                engine=None if n % 2 else "diesel",
                firmware_version="3.0.0" if n < 3 else "2.9.9",
            ),
        )
    staff = h.dealer(dealer_id)
    assert len(await visible_ids(api, staff, tag.lower())) == 7
    assert await visible_ids(api, staff, f"{tag}-03") == {f"{tag}-03"}
    assert await visible_ids(api, staff, f"FARMER5.{tag}") == {f"{tag}-05"}
    assert await visible_ids(api, staff, f"house 6 {tag}") == {f"{tag}-06"}
    assert await visible_ids(api, staff, "100%_") == set(), "LIKE wildcards are literal"

    async def page(**params: Any) -> dict[str, Any]:
        response = await api.client.get(
            "/api/v1/devices", params={"q": tag, **params}, headers=api.as_(staff)
        )
        assert response.status_code == 200, response.text
        return response.json()

    assert {i["id"] for i in (await page(model="X Pro"))["items"]} == {
        f"{tag}-01", f"{tag}-03", f"{tag}-05"
    }  # fmt: skip
    assert len((await page(firmware="3.0.0"))["items"]) == 3
    assert len((await page(connection="offline"))["items"]) == 7
    assert (await page(connection="live"))["items"] == []

    seen: list[str] = []
    cursor = None
    while True:
        body = await page(limit=3, **({"cursor": cursor} if cursor else {}))
        seen += [item["id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(f"{tag}-{n:02d}" for n in range(7)), "stable order, no gaps or repeats"

    for params, field in (
        ({"limit": 501}, "limit"),
        ({"limit": 0}, "limit"),
        ({"cursor": "%%%"}, "cursor"),
        ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor"),
        ({"connection": "sleepy"}, "connection"),
        ({"model": "Z9"}, "model"),
    ):
        response = await api.client.get("/api/v1/devices", params=params, headers=api.as_(staff))
        assert response.status_code == 422, (params, response.text)
        assert field in response.json()["detail"]


async def test_update_assigns_customer_and_only_admins_transfer(api, h):
    tag = h.unique("UPD")
    a, b = f"dealer-a-{tag}", f"dealer-b-{tag}"
    device_id = f"{tag}-1"
    await register(api, h.admin(), h.registration(device_id, a))
    path = f"/api/v1/devices/{device_id}"
    buyer = h.customer(a, f"buyer.{tag.lower()}@farm.test")

    assert (await api.client.get(path, headers=api.as_(buyer))).status_code == 404
    response = await api.client.patch(
        path,
        json={"name": "Barn", "customer_email": f"Buyer.{tag}@Farm.test", "test_device": True},
        headers=api.as_(h.dealer(a)),
    )
    assert response.status_code == 200, response.text
    assert response.json()["customer_email"] == f"buyer.{tag.lower()}@farm.test"
    assert response.json()["test_device"] is True
    seen = await api.client.get(path, headers=api.as_(buyer))
    assert seen.status_code == 200
    assert seen.json()["name"] == "Barn"

    forbidden = [
        (h.customer(a, f"buyer.{tag.lower()}@farm.test"), {"name": "Mine"}, 403),
        (h.dealer(a, access="read"), {"name": "X"}, 403),
        (h.dealer(a), {"dealer_id": b}, 403),
        (h.dealer(b), {"name": "X"}, 404),
        (h.dealer(a), {"name": None}, 422),
        (h.dealer(a), {"owner": "me"}, 422),
    ]
    for principal, body, status in forbidden:
        response = await api.client.patch(path, json=body, headers=api.as_(principal))
        assert response.status_code == status, (body, response.text)

    moved = await api.client.patch(path, json={"dealer_id": b}, headers=api.as_(h.admin()))
    assert moved.status_code == 200
    assert moved.json()["dealer_id"] == b
    assert (await api.client.get(path, headers=api.as_(h.dealer(a)))).status_code == 404
    assert (await api.client.get(path, headers=api.as_(h.dealer(b)))).status_code == 200


async def test_gateway_down_leaves_a_registered_device_whose_password_can_be_issued(api, h):
    device_id = h.unique("GW")
    api.gateway.down = True
    body = await register(api, h.admin(), h.registration(device_id, "dealer-a"))
    assert body["mqtt_password"] is None
    assert "mqtt-credentials" in body["mqtt_credentials_error"]

    path = f"/api/v1/devices/{device_id}/mqtt-credentials"
    failed = await api.client.post(path, headers=api.as_(h.admin()))
    assert failed.status_code == 502
    api.gateway.down = False
    issued = await api.client.post(path, headers=api.as_(h.dealer("dealer-a")))
    assert issued.status_code == 201, issued.text
    assert issued.json()["password"] == api.gateway.issued[device_id]
    assert issued.json()["username"] == device_id

    for principal, status in (
        (h.dealer("dealer-b"), 404),
        (h.dealer("dealer-a", access="read"), 403),
    ):
        response = await api.client.post(path, headers=api.as_(principal))
        assert response.status_code == status


async def test_bad_requests_are_problems_never_500(api, h):
    headers = {**api.as_(h.admin()), "content-type": "application/json"}
    cases = [
        ("POST", "/api/v1/devices", b"{not json"),
        ("POST", "/api/v1/devices", b"[]"),
        ("PATCH", "/api/v1/devices/NOPE", b'{"name": "x"}'),
        ("GET", "/api/v1/devices/" + "x" * 300, None),
        ("GET", "/api/v1/map/devices", None),
    ]
    for method, path, content in cases:
        response = await api.client.request(method, path, content=content, headers=headers)
        assert 400 <= response.status_code < 500, (method, path, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    bad_token = await api.client.get("/api/v1/devices", headers={"X-Internal-Token": "junk"})
    assert bad_token.status_code == 401
