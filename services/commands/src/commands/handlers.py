"""The commands service's use cases: one function each, one transaction each (what devices and
the gateway report is applied in batches by `commands.progress`).

Every state change writes its events through the outbox in the same transaction
(`command.dispatch.v1` to the gateway, `command.status.v1` for every transition), so nothing a
caller was told is lost when the process dies.
"""

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from commands import domain, store, transitions
from commands.access import access_device
from common.auth import Principal
from common.contracts import commands as contract
from common.contracts.commands import CommandDispatch, CommandRequest
from common.db import transaction
from common.events import Envelope, new_event
from common.kafka import PermanentError, RetryLaterError
from common.telemetry import current_trace_headers

logger = logging.getLogger(__name__)
SOURCE = "commands"
# Accepts that take the device's row lock: Start/Stop check that no firmware update runs, and
# OTA commands are what they check for.
_SERIALISED = frozenset(domain.RUN_STATE_OF) | frozenset(domain.OTA_ACTIONS)


class IdempotencyMismatchError(Exception):
    """An Idempotency-Key reused with a different request (422)."""


class UnknownDeviceError(Exception):
    """No device with that id in the registry (404)."""


@dataclass(frozen=True)
class Requester:
    """Who asks: a principal (HTTP, scope-checked) or a service over Kafka (trusted)."""

    user_id: str
    principal: Principal | None = None
    email: str | None = None
    token_id: str | None = None

    @property
    def idempotency_scope(self) -> str:
        """Keys are per principal over HTTP, and one namespace for requests over Kafka."""
        return f"user:{self.user_id}" if self.principal is not None else "bus"


@dataclass(frozen=True)
class NewCommand:
    """A request for a command, as the API or `command.request.v1` carries it."""

    device_id: str
    action: str
    params: dict[str, Any] = field(default_factory=dict)
    ttl_s: int | None = None
    idempotency_key: str | None = None
    correlation: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """What must match for a repeated Idempotency-Key to name the same command."""
        body = {
            "device_id": self.device_id,
            "action": self.action,
            "params": self.params,
            "ttl_s": self.ttl_s,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Accepted:
    """The command a request made (or had made before, when `replayed`)."""

    row: Row[Any] | store.Fetched
    replayed: bool


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class CommandService:
    """The use cases, bound to the database and the clock."""

    sessions: async_sessionmaker[AsyncSession]
    run_state_window: timedelta = timedelta(seconds=60)
    request_grace: timedelta = timedelta(seconds=60)
    clock: Callable[[], datetime] = _now
    sweep_batch: int = 500

    # ------------------------------------------------------------ accept

    async def accept(self, new: NewCommand, who: Requester) -> Accepted:
        """Validate and store a command with its dispatch event, or return the keyed one."""
        try:
            return await self._accept(new, who)
        except IntegrityError:
            # Two requests raced with the same key: the loser finds the winner's command.
            return await self._accept(new, who)

    async def _accept(self, new: NewCommand, who: Requester) -> Accepted:
        if new.idempotency_key is None and new.action not in _SERIALISED:
            return await self._accept_unlocked(new, who)
        async with transaction(self.sessions) as session:
            # The device row lock serialises accepts per device (the OTA check below).
            device = await store.get_device(session, new.device_id, lock=True)
            if who.principal is not None:
                device = access_device(who.principal, device, new.device_id, "control")
            if new.idempotency_key is not None:
                found = await store.find_by_key(session, who.idempotency_scope, new.idempotency_key)
                if found is not None:
                    if found.fingerprint != new.fingerprint():
                        raise IdempotencyMismatchError(new.idempotency_key)
                    return Accepted(found, replayed=True)
            return await self._insert(session, new, who, device)

    async def _accept_unlocked(self, new: NewCommand, who: Requester) -> Accepted:
        """The common accept (no Idempotency-Key; an action that neither checks for a running
        firmware update nor is checked for: not Start/Stop, not OTA) in two round trips instead
        of four: the device read unlocked, then the one INSERT statement (the command, its
        transition and both events: atomic on its own), without BEGIN and COMMIT. The device
        lock only serialises the Start/Stop check against OTA inserts, so nothing here needs
        it. The session's commit still runs its hooks (the transitions counter, waiting
        readers, the relay's wake-up)."""
        async with transaction(self.sessions) as session:
            device = await store.device_of(await store.driver(session, begin=False), new.device_id)
            if who.principal is not None:
                device = access_device(who.principal, device, new.device_id, "control")
            return await self._insert(session, new, who, device, begin=False)

    async def _insert(
        self,
        session: AsyncSession,
        new: NewCommand,
        who: Requester,
        device: domain.Device | None,
        *,
        begin: bool = True,
    ) -> Accepted:
        """Check the request against `device` and write the command with its dispatch
        (`begin=False`: no transaction, the write is one statement, see `store.driver`)."""
        if device is None:
            raise UnknownDeviceError(new.device_id)
        ttl_s = domain.resolve_ttl(new.action, new.ttl_s)
        params = domain.check_params(new.action, new.params, device)
        dispatch_params, version = await self._resolve(session, new.action, params, device)
        if new.action in domain.RUN_STATE_OF:
            await self._refuse_during_update(session, device.device_id)
        now = self.clock()
        values = self._row(new, who, now=now, ttl_s=ttl_s, params=params)
        values.update(status="queued", dispatch_params=dispatch_params, ota_version=version)
        writes = transitions.Writes()
        writes.event(contract.DISPATCH, self._dispatch(values))
        writes.record(store.new_command(values), "commands", now)
        # The command, its transition and both events: one statement.
        row = await writes.flush(session, insert=values, begin=begin)
        assert row is not None  # noqa: S101 - flush returns the inserted row
        return Accepted(row, replayed=False)

    async def _resolve(
        self, session: AsyncSession, action: str, params: dict[str, Any], device: domain.Device
    ) -> tuple[dict[str, Any], str | None]:
        if action not in domain.OTA_ACTIONS:
            return params, None
        release = await store.get_release(session, params["release_id"])
        if release is None:
            raise domain.InvalidCommandError(
                "params.release_id",
                f"unknown release {params['release_id']!r}",
                unknown_release=True,
            )
        mismatch = domain.release_mismatch(release, device)
        if mismatch is not None:
            raise domain.InvalidCommandError("params.release_id", mismatch)
        return domain.ota_params(release), release.version

    async def _refuse_during_update(self, session: AsyncSession, device_id: str) -> None:
        active = await store.active_for_device(
            session, device_id, actions=tuple(domain.OTA_ACTIONS)
        )
        now = self.clock()
        for row in active:
            cmd = store.to_domain(row)
            if cmd.updating and now < cmd.expires_at:
                doing = cmd.ota_phase or cmd.status
                raise domain.CommandConflictError(
                    f"a firmware update ({cmd.action} {cmd.id}, {doing}) is running on "
                    f"{device_id}; Start and Stop wait until it ends"
                )

    def _row(
        self, new: NewCommand, who: Requester, *, now: datetime, ttl_s: int, params: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "device_id": new.device_id,
            "action": new.action,
            "params": params,
            "created_at": now,
            "updated_at": now,
            "expires_at": now + timedelta(seconds=ttl_s),
            "requested_by": who.user_id,
            "requested_by_email": who.email,
            "token_id": who.token_id,
            "origin": "api" if who.principal is not None else "bus",
            "idempotency_scope": who.idempotency_scope if new.idempotency_key else None,
            "idempotency_key": new.idempotency_key,
            "fingerprint": new.fingerprint() if new.idempotency_key else None,
            "correlation": new.correlation,
            "traceparent": current_trace_headers().get("traceparent"),
        }

    async def handle_request(self, event: Envelope[CommandRequest]) -> None:
        """A service's request over Kafka: the same lifecycle; refusals end `rejected`."""
        req = event.data
        new = NewCommand(
            device_id=req.device_id,
            action=req.action,
            params=dict(req.params),
            ttl_s=req.ttl_s,
            idempotency_key=req.request_id,
            correlation=dict(req.correlation),
        )
        who = Requester(user_id=req.requested_by)
        # The device's registry entry or the release may still be on its way to this service
        # (another topic): a young request naming one we lack is read again, not rejected.
        young = self.clock() - event.occurred_at < self.request_grace
        try:
            await self.accept(new, who)
        except IdempotencyMismatchError as exc:
            # Nothing sensible to reject: the key names another command. Keep the record.
            raise PermanentError(f"request_id {exc} was used for a different command") from exc
        except UnknownDeviceError as exc:
            if young:
                raise RetryLaterError(f"device {req.device_id!r} not known yet") from exc
            await self._reject(new, who, f"device_id: no device {req.device_id!r}")
        except domain.InvalidCommandError as exc:
            if young and exc.unknown_release:
                raise RetryLaterError(str(exc)) from exc
            await self._reject(new, who, str(exc))
        except domain.CommandConflictError as exc:
            await self._reject(new, who, str(exc))

    async def _reject(self, new: NewCommand, who: Requester, reason: str) -> None:
        async with transaction(self.sessions) as session:
            if await store.find_by_key(session, who.idempotency_scope, new.idempotency_key or ""):
                return
            now = self.clock()
            values = self._row(new, who, now=now, ttl_s=0, params=new.params)
            values.update(status="rejected", detail=reason, dispatch_params={})
            writes = transitions.Writes()
            writes.record(store.new_command(values), "commands", now)
            await writes.flush(session, insert=values)

    # ------------------------------------------------------------ time

    async def sweep(self) -> int:
        """Expire what got no result in its TTL; fail unconfirmed Start/Stop. Returns how many."""
        now = self.clock()
        async with transaction(self.sessions) as session:
            rows = await store.due(
                session, now, run_state_cutoff=now - self.run_state_window, limit=self.sweep_batch
            )
            changed = 0
            writes = transitions.Writes()
            for row in rows:
                change = domain.on_sweep(store.to_domain(row), now, self.run_state_window)
                if change is not None:
                    writes.apply(change, "commands", now)
                    changed += 1
            await writes.flush(session)
        return changed

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _dispatch(values: dict[str, Any]) -> Envelope[CommandDispatch]:
        dispatch = CommandDispatch(
            command_id=values["id"],
            device_id=values["device_id"],
            action=values["action"],
            params=dict(values["dispatch_params"]),
            expires_at=values["expires_at"],
        )
        return new_event(
            type=contract.DISPATCH.event_type,
            data=dispatch,
            source=SOURCE,
            key=values["device_id"],
        )
