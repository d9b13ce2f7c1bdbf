"""Readers waiting for a command to end: `GET /commands/{id}` with `Prefer: wait=N`.

A client that sent a command usually wants its outcome. Polling costs both sides a request per
poll and finds the outcome up to a poll interval late; a waiting GET is answered as soon as the
command has ended (or after N seconds, with what it is then).

A waiter is woken, and reads the command again, when:
- a transaction of this process that wrote the command commits (`committed`, called by
  `transitions` after the commit: exact, no extra query);
- another process commits status events (every change of a command writes one): their
  `NOTIFY` on the outbox channel reaches the `CommitListener`, and every waiter here reads
  again, since the notification does not say which commands changed;
- a second has passed without either (a lost notification, a listener reconnecting).
"""

import asyncio
import contextlib
import weakref
from collections.abc import Iterable, Iterator

from sqlalchemy.ext.asyncio import AsyncEngine

from common.outbox import CommitListener

# Each process's waiter registries, for `committed()` (transactions do not know the app).
_registries: "weakref.WeakSet[Waiters]" = weakref.WeakSet()

# How often a waiter reads again when nothing woke it: the safety net for a lost notification.
RECHECK_S = 1.0


def committed(command_ids: Iterable[str]) -> None:
    """A transaction of this process that wrote these commands committed."""
    ids = list(command_ids)
    for registry in list(_registries):
        registry.changed(ids)


class Waiters:
    """The wake-up events of the waiters of each command (one per waiter: a waiter clears its
    own before each read, so another waiter's clear cannot swallow its wake-up)."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        _registries.add(self)

    @contextlib.contextmanager
    def watching(self, command_id: str) -> Iterator[asyncio.Event]:
        """This waiter's wake-up event while inside. Clear it *before* each read, then wait on
        it: a commit after the clear sets it, so no change between read and wait is missed."""
        event = asyncio.Event()
        self._events.setdefault(command_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events[command_id]
            events.discard(event)
            if not events:
                del self._events[command_id]

    def changed(self, command_ids: Iterable[str]) -> None:
        """Wake the waiters of these commands."""
        for command_id in command_ids:
            for event in self._events.get(command_id, ()):
                event.set()

    def changed_elsewhere(self) -> None:
        """Another process committed changes to some commands: every waiter reads again."""
        for events in self._events.values():
            for event in events:
                event.set()

    @property
    def waiting(self) -> int:
        """How many commands are waited on now."""
        return len(self._events)


async def wait_for_change(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set or `seconds` (at most RECHECK_S) pass."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), min(seconds, RECHECK_S))


async def follow_other_replicas(
    waiters: Waiters, engine: AsyncEngine, channel: str, stop: asyncio.Event
) -> None:
    """LISTEN for other processes' commits on `channel` (the outbox's) until `stop`, waking
    every waiter on each; reconnects when the connection drops (waiters read again every
    RECHECK_S meanwhile)."""
    listener = CommitListener(engine, channel, waiters.changed_elsewhere)
    try:
        while not stop.is_set():
            await listener.ensure()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RECHECK_S)
    finally:
        await listener.close()
