"""Firmware rules with no I/O: release variants, the per-device rollout state machine, throttling.

Every transition is a function from the current `Progress` (and what happened) to a `Change`
(the new progress, or None when nothing changes). The caller stores the new progress and emits a
`device_state_changed` event when the state moved; nothing here knows about SQL or Kafka.
"""

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from common.catalog import MODELS, Console

State = Literal[
    "pending", "sent", "updating", "awaiting_return", "confirmed", "failed", "cancelled"
]
RolloutStatus = Literal["running", "paused", "cleared", "completed"]

IN_FLIGHT: frozenset[str] = frozenset({"sent", "updating", "awaiting_return"})
ACTIVE: frozenset[str] = frozenset({"pending"}) | IN_FLIGHT
FINISHED: frozenset[str] = frozenset({"confirmed", "failed"})
COUNTED: tuple[str, ...] = (
    "pending",
    "sent",
    "updating",
    "awaiting_return",
    "confirmed",
    "failed",
    "cancelled",
)


class RuleError(Exception):
    """A request that breaks a firmware rule; `status` is the HTTP answer, `field` what is wrong."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.field = field
        self.message = message


# ------------------------------------------------------------------ releases and variants


@dataclass(frozen=True)
class Variant:
    """What a release may be installed on: models, and an engine and transport (None: any)."""

    console: Console
    models: tuple[str, ...]
    engine: str | None
    transport: str | None


def check_release(variant: Variant) -> None:
    """Raise `RuleError(422)` unless `variant` is a release its console allows."""
    if not variant.models:
        raise RuleError(422, "models", "name at least one model")
    for model in variant.models:
        found = MODELS.get(model)
        if found is None:
            raise RuleError(422, "models", f"unknown model {model!r}; one of {', '.join(MODELS)}")
        if found.console != variant.console:
            raise RuleError(
                422,
                "models",
                f"{model} firmware goes through the {found.console} console, not {variant.console}",
            )
    engines = {engine for model in variant.models for engine in MODELS[model].engines}
    if variant.console == "unified":
        if variant.engine is None or variant.transport is None:
            raise RuleError(
                422,
                "engine" if variant.engine is None else "transport",
                "a Unified release names its engine and transport variant",
            )
        if variant.engine not in engines:
            raise RuleError(
                422, "engine", f"unknown engine {variant.engine!r}; one of {', '.join(engines)}"
            )
    elif variant.engine is not None:
        raise RuleError(422, "engine", f"{variant.console} releases have no engine variants")
    if variant.console == "ultra" and variant.transport is None:
        raise RuleError(422, "transport", "an Ultra release is for gsm or for wifi, name one")


def variant_mismatch(
    variant: Variant, *, model: str, engine: str | None, transport: str
) -> tuple[str, str] | None:
    """(field, why) when a device of this model/engine/transport may not take the release."""
    if model not in variant.models:
        return "model", f"the release is for {', '.join(variant.models)}, not {model}"
    if variant.engine is not None and engine != variant.engine:
        return "engine", f"the release is for engine {variant.engine}, not {engine or 'none'}"
    if variant.transport is not None and transport != variant.transport:
        return "transport", f"the release is for {variant.transport} units, not {transport}"
    return None


def check_target(
    variant: Variant, *, models: list[str] | None, engine: str | None, transport: str | None
) -> None:
    """Raise `RuleError(422)` when a rollout's target names a variant the release is not for."""
    for model in models or ():
        if model not in MODELS:
            raise RuleError(422, "target.models", f"unknown model {model!r}")
        if model not in variant.models:
            raise RuleError(
                422,
                "target.models",
                f"the release is for {', '.join(variant.models)}, not {model}",
            )
    if engine is not None and engine != variant.engine:
        raise RuleError(
            422, "target.engine", f"the release is for engine {variant.engine or 'none'}"
        )
    if transport is not None and variant.transport is not None and transport != variant.transport:
        raise RuleError(422, "target.transport", f"the release is for {variant.transport} units")


# ------------------------------------------------------------------ policy


@dataclass(frozen=True)
class Policy:
    """Deadlines and retries (from the settings)."""

    deadline_wifi: timedelta
    deadline_gsm: timedelta
    deadline_gps: timedelta
    max_retries: int
    backoff: timedelta
    backoff_max: timedelta

    def deadline(self, *, transport: str, gps: bool) -> timedelta:
        """Time a device gets to come back: GSM and GPS units longer than WiFi units."""
        base = self.deadline_gsm if transport == "gsm" else self.deadline_wifi
        return max(base, self.deadline_gps) if gps else base

    def retry_delay(self, attempt: int) -> timedelta:
        """Backoff before attempt `attempt + 1`."""
        delay = self.backoff * (2 ** max(0, attempt - 1))
        return min(delay, self.backoff_max)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the device state machine


@dataclass(frozen=True)
class Progress:
    """Where one device of one rollout stands."""

    state: State
    attempt: int = 0
    command_id: str | None = None
    sent_at: datetime | None = None
    deadline_at: datetime | None = None
    next_attempt_at: datetime | None = None
    reported_version: str | None = None
    last_report: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Change:
    """The outcome of a transition; `moved` when the state changed (an event is due)."""

    before: Progress
    after: Progress

    @property
    def moved(self) -> bool:
        """Did the state change?"""
        return self.before.state != self.after.state


def dispatch(progress: Progress, *, now: datetime, deadline: timedelta) -> Change:
    """pending → sent: the OTA request goes out as attempt `attempt + 1`."""
    if progress.state != "pending":
        raise ValueError(f"cannot dispatch a device in state {progress.state}")
    after = replace(
        progress,
        state="sent",
        attempt=progress.attempt + 1,
        command_id=None,
        sent_at=now,
        deadline_at=now + deadline,
        next_attempt_at=None,
        detail=None,
    )
    return Change(progress, after)


def _failure(progress: Progress, *, detail: str, now: datetime, policy: Policy) -> Progress:
    """Retry later (back to pending) while attempts remain, else failed."""
    if progress.attempt <= policy.max_retries:
        return replace(
            progress,
            state="pending",
            next_attempt_at=now + policy.retry_delay(progress.attempt),
            deadline_at=None,
            detail=f"attempt {progress.attempt}: {detail}; retrying",
        )
    return replace(progress, state="failed", deadline_at=None, detail=detail)


def on_command_status(
    progress: Progress,
    *,
    attempt: int,
    command_id: str,
    status: str,
    detail: str | None,
    now: datetime,
    policy: Policy,
) -> Change | None:
    """The commands service's word on our OTA command (only the current attempt counts)."""
    if attempt != progress.attempt or progress.state not in IN_FLIGHT:
        return None
    current = replace(progress, command_id=progress.command_id or command_id)
    if status in ("failed", "rejected", "expired") and progress.state == "sent":
        # The command never got the device going: worth another attempt.
        why = f"command {status}" + (f": {detail}" if detail else "")
        return Change(progress, _failure(current, detail=why, now=now, policy=policy))
    if current == progress:
        return None
    return Change(progress, current)


def on_ota_report(
    progress: Progress,
    *,
    command_id: str,
    phase: str,
    detail: str | None,
    now: datetime,
    policy: Policy,
) -> Change | None:
    """An `up/ota` phase from the device.

    While `awaiting_return` the report is kept but the state stays: the phase and presence
    topics are read apart, so a `rebooting` report can arrive after the offline it preceded.
    """
    if progress.state not in IN_FLIGHT:
        return None
    if progress.command_id is not None and command_id != progress.command_id:
        return None  # a report about an earlier attempt's command
    report = phase + (f": {detail}" if detail else "")
    current = replace(progress, command_id=command_id, last_report=report)
    if phase == "failed":
        why = "device reported OTA failure" + (f": {detail}" if detail else "")
        return Change(progress, _failure(current, detail=why, now=now, policy=policy))
    if progress.state == "sent":
        # The device's own time starts when it starts: the whole window again from here, so
        # time the request spent queued in the platform (a backlog, a broker outage) is not
        # counted against the device ("Do not assume failure too quickly").
        current = replace(current, deadline_at=_restarted(progress, now))
    if progress.state == "awaiting_return":
        return Change(progress, current) if current != progress else None
    return Change(progress, replace(current, state="updating"))


def _restarted(progress: Progress, now: datetime) -> datetime | None:
    """`now` plus the device's deadline window (the request's deadline minus its time)."""
    if progress.deadline_at is None or progress.sent_at is None:
        return progress.deadline_at
    return max(progress.deadline_at, now + (progress.deadline_at - progress.sent_at))


def on_presence(  # noqa: PLR0911 - one return per case of the README table
    progress: Progress,
    *,
    online: bool,
    fw: str | None,
    at: datetime,
    target_version: str,
) -> Change | None:
    """The device went offline or came back (with the firmware it now runs)."""
    if progress.state not in ACTIVE:
        return None
    if progress.sent_at is not None and at < progress.sent_at:
        return None  # older than our request: says nothing about this OTA
    reported = replace(progress, reported_version=fw or progress.reported_version)
    if online and fw == target_version:
        return Change(progress, replace(reported, state="confirmed", deadline_at=None, detail=None))
    if not online:
        if progress.state == "updating":
            return Change(progress, replace(reported, state="awaiting_return"))
        return None
    # Back on another version after the reboot it reported: the update did not take. (An
    # offline event may be read before or after the `rebooting` report; either way it counts.)
    if progress.state != "sent" and (progress.last_report or "").startswith("reboot"):
        why = f"came back with version {fw or 'unknown'}, expected {target_version}"
        return Change(progress, replace(reported, state="failed", deadline_at=None, detail=why))
    if progress.state == "awaiting_return":
        # Away before any reboot: its connection dropped mid-download (the image comes over
        # HTTP, the update goes on). The deadline still bounds it.
        return Change(progress, replace(reported, state="updating"))
    return Change(progress, reported) if reported != progress else None


def on_deadline(progress: Progress, *, now: datetime, policy: Policy) -> Change | None:
    """The device did not start the update, or did not come back with it, in time."""
    if progress.state not in IN_FLIGHT or progress.deadline_at is None:
        return None
    if now < progress.deadline_at:
        return None
    waited = (progress.deadline_at - progress.sent_at).total_seconds() if progress.sent_at else 0
    if progress.state == "sent":
        # Never started (the command did not reach it, or reached it too late): like an
        # expired command, worth another attempt while attempts remain.
        why = f"did not start the update within {waited:.0f}s of the request"
        return Change(progress, _failure(progress, detail=why, now=now, policy=policy))
    why = f"not back with the new version within {waited:.0f}s (state {progress.state})"
    return Change(progress, replace(progress, state="failed", deadline_at=None, detail=why))


def cancel(progress: Progress, *, why: str) -> Change | None:
    """Clear (or supersede): a device not yet sent is cancelled."""
    if progress.state != "pending":
        return None
    return Change(progress, replace(progress, state="cancelled", next_attempt_at=None, detail=why))


# ------------------------------------------------------------------ rollouts


def next_status(
    current: RolloutStatus, action: Literal["pause", "resume", "clear"]
) -> RolloutStatus:
    """The rollout's status after an operator action; `RuleError(409)` when it does not apply."""
    allowed: dict[str, tuple[set[str], RolloutStatus]] = {
        "pause": ({"running"}, "paused"),
        "resume": ({"paused"}, "running"),
        "clear": ({"running", "paused"}, "cleared"),
    }
    sources, target = allowed[action]
    if current not in sources:
        raise RuleError(409, "status", f"cannot {action} a rollout that is {current}")
    return target


def crosses_threshold(
    *,
    failed: int,
    confirmed: int,
    threshold_pct: float,
    acknowledged_failed: int,
    min_finished: int = 1,
    targeted: int | None = None,
) -> bool:
    """Pause by itself? Failed share of finished devices above the threshold, with failures
    newer than the last resume (a resume acknowledges the failures seen so far), judged only
    once `min_finished` devices have finished (all of them when the rollout has fewer), so one
    early failure is not a 100% failure rate."""
    finished = failed + confirmed
    sample = max(1, min_finished if targeted is None else min(min_finished, targeted))
    if finished < sample or failed <= acknowledged_failed:
        return False
    return failed * 100.0 / finished > threshold_pct


@dataclass(frozen=True)
class Pace:
    """A rollout's `max_per_minute` pace: devices sent since `anchor_at` (its start, its last
    resume, or the end of a stall). Anchored, not refilled pass by pass, so the count sent by
    any moment is exact over the whole run whatever the passes' timing."""

    anchor_at: datetime
    sent: float = 0.0


def pace_room(pace: Pace, *, max_per_minute: int | None, now: datetime) -> tuple[float, Pace]:
    """How many devices may go out now (inf: unthrottled), and the pace to count them from.

    One device at the anchor, then `max_per_minute / 60` a second. After a stall longer than
    the burst (dispatcher down, database slow) the pace re-anchors with the burst as credit,
    so a restart never floods the fleet to catch up."""
    if max_per_minute is None:
        return float("inf"), pace
    elapsed = max(0.0, (now - pace.anchor_at).total_seconds())
    credit = 1.0 + elapsed * max_per_minute / 60.0 - pace.sent
    burst = burst_of(max_per_minute)
    if credit > burst:
        return float(math.floor(burst)), Pace(anchor_at=now, sent=1.0 - burst)
    return float(max(0, math.floor(credit))), pace


def burst_of(max_per_minute: int | None) -> float:
    """Most devices one pass may send at once: five seconds' worth (at least one), so a pass
    slower than a second keeps the pace and a stall never turns into a flood."""
    if max_per_minute is None:
        return float("inf")
    return max(1.0, max_per_minute / 12.0)
