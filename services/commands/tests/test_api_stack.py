"""The HTTP contract against the real database and Kafka: who may send, Idempotency-Key, and
bad input answered with problem+json naming the field (never a 500)."""

import pytest

from commands.testing import ADMIN, DEALER_1, DEALER_2, READER_1, Api, new_id
from common.auth import Principal

pytestmark = pytest.mark.stack


async def test_read_token_gets_403_and_nothing_is_queued(api: Api, device_id: str) -> None:
    response = await api.send(device_id, {"action": "reboot"}, principal=READER_1)
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/problem+json")
    listed = await api.client.get(
        f"/api/v1/devices/{device_id}/commands", headers=api.as_(READER_1)
    )
    assert listed.status_code == 200
    assert listed.json()["items"] == []


async def test_out_of_scope_and_unknown_devices_are_404(api: Api, device_id: str) -> None:
    other_dealer = await api.send(device_id, {"action": "start"}, principal=DEALER_2)
    assert other_dealer.status_code == 404
    restricted = Principal(
        user_id="staff-1", role="dealer", dealer_id="dealer-1", device_ids=frozenset({"X"})
    )
    assert (await api.send(device_id, {"action": "start"}, principal=restricted)).status_code == 404
    assert (await api.send(new_id(), {"action": "start"}, principal=ADMIN)).status_code == 404

    mine = (await api.send(device_id, {"action": "reboot"})).json()
    seen_by_other = await api.client.get(
        f"/api/v1/commands/{mine['id']}", headers=api.as_(DEALER_2)
    )
    assert seen_by_other.status_code == 404
    history = await api.client.get(
        f"/api/v1/devices/{device_id}/commands", headers=api.as_(DEALER_2)
    )
    assert history.status_code == 404


async def test_same_idempotency_key_returns_the_same_command(api: Api, device_id: str) -> None:
    key = new_id("key")
    first = await api.send(device_id, {"action": "reboot"}, key=key)
    again = await api.send(device_id, {"action": "reboot"}, key=key)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"

    different = await api.send(device_id, {"action": "stop"}, key=key)
    assert different.status_code == 422
    assert different.json()["errors"][0]["field"] == "Idempotency-Key"

    # Keys are per principal: another caller's same key is another command.
    admins = await api.send(device_id, {"action": "reboot"}, principal=ADMIN, key=key)
    assert admins.status_code == 202
    assert admins.json()["id"] != first.json()["id"]

    listed = await api.client.get(
        f"/api/v1/devices/{device_id}/commands", headers=api.as_(DEALER_1)
    )
    ids = [c["id"] for c in listed.json()["items"]]
    assert sorted(ids) == sorted([first.json()["id"], admins.json()["id"]])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"action": "explode"}, "action"),
        ({"params": {}}, "action"),
        ({"action": "start", "ttl_s": 100_000}, "ttl_s"),
        ({"action": "start", "ttl_s": 0}, "ttl_s"),
        ({"action": "start", "ttl_s": "soon"}, "ttl_s"),
        ({"action": "start", "params": {"speed": 3}}, "params"),
        ({"action": "fw_update"}, "params.release_id"),
        ({"action": "force_ota", "params": {"release_id": "no-such-release"}}, "params.release_id"),
        ({"action": "set_setting", "params": {"key": "turbo", "value": 1}}, "params.key"),
        ({"action": "set_setting", "params": {"key": "cooldown_s", "value": -1}}, "params.value"),
        ({"action": "reboot", "colour": "red"}, "colour"),
    ],
)
async def test_bad_input_is_422_naming_the_field(
    api: Api, device_id: str, body: dict[str, object], field: str
) -> None:
    response = await api.send(device_id, body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["errors"][0]["field"] == field
    assert problem["detail"].startswith(field)


async def test_valid_setting_is_accepted_and_recorded_with_who_asked(
    api: Api, device_id: str
) -> None:
    body = {"action": "set_setting", "params": {"key": "low_fuel_alarm_pct", "value": 15}}
    cmd = (await api.send(device_id, body)).json()
    detail = await api.get(cmd["id"])
    assert detail["params"] == {"key": "low_fuel_alarm_pct", "value": 15}
    assert detail["requested_by"] == DEALER_1.user_id
    assert detail["requested_by_email"] == DEALER_1.email


async def test_history_is_newest_first_and_paginates(api: Api, device_id: str) -> None:
    sent = [(await api.send(device_id, {"action": "reboot"})).json()["id"] for _ in range(3)]
    first = await api.client.get(
        f"/api/v1/devices/{device_id}/commands", params={"limit": 2}, headers=api.as_(DEALER_1)
    )
    page = first.json()
    assert [c["id"] for c in page["items"]] == sent[::-1][:2]
    rest = await api.client.get(
        f"/api/v1/devices/{device_id}/commands",
        params={"limit": 2, "cursor": page["next_cursor"]},
        headers=api.as_(DEALER_1),
    )
    assert [c["id"] for c in rest.json()["items"]] == [sent[0]]
    assert rest.json()["next_cursor"] is None
    bad = await api.client.get(
        f"/api/v1/devices/{device_id}/commands",
        params={"cursor": "garbage!"},
        headers=api.as_(DEALER_1),
    )
    assert bad.status_code == 422


async def test_no_credentials_is_401(api: Api, device_id: str) -> None:
    response = await api.client.post(
        f"/api/v1/devices/{device_id}/commands", json={"action": "start"}
    )
    assert response.status_code == 401
