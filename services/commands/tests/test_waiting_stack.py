"""`GET /commands/{id}` with `Prefer: wait=N` against the real database and Kafka: answered when
the command ends, not before; after N seconds with what it is then; and woken by another
replica's commit through PostgreSQL NOTIFY."""

import asyncio

import asyncpg
import pytest

from commands import store, waiting
from commands.testing import DEALER_1, DEALER_2, Api, eventually, new_id
from common.db import make_engine
from common.outbox import notify_channel

pytestmark = pytest.mark.stack


async def test_a_waiting_get_answers_when_the_command_ends(
    api: Api, device_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No safety-net re-reads: only the commit's wake-up can answer within the test.
    monkeypatch.setattr(waiting, "RECHECK_S", 60.0)
    cmd = (await api.send(device_id, {"action": "reboot"})).json()
    headers = {**api.as_(DEALER_1), "Prefer": "wait=30"}
    waiting_get = asyncio.create_task(
        api.client.get(f"/api/v1/commands/{cmd['id']}", headers=headers)
    )

    await api.bus.gateway_status(cmd, "sent")
    await api.wait_status(cmd["id"], "sent")
    await api.bus.ack(cmd, "accepted")
    await api.wait_status(cmd["id"], "acked")
    # Moves that do not end the command do not answer it.
    assert not waiting_get.done()

    await api.bus.ack(cmd, "succeeded")
    # Well before the 30 s asked for: answered by the end, not the time limit.
    answer = await asyncio.wait_for(waiting_get, 10)
    assert answer.status_code == 200
    assert answer.headers["Preference-Applied"] == "wait=30"
    body = answer.json()
    assert body["status"] == "succeeded"
    assert [h["status"] for h in body["history"]] == ["queued", "sent", "acked", "succeeded"]


async def test_a_waiting_get_of_a_command_that_does_not_end_answers_after_the_wait(
    api: Api, device_id: str
) -> None:
    cmd = (await api.send(device_id, {"action": "reboot"})).json()
    headers = {**api.as_(DEALER_1), "Prefer": "wait=1"}
    answer = await api.client.get(f"/api/v1/commands/{cmd['id']}", headers=headers)
    assert answer.status_code == 200
    assert answer.headers["Preference-Applied"] == "wait=1"
    assert answer.json()["status"] in {"queued", "sent"}


async def test_a_waiting_get_keeps_the_access_rules(api: Api, device_id: str) -> None:
    cmd = (await api.send(device_id, {"action": "reboot"})).json()
    headers = {**api.as_(DEALER_2), "Prefer": "wait=5"}
    answer = await api.client.get(f"/api/v1/commands/{cmd['id']}", headers=headers)
    assert answer.status_code == 404
    unknown = await api.client.get(f"/api/v1/commands/{new_id('C')}", headers=headers)
    assert unknown.status_code == 404


async def test_another_replicas_commit_wakes_waiters_through_notify(commands_db: str) -> None:
    engine = make_engine(commands_db, pool_size=2)
    waiters = waiting.Waiters()
    stop = asyncio.Event()
    channel = notify_channel(store.outbox)
    follower = asyncio.create_task(waiting.follow_other_replicas(waiters, engine, channel, stop))
    other = await asyncpg.connect(commands_db.replace("+asyncpg", ""))
    try:
        with waiters.watching("c-1") as woken:

            async def notified() -> bool:
                # As another process's commit of status events would (until the LISTEN is on).
                await other.execute("SELECT pg_notify($1, 'another-process')", channel)
                await asyncio.sleep(0.05)
                return woken.is_set()

            assert await eventually(notified, deadline_s=10)
    finally:
        stop.set()
        await follower
        await other.close()
        await engine.dispose()
