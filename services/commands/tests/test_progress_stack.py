"""Batches as the consumers hand them over (real PostgreSQL): several records about one command
in one batch apply in order; telemetry of devices with nothing waiting stores nothing."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from commands import store
from commands.progress import Progress
from commands.testing import Api, new_id
from common.contracts.device import DeviceReport, DeviceTelemetry
from common.events import Envelope, new_event

pytestmark = pytest.mark.stack


def _progress(api: Api) -> Progress:
    transport: Any = api.client._transport
    return Progress(sessions=transport.app.state.service.sessions)


def _envelope(data: Any) -> Envelope[Any]:
    return new_event(type="test", data=data, source="test", key=data.device_id)


async def test_accepted_and_succeeded_in_one_batch_end_succeeded_in_order(api: Api) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    body = {"action": "set_setting", "params": {"key": "cooldown_s", "value": 30}}
    cmd = (await api.send(device_id, body)).json()
    now = datetime.now(UTC)
    reports = [
        DeviceReport(device_id=device_id, received_at=now + timedelta(milliseconds=i),
                     kind="ack", command_id=cmd["id"], status=status)
        for i, status in enumerate(("accepted", "succeeded", "accepted"))
    ]  # fmt: skip
    await _progress(api).apply_reports([_envelope(r) for r in reports])
    done = await api.get(cmd["id"])
    assert done["status"] == "succeeded"
    assert [h["status"] for h in done["history"]] == ["queued", "acked", "succeeded"]


async def test_telemetry_of_devices_without_a_waiting_command_is_not_stored(api: Api) -> None:
    idle, starting = new_id(), new_id()
    for device_id in (idle, starting):
        await api.bus.device_registered(device_id)
        await api.known(device_id)
    start = (await api.send(starting, {"action": "start"})).json()
    now = datetime.now(UTC) + timedelta(seconds=1)
    batch = [
        DeviceTelemetry(device_id=d, received_at=now, ts=now, run_state="running")
        for d in (idle, starting)
    ]
    progress = _progress(api)
    await progress.apply_telemetry([_envelope(t) for t in batch])
    async with progress.sessions() as session:
        stored = await session.scalar(
            select(func.count())
            .select_from(store.device_state)
            .where(store.device_state.c.device_id.in_([idle, starting]))
        )
    assert stored == 1  # only the device with a Start on its way
    # The Start's device ack then finds the run state already shown: succeeded at once.
    await api.bus.ack(start, "succeeded")
    await api.wait_status(start["id"], "succeeded")


async def test_a_batch_locked_read_on_the_driver_holds_its_locks_until_the_commit(
    api: Api,
) -> None:
    # `store.driver` must begin the session's transaction: SQLAlchemy sends BEGIN lazily, and a
    # FOR UPDATE run outside it would release its lock at once (batches would interleave).
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    cmd = (await api.send(device_id, {"action": "reboot"})).json()
    sessions = _progress(api).sessions
    async with sessions() as holder, holder.begin():
        found = await store.locked_commands(await store.driver(holder), {cmd["id"]})
        assert set(found) == {cmd["id"]}
        async with sessions() as other, other.begin():
            skipped = await other.execute(
                select(store.commands.c.id)
                .where(store.commands.c.id == cmd["id"])
                .with_for_update(skip_locked=True)
            )
            assert skipped.all() == []  # still locked by the first transaction
    async with sessions() as other, other.begin():
        free = await other.execute(
            select(store.commands.c.id)
            .where(store.commands.c.id == cmd["id"])
            .with_for_update(skip_locked=True)
        )
        assert free.scalars().all() == [cmd["id"]]
