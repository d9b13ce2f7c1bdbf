"""Batches as the consumers hand them over (real PostgreSQL): several records about one command
in one batch apply in order; a batch written without a lock never overwrites a command written
meanwhile; telemetry of devices with nothing waiting stores nothing."""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from sqlalchemy import func, select

from commands import store, waiting
from commands.progress import UNLOCKED_REPORT_WRITES, Progress
from commands.testing import Api, eventually, new_id
from commands.tracing import StepTracer
from common.contracts.commands import STATUS
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


def _report(cmd: dict[str, Any], status: str) -> Envelope[Any]:
    data = DeviceReport(
        device_id=cmd["device_id"],
        received_at=datetime.now(UTC),
        kind="ack",
        command_id=cmd["id"],
        status=status,
    )
    return _envelope(data)


def _unlocked(outcome: str) -> float:
    return float(UNLOCKED_REPORT_WRITES.labels(outcome)._value.get())


async def test_a_one_command_batch_is_written_without_a_lock(api: Api) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    body = {"action": "set_setting", "params": {"key": "cooldown_s", "value": 30}}
    cmd = (await api.send(device_id, body)).json()
    written = _unlocked("written")
    await _progress(api).apply_reports([_report(cmd, "accepted")])
    await _progress(api).apply_reports([_report(cmd, "succeeded")])
    unknown = {**cmd, "id": new_id("C")}
    await _progress(api).apply_reports([_report(unknown, "succeeded")])  # nothing to write
    assert _unlocked("written") == written + 2
    done = await api.get(cmd["id"])
    assert [h["status"] for h in done["history"]] == ["queued", "acked", "succeeded"]

    # Its status events went through the outbox with the rows: the relay publishes them.
    async def all_published() -> bool:
        return len(api.bus.statuses_of(cmd["id"])) == 3

    await eventually(all_published)
    assert api.bus.statuses_of(cmd["id"]) == ["queued", "acked", "succeeded"]


async def test_only_the_commit_that_ends_a_command_wakes_its_waiting_readers(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    device_id = new_id()
    await api.bus.device_registered(device_id)
    await api.known(device_id)
    body = {"action": "set_setting", "params": {"key": "cooldown_s", "value": 30}}
    cmd = (await api.send(device_id, body)).json()
    woken: list[set[str]] = []
    monkeypatch.setattr(waiting, "committed", lambda ids: woken.append(set(ids)))
    await _progress(api).apply_reports([_report(cmd, "accepted")])
    assert woken == []  # acked: a reader waiting for the end would find nothing new
    await _progress(api).apply_reports([_report(cmd, "succeeded")])
    assert woken == [{cmd["id"]}]


async def test_an_unlocked_batch_never_overwrites_a_command_written_since_its_read(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    device_id, other_device = new_id(), new_id()
    for d in (device_id, other_device):
        await api.bus.device_registered(d)
        await api.known(d)
    cmd = (await api.send(device_id, {"action": "reboot"})).json()
    other = (await api.send(other_device, {"action": "reboot"})).json()
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON)  # the accept's context may be unsampled
    provider.add_span_processor(SimpleSpanProcessor(spans))
    batches = _progress(api)
    batches.tracer = StepTracer(provider)
    read = store.read_commands

    async def read_then_another_batch_fails_it(on: store.Driver, ids: Any) -> Any:
        found = await read(on, ids)  # the commands as they were: queued
        monkeypatch.setattr(store, "read_commands", read)
        await batches.apply_reports([_report(cmd, "failed")])  # meanwhile: failed, its end
        return found

    monkeypatch.setattr(store, "read_commands", read_then_another_batch_fails_it)
    conflicts = _unlocked("conflict")
    # Read as queued, a success would have moved it: the guard refuses, the locked path
    # re-reads it failed and leaves it so. The other command of the batch is written.
    await batches.apply_reports([_report(cmd, "succeeded"), _report(other, "succeeded")])
    assert _unlocked("conflict") == conflicts + 1
    done = await api.get(cmd["id"])
    assert done["status"] == "failed"
    assert [h["status"] for h in done["history"]] == ["queued", "failed"]
    assert (await api.get(other["id"]))["status"] == "succeeded"
    async with batches.sessions() as session:
        events = (
            await session.execute(
                select(store.outbox.c.payload)
                .where(store.outbox.c.key == device_id, store.outbox.c.topic == STATUS.name)
                .order_by(store.outbox.c.id)
            )
        ).scalars()
        statuses = [json.loads(e)["data"]["status"] for e in events]
    assert statuses == ["queued", "failed"]  # the refused write's `succeeded`: not written
    # One span per update written: the refused attempt's span was never ended, so not exported.
    steps = sorted(
        (str((s.attributes or {})["command.id"]), s.name) for s in spans.get_finished_spans()
    )
    assert steps == sorted(
        [(cmd["id"], "command ack failed"), (other["id"], "command ack succeeded")]
    )


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
