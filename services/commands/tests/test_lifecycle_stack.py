"""The commands service against real Kafka and PostgreSQL: accept → dispatch event → the
gateway's `sent` → the device's ack → a result visible by GET; expiry; OTA; rollouts' requests."""

from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from commands.domain import TTL_POLICIES
from commands.testing import ADMIN, DEALER_1, Api, eventually, new_id
from common.contracts import commands
from common.contracts.commands import CommandRequest

pytestmark = pytest.mark.stack


async def test_reboot_goes_queued_sent_acked_succeeded_and_every_step_is_published(
    api: Api,
) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)

    response = await api.send(device_id, {"action": "reboot"})
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert accepted["device_id"] == device_id
    cmd = {**accepted}

    dispatch = await eventually(lambda: _first(api.bus.dispatches_of(cmd["id"])))
    assert dispatch["action"] == "reboot"
    assert dispatch["params"] == {}
    assert dispatch["expires_at"].startswith(accepted["expires_at"][:19])

    await api.bus.gateway_status(cmd, "sent")
    await api.wait_status(cmd["id"], "sent")
    await api.bus.ack(cmd, "accepted")
    await api.wait_status(cmd["id"], "acked")
    await api.bus.ack(cmd, "succeeded")
    done = await api.wait_status(cmd["id"], "succeeded")

    assert [h["status"] for h in done["history"]] == ["queued", "sent", "acked", "succeeded"]
    assert [h["reporter"] for h in done["history"]] == ["commands", "gateway", "device", "device"]
    assert done["requested_by"] == DEALER_1.user_id
    await eventually(lambda: _has(api.bus.statuses_of(cmd["id"]), "succeeded"))
    assert api.bus.statuses_of(cmd["id"]) == ["queued", "sent", "acked", "succeeded"]

    # A late duplicate of the gateway's report moves nothing back.
    await api.bus.gateway_status(cmd, "sent")
    await api.bus.ack(cmd, "accepted")
    history = await api.client.get(f"/api/v1/devices/{device_id}/commands", headers=api.as_(ADMIN))
    assert history.json()["items"][0]["status"] == "succeeded"


async def test_start_succeeds_only_when_telemetry_shows_running(api: Api) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    cmd = (await api.send(device_id, {"action": "start"})).json()
    await api.bus.ack(cmd, "accepted")
    await api.bus.ack(cmd, "succeeded")
    waiting = await eventually(lambda: _detail_has(api, cmd["id"], "waiting for telemetry"))
    assert waiting["status"] == "acked"

    await api.bus.telemetry(device_id, "running")
    await api.wait_status(cmd["id"], "succeeded")


async def test_stop_fails_when_telemetry_never_follows(api: Api) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    cmd = (await api.send(device_id, {"action": "stop"})).json()
    await api.bus.ack(cmd, "accepted")
    await api.bus.ack(cmd, "succeeded")
    await api.bus.telemetry(device_id, "running")  # the engine never stopped
    failed = await api.wait_status(cmd["id"], "failed")
    assert "did not show stopped" in failed["detail"]


async def test_short_ttl_ends_expired_and_is_published(api: Api) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    cmd = (await api.send(device_id, {"action": "reboot", "ttl_s": 1})).json()
    expired = await api.wait_status(cmd["id"], "expired")
    assert "TTL passed" in expired["detail"]
    await eventually(lambda: _has(api.bus.statuses_of(cmd["id"]), "expired"))

    # The device's ack after the end changes nothing.
    await api.bus.ack(cmd, "succeeded")
    await api.bus.device_registered(device_id)  # something the service surely reads after it
    assert (await api.get(cmd["id"]))["status"] == "expired"


async def test_command_to_an_offline_device_waits_sent_and_completes_when_it_returns(
    api: Api,
) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    await api.bus.presence(device_id, "offline")
    cmd = (await api.send(device_id, {"action": "reboot", "ttl_s": 60})).json()
    await eventually(lambda: _first(api.bus.dispatches_of(cmd["id"])))
    await api.bus.gateway_status(cmd, "sent")  # the broker holds it for the device's session
    await api.wait_status(cmd["id"], "sent")

    # The device comes back and takes it from its session: the service re-sends nothing.
    await api.bus.presence(device_id, "online", fw="2.4.1")
    await api.bus.ack(cmd, "accepted")
    await api.bus.ack(cmd, "succeeded")
    await api.wait_status(cmd["id"], "succeeded")
    assert len(api.bus.dispatches_of(cmd["id"])) == 1


async def test_force_ota_resolves_the_release_and_completes_when_the_device_returns(
    api: Api,
) -> None:
    device_id = new_id()
    release_id = new_id("R")
    await api.bus.device_registered(device_id, model="D180", engine="gas", transport="wifi")
    await api.bus.release(release_id, "3.1.0", ["D180", "D100"], engine="gas")
    await api.known(device_id)
    body = {"action": "force_ota", "params": {"release_id": release_id}}
    response = await eventually(lambda: _accepted(api, device_id, body))
    cmd = response.json()
    dispatch = await eventually(lambda: _first(api.bus.dispatches_of(cmd["id"])))
    assert dispatch["params"] == {
        "version": "3.1.0",
        "url": f"https://fw.test/{release_id}.bin",
        "sha256": "ab" * 32,
        "size": 123_456,
    }

    await api.bus.ack(cmd, "accepted")
    await api.bus.ota(cmd, "downloading", 50)
    progress = await eventually(lambda: _detail_has(api, cmd["id"], "downloading"))
    assert progress["progress_pct"] == 50

    # No Start while the update runs.
    refused = await api.send(device_id, {"action": "start"})
    assert refused.status_code == 409, refused.text
    assert "firmware update" in refused.json()["detail"]

    await api.bus.ota(cmd, "rebooting")
    await eventually(lambda: _detail_has(api, cmd["id"], "rebooting"))
    await api.bus.presence(device_id, "offline")
    await api.bus.presence(device_id, "online", fw="3.1.0")
    done = await api.wait_status(cmd["id"], "succeeded")
    assert "3.1.0" in done["detail"]
    assert (await api.send(device_id, {"action": "start"})).status_code == 202


async def test_release_for_another_variant_is_refused_naming_the_mismatch(api: Api) -> None:
    device_id = new_id()
    release_id = new_id("R")
    await api.bus.device_registered(device_id, model="D100", engine="diesel")
    await api.bus.release(release_id, "3.2.0", ["D100"], engine="gas")
    await api.known(device_id)
    body = {"action": "fw_update", "params": {"release_id": release_id}}

    async def refused() -> dict[str, object] | None:
        r = await api.send(device_id, body)
        text = r.json().get("detail", "")
        return r.json() if r.status_code == 422 and "engine gas" in text else None

    problem = await eventually(refused)
    assert problem["errors"] == [
        {
            "field": "params.release_id",
            "message": f"release {release_id} is for engine gas, not diesel",
        }
    ]


async def test_rollout_requests_over_kafka_get_the_same_lifecycle(api: Api) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    request = CommandRequest(
        request_id=new_id("req"),
        device_id=device_id,
        action="reboot",
        requested_by="rollout:RO-1",
        correlation={"rollout_id": "RO-1"},
    )
    await api.bus.publish(commands.REQUEST, request, device_id)
    await api.bus.publish(commands.REQUEST, request, device_id)  # redelivered

    first = await eventually(lambda: _dispatch_for_device(api, device_id))

    async def statuses() -> list[dict[str, Any]]:
        # Its own topic: it may arrive after the dispatch.
        return [s for s in api.bus.statuses if s["command_id"] == first["command_id"]]

    queued = await eventually(statuses)
    assert queued[0]["correlation"] == {"rollout_id": "RO-1"}
    listed = await api.client.get(f"/api/v1/devices/{device_id}/commands", headers=api.as_(ADMIN))
    assert [c["requested_by"] for c in listed.json()["items"]] == ["rollout:RO-1"]

    bad = CommandRequest(
        request_id=new_id("req"),
        device_id=device_id,
        action="start",
        ttl_s=TTL_POLICIES["start"].max_s + 1,
        requested_by="rollout:RO-1",
        correlation={"rollout_id": "RO-1"},
    )
    await api.bus.publish(commands.REQUEST, bad, device_id)
    rejected = await eventually(lambda: _status_for(api, device_id, "rejected"))
    assert rejected["detail"].startswith("ttl_s:")
    assert rejected["correlation"] == {"rollout_id": "RO-1"}


async def test_a_request_ahead_of_its_device_registration_waits_for_it(api: Api) -> None:
    # A rollout may ask for a device whose fleet.device.v1 event this service has not read yet:
    # the request is read again until the device is known, not rejected.
    device_id = new_id()
    request = CommandRequest(
        request_id=new_id("req"),
        device_id=device_id,
        action="reboot",
        requested_by="rollout:RO-2",
        correlation={"rollout_id": "RO-2"},
    )
    assert api.app is not None
    requests = api.app.state.consumer_stats["requests"]
    retried = requests.retried
    await api.bus.publish(commands.REQUEST, request, device_id)
    # Registered only once the service has read the request and put it back at least once.
    await eventually(lambda: _true_if(requests.retried > retried))
    await api.bus.device_registered(device_id)
    dispatched = await eventually(lambda: _dispatch_for_device(api, device_id))
    assert dispatched["action"] == "reboot"
    assert not [
        s for s in api.bus.statuses if s["device_id"] == device_id and s["status"] == "rejected"
    ]


async def _true_if(condition: bool) -> bool | None:
    return True if condition else None


async def _dispatch_for_device(api: Api, device_id: str) -> dict[str, object] | None:
    return next((d for d in api.bus.dispatches if d["device_id"] == device_id), None)


async def _status_for(api: Api, device_id: str, status: str) -> dict[str, object] | None:
    return next(
        (s for s in api.bus.statuses if s["device_id"] == device_id and s["status"] == status),
        None,
    )


async def _first(items: list[dict[str, object]]) -> dict[str, object] | None:
    return items[0] if items else None


async def _at_least(items: list[dict[str, object]], n: int) -> list[dict[str, object]] | None:
    return items if len(items) >= n else None


async def _has(items: list[str], value: str) -> bool:
    return value in items


async def _detail_has(api: Api, command_id: str, text: str) -> dict[str, object] | None:
    body = await api.get(command_id)
    return body if text in (body["detail"] or "") else None


async def _accepted(api: Api, device_id: str, body: Mapping[str, object]) -> httpx.Response | None:
    r = await api.send(device_id, dict(body))
    return r if r.status_code == 202 else None
