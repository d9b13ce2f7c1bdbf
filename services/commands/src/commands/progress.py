"""What devices, the gateway and the other services report, applied a whole poll at a time.

Each batch is one transaction: the commands the batch can move are read (and locked, in id order,
so concurrent batches never deadlock) in one query, every record is applied in order to those
in memory, and only what changed is written. Telemetry and presence, which every device sends
all the time, are first narrowed to the devices with a command waiting for them; the run state
and presence of other devices are not kept (a command only counts what was reported after it
was made, see `domain.on_ack`). The offsets are committed after the transaction
(`common.kafka_batch`); a repeated batch changes nothing, because states only move forward.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy.exc
from opentelemetry.trace import Span
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from commands import domain, store, transitions
from commands.tracing import StepTracer
from common.contracts.commands import CommandStatus
from common.contracts.device import DevicePresence, DeviceReport, DeviceTelemetry
from common.contracts.firmware import FirmwareRelease
from common.contracts.fleet import FleetDevice
from common.db import transaction
from common.events import Envelope

logger = logging.getLogger(__name__)

RUN_STATE_ACTIONS = tuple(domain.RUN_STATE_OF)
UNLOCKED_REPORT_WRITES = Counter(
    "autogen_commands_unlocked_report_writes_total",
    "Report batches written without a lock; a conflict (the command was written meanwhile)"
    " sends the batch to the locked path.",
    ["outcome"],
)
PRESENCE_ACTIONS = (*sorted(domain.OTA_ACTIONS), "reboot")


def _now() -> datetime:
    return datetime.now(UTC)


@asynccontextmanager
async def _batch(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One transaction for a batch. No free connection in the pool is a wait, not a verdict:
    it is raised as the builtin `TimeoutError`, which the batch consumer retries instead of
    dead-lettering the batch."""
    try:
        async with transaction(sessions) as session:
            yield session
    except sqlalchemy.exc.TimeoutError as exc:
        raise TimeoutError(str(exc)) from exc


@dataclass
class Progress:
    """The batch use cases, bound to the database and the clock."""

    sessions: async_sessionmaker[AsyncSession]
    # Autocommit connections for reads that need no transaction (see `_would_move`).
    reads: AsyncEngine | None = None
    clock: Callable[[], datetime] = _now
    # Telemetry and presence batches start at most this often: every device sends them all the
    # time and a batch costs a transaction and an offset commit whatever its size, so pacing
    # makes batches larger and the service cheaper (Start/Stop confirmations wait that long).
    device_batch_interval_s: float = 0.1
    # Spans of the updates reports and gateway statuses make (see `commands.tracing`).
    tracer: StepTracer = field(default_factory=StepTracer)
    _last_start: dict[str, float] = field(default_factory=dict)

    async def _pace(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        last = self._last_start.get(name)
        if last is not None:
            await asyncio.sleep(max(0.0, last + self.device_batch_interval_s - loop.time()))
        self._last_start[name] = loop.time()

    async def apply_reports(
        self,
        events: Sequence[Envelope[DeviceReport]],
        traceparents: Mapping[str, str] | None = None,
    ) -> None:
        """Devices' acks and OTA progress; `traceparents` (by event id) are the records'.

        The batch is first applied to its commands read without a lock, and written in one
        statement without BEGIN and COMMIT, each command only if nothing wrote it since it was
        read (`row_version`): two round trips instead of four on every command's way to its
        end. The reports of a command that was written meanwhile, and every report of a batch
        with a success that waits for the device's run state (read after the locks, see
        `_apply_locked`), take the locked path."""
        traceparents = traceparents or {}
        reports = [(e.data, traceparents.get(str(e.event_id))) for e in events]
        rest = await self._apply_unlocked(reports)
        if rest:
            await self._apply_locked(rest)

    async def _apply_unlocked(
        self, reports: list[tuple[DeviceReport, str | None]]
    ) -> list[tuple[DeviceReport, str | None]]:
        """Apply the reports by a guarded write; returns those the locked path must apply."""
        async with _batch(self.sessions) as session:
            on = await store.driver(session, begin=False)
            found = await store.read_commands(on, {r.command_id for r, _ in reports})
            cmds = {i: store.to_domain(row) for i, row in found.items()}
            if _awaiting_run_state(reports, cmds):
                return reports
            writes = transitions.Writes()
            spans: list[tuple[str, Span]] = []
            self._apply_to(reports, cmds, found, {}, writes, open_spans=spans)
            if not writes.staged:
                return []  # nothing to write (e.g. acks of commands this service never made)
            not_written = await writes.flush_unchanged(
                session, {i: row["row_version"] for i, row in found.items()}
            )
        # The locked path makes the spans of what was not written again: end only the others.
        for command_id, span in spans:
            if command_id not in not_written:
                span.end()
        UNLOCKED_REPORT_WRITES.labels("conflict" if not_written else "written").inc()
        return [(r, c) for r, c in reports if r.command_id in not_written]

    async def _apply_locked(self, reports: list[tuple[DeviceReport, str | None]]) -> None:
        async with _batch(self.sessions) as session:
            on = await store.driver(session)
            found = await store.locked_commands(on, {r.command_id for r, _ in reports})
            cmds = {i: store.to_domain(row) for i, row in found.items()}
            # Read after the locks: a telemetry batch holding them has committed its run state.
            # Only a success that the device's own state must confirm needs it.
            states = await store.device_states(on, _awaiting_run_state(reports, cmds))
            writes = transitions.Writes()
            self._apply_to(reports, cmds, found, states, writes)
            await writes.flush(session)

    def _apply_to(
        self,
        reports: list[tuple[DeviceReport, str | None]],
        cmds: dict[str, domain.Command],
        found: Mapping[str, store.Record],
        states: Mapping[str, store.Record],
        writes: transitions.Writes,
        *,
        open_spans: list[tuple[str, Span]] | None = None,
    ) -> None:
        """Stage what each report changes, in order, on `cmds` (updated as they move). With
        `open_spans`, each update's span is left open there for the caller to end once written
        (`StepTracer.open_step`)."""
        now = self.clock()
        for report, record_context in reports:
            cmd = cmds.get(report.command_id)
            if cmd is None or cmd.device_id != report.device_id:
                logger.debug(
                    "report for an unknown command ignored",
                    extra={"command_id": report.command_id, "device_id": report.device_id},
                )
                continue
            change = _on_report(cmd, report, states.get(report.device_id))
            if change is None:
                continue
            name = f"command {report.kind} {report.status or report.phase}"
            traceparent = found[cmd.id]["traceparent"]
            if open_spans is None:
                with self.tracer.step(name, cmd.id, traceparent, record_context):
                    moved = writes.apply(change, "device", now)
            else:
                with self.tracer.open_step(name, cmd.id, traceparent, record_context) as span:
                    moved = writes.apply(change, "device", now)
                open_spans.append((cmd.id, span))
            cmds[cmd.id] = moved or cmd

    async def apply_gateway_statuses(self, events: Sequence[Envelope[CommandStatus]]) -> None:
        """The gateway's `sent` and `expired` (this service's own status events are skipped)."""
        statuses = [e.data for e in events if e.data.reporter == "gateway"]
        if self.reads is not None and statuses:
            statuses = await self._would_move(self.reads, statuses)
        if not statuses:
            return
        async with _batch(self.sessions) as session:
            on = await store.driver(session)
            found = await store.locked_commands(on, {s.command_id for s in statuses})
            cmds = {i: store.to_domain(row) for i, row in found.items()}
            now = self.clock()
            writes = transitions.Writes()
            for status in statuses:
                cmd = cmds.get(status.command_id)
                if cmd is None:
                    continue
                change = domain.on_gateway_status(cmd, status.status, status.detail)
                if change is None:
                    continue
                with self.tracer.step(
                    f"command gateway {status.status}", cmd.id, found[cmd.id]["traceparent"]
                ):
                    moved = writes.apply(change, "gateway", now)
                cmds[cmd.id] = moved or cmd
            await writes.flush(session)

    @staticmethod
    async def _would_move(reads: AsyncEngine, statuses: list[CommandStatus]) -> list[CommandStatus]:
        """The statuses that would move their command, by an unlocked read (one statement, no
        transaction). The gateway's `sent` mostly arrives after the device's ack has moved the
        command on, and then a locked transaction changed nothing. A status that would not move
        its command now never will (states only move forward), so skipping it is safe."""
        found = await _read(reads, {s.command_id for s in statuses})
        return [
            s
            for s in statuses
            if s.command_id in found
            and domain.on_gateway_status(store.to_domain(found[s.command_id]), s.status, s.detail)
            is not None
        ]

    async def apply_telemetry(self, events: Sequence[Envelope[DeviceTelemetry]]) -> None:
        """Run states of devices with a Start/Stop on its way; a finished one they confirm
        succeeds."""
        await self._pace("telemetry")
        seen = [e.data for e in events if e.data.run_state is not None]
        if not seen:
            return
        async with _batch(self.sessions) as session:
            rows = await store.locked_active_for_devices(
                await store.driver(session), {t.device_id for t in seen}, actions=RUN_STATE_ACTIONS
            )
            if not rows:
                return
            waiting = _by_device(rows)
            latest: dict[str, tuple[str, datetime]] = {}
            now = self.clock()
            writes = transitions.Writes()
            for t in seen:
                cmds = waiting.get(t.device_id)
                if cmds is None or t.run_state is None:
                    continue
                known = latest.get(t.device_id)
                if known is None or known[1] <= t.received_at:
                    latest[t.device_id] = (t.run_state, t.received_at)
                for i, cmd in enumerate(cmds):
                    change = domain.on_run_state(cmd, t.run_state, t.received_at)
                    cmds[i] = writes.apply(change, "device", now) or cmd
            await writes.flush(session)
            await store.record_run_states(session, latest)

    async def apply_presence(self, events: Sequence[Envelope[DevicePresence]]) -> None:
        """Online/offline with firmware, for devices with an OTA or a reboot on its way: the
        end of it.

        Nothing is re-sent on reconnect: the gateway delivers each command id once at QoS 1 to
        the device's persistent MQTT session, and the broker hands it over when the device
        returns (see the README, "Offline devices").
        """
        await self._pace("presence")
        seen = [e.data for e in events]
        async with _batch(self.sessions) as session:
            rows = await store.locked_active_for_devices(
                await store.driver(session), {p.device_id for p in seen}, actions=PRESENCE_ACTIONS
            )
            if not rows:
                return
            waiting = _by_device(rows)
            latest: dict[str, tuple[bool, str | None, datetime]] = {}
            now = self.clock()
            writes = transitions.Writes()
            for p in seen:
                cmds = waiting.get(p.device_id)
                if cmds is None:
                    continue
                online = p.state == "online"
                known = latest.get(p.device_id)
                if known is None or known[2] <= p.received_at:
                    latest[p.device_id] = (online, p.fw, p.received_at)
                for i, cmd in enumerate(cmds):
                    change = domain.on_presence(cmd, online, p.fw, p.received_at)
                    cmds[i] = writes.apply(change, "device", now) or cmd
            await writes.flush(session)
            await store.record_presences(session, latest)

    async def apply_fleet_devices(self, events: Sequence[Envelope[FleetDevice]]) -> None:
        """Keep the ownership snapshots for scope checks and release matching."""
        async with _batch(self.sessions) as session:
            await store.upsert_devices(
                session,
                [
                    {
                        "device_id": d.device_id,
                        "dealer_id": d.dealer_id,
                        "customer_email": d.customer_email,
                        "model": d.model,
                        "engine": d.engine,
                        "transport": d.transport,
                        "deleted": d.deleted,
                    }
                    for d in (e.data for e in events)
                ],
            )

    async def apply_releases(self, events: Sequence[Envelope[FirmwareRelease]]) -> None:
        """Keep the releases' artifacts and target variants for OTA requests."""
        async with _batch(self.sessions) as session:
            await store.upsert_releases(
                session,
                [
                    {
                        "release_id": r.release_id,
                        "version": r.version,
                        "models": list(r.models),
                        "engine": r.engine,
                        "transport": r.transport,
                        "artifact_url": r.artifact_url,
                        "sha256": r.sha256,
                        "size": r.size,
                        "withdrawn": r.withdrawn,
                    }
                    for r in (e.data for e in events)
                ],
            )


async def _read(reads: AsyncEngine, ids: set[str]) -> dict[str, store.Record]:
    try:
        async with reads.connect() as conn:
            return await store.read_commands(await store.driver(conn), ids)
    except sqlalchemy.exc.TimeoutError as exc:  # a full pool: wait and retry, as `_batch`
        raise TimeoutError(str(exc)) from exc


def _awaiting_run_state(
    reports: Sequence[tuple[DeviceReport, str | None]], cmds: Mapping[str, domain.Command]
) -> set[str]:
    """The devices whose success report must be checked against their run state."""
    return {
        r.device_id
        for r, _ in reports
        if r.kind == "ack"
        and r.status == "succeeded"
        and r.command_id in cmds
        and cmds[r.command_id].action in domain.CONFIRMED_BY_STATE
    }


def _by_device(rows: Sequence[store.Record]) -> dict[str, list[domain.Command]]:
    waiting: dict[str, list[domain.Command]] = {}
    for row in rows:
        cmd = store.to_domain(row)
        waiting.setdefault(cmd.device_id, []).append(cmd)
    for cmds in waiting.values():
        cmds.sort(key=lambda c: (c.created_at, c.id))
    return waiting


def _on_report(
    cmd: domain.Command, report: DeviceReport, state: store.Record | None
) -> domain.Change | None:
    at = report.received_at
    if report.kind == "ack" and report.status is not None:
        return domain.on_ack(
            cmd,
            report.status,
            report.detail,
            at,
            run_state=state["run_state"] if state else None,
            run_state_at=state["run_state_at"] if state else None,
            fw=state["fw"] if state and state["online"] else None,
            fw_at=state["presence_at"] if state else None,
        )
    if report.kind == "ota" and report.phase is not None:
        return domain.on_ota_phase(cmd, report.phase, report.progress_pct, report.detail, at)
    return None
