"""Readers waiting for a command to end: `GET /commands/{id}` with `Prefer: wait=N`.

A client that sent a command usually wants its outcome. Polling costs both sides a request per
poll and finds the outcome up to a poll interval late; a waiting GET is answered as soon as the
command has ended (or after N seconds, with what it is then).

A waiter is woken, and reads the command again, when:
- a transaction of this process that ended the command commits (`committed`, called by
  `transitions` after the commit: exact, no extra query; a step on the way, like `acked`,
  wakes no one, since the reader would only find the command still on its way);
- another process commits status events (every change of a command writes one): their
  `NOTIFY` on the outbox channel reaches the `CommitListener`, and every waiter here reads
  again, since the notification does not say which commands changed;
- a second has passed without either (a lost notification, a listener reconnecting).

When the process is told to stop (SIGTERM, SIGINT), every waiter answers at once with what the
command is then (`answer_all_on_stop`): the server waits for open requests before it stops, and
a waiter left to its N seconds would hold a rolling deploy up (or be cut off by the server's
graceful-shutdown limit).
"""

import asyncio
import contextlib
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from common.outbox import CommitListener

# Each process's waiter registries, for `committed()` (transactions do not know the app).
_registries: "weakref.WeakSet[Waiters]" = weakref.WeakSet()

# How often a waiter reads again when nothing woke it: the safety net for a lost notification.
RECHECK_S = 1.0


def committed(command_ids: Iterable[str]) -> None:
    """A transaction of this process that ended these commands committed."""
    ids = list(command_ids)
    for registry in list(_registries):
        registry.changed(ids)


class Waiters:
    """The wake-up events of the waiters of each command (one per waiter: a waiter clears its
    own before each read, so another waiter's clear cannot swallow its wake-up)."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        self.stopping = False  # the process is stopping: no one waits any more
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

    def stop(self) -> None:
        """Answer every waiter now, and let none wait from here on."""
        self.stopping = True
        self.changed_elsewhere()

    @property
    def waiting(self) -> int:
        """How many commands are waited on now."""
        return len(self._events)


async def wait_for_change(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set or `seconds` (at most RECHECK_S) pass."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), min(seconds, RECHECK_S))


def answer_all_on_stop(waiters: Waiters, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Chain a handler in front of SIGTERM's and SIGINT's (uvicorn's, which start its
    shutdown) that stops `waiters` first; returns what puts the previous handlers back. Off
    the main thread (an app run by a test client's thread) signals cannot be handled: nothing
    is chained."""
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of the loop's thread: hand over.
        loop.call_soon_threadsafe(waiters.stop)
        before = previous[signal.Signals(signum)]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.default_int_handler(signum, frame)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handle)

    def restore() -> None:
        for signum, before in previous.items():
            if signal.getsignal(signum) is handle:
                signal.signal(signum, before)

    return restore


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
