# mypy: allow-untyped-defs, disable-error-code="no-any-return,index"
"""The demo seed registers through the API, covers the catalog, and is idempotent."""

import json
import stat

import pytest

from common.catalog import MODELS
from fleet.seed import seed_fleet, write_private

pytestmark = pytest.mark.stack


async def test_seed_registers_every_model_and_reruns_without_duplicates(api, h, tmp_path):
    accounts = {
        "admin": {"email": "admin@autogen.local", "password": "x"},
        "dealers": [
            {"id": f"seed-{n}-{h.unique()}", "name": f"Dealer {n}",
             "staff": [{"email": f"staff{n}@d.test", "password": "pw", "name": "S", "id": "s"}],
             "customers": [{"email": f"Cust{n}@d.test", "password": "pw", "name": "C", "id": "c"}]}
            for n in (1, 2)
        ],
    }  # fmt: skip
    logins: list[str] = []

    async def authenticate(email: str, password: str) -> dict[str, str]:
        logins.append(email)
        dealer = next(d for d in accounts["dealers"] if d["staff"][0]["email"] == email)
        return api.as_(h.dealer(dealer["id"]))

    client = api.client
    client.base_url = "http://fleet/api/v1"
    first = await seed_fleet(client, accounts, authenticate=authenticate, previous={}, total=40)
    assert len(first) == 40
    assert sorted(logins) == ["staff1@d.test", "staff2@d.test"]
    assert {d["model"] for d in first} == set(MODELS)
    assert {d["transport"] for d in first} == {"gsm", "wifi"}
    assert all(d["password"] for d in first)
    gps = [d for d in first if d["gps"]]
    assert gps
    assert all(d["lat"] is not None and d["lon"] is not None for d in gps)
    assert all(d["lat"] is None for d in first if not d["gps"])
    regions = {round(d["lat"]) for d in gps}
    assert any(29 <= r <= 31 for r in regions)
    assert any(47 <= r <= 49 for r in regions)

    customer = h.customer(accounts["dealers"][0]["id"], "cust1@d.test")
    mine = await client.get("/devices", headers=api.as_(customer))
    assert mine.status_code == 200
    assert mine.json()["items"], "some devices belong to the dealer's customer"

    # Rerun: devices are kept; known passwords stay, unknown ones are re-issued.
    known = {d["id"]: d["password"] for d in first[:10]}
    second = await seed_fleet(client, accounts, authenticate=authenticate, previous=known, total=40)
    assert [d["id"] for d in second] == [d["id"] for d in first]
    by_id = {d["id"]: d["password"] for d in second}
    assert all(by_id[i] == p for i, p in known.items())
    rotated = first[10]["id"]
    assert by_id[rotated] != first[10]["password"]
    assert by_id[rotated] == api.gateway.issued[rotated], "the new password is the live one"

    out = tmp_path / "demo" / "devices.json"
    write_private(out, {"mqtt": {"host": "127.0.0.1", "port": 1883}, "devices": second})
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads(out.read_text())["devices"][0]["id"] == second[0]["id"]
