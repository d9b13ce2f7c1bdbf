"""Waiting for a command to end: the Prefer header, and who wakes a waiter (no I/O)."""

import asyncio

import pytest

from commands import waiting
from commands.api import MAX_WAIT_S, preferred_wait


@pytest.mark.parametrize(
    ("prefer", "seconds"),
    [
        (None, None),
        ("", None),
        ("wait=10", 10),
        ("respond-async, wait=5", 5),
        ('WAIT="7"', 7),
        ("wait=5; foo=bar", 5),
        (f"wait={MAX_WAIT_S * 10}", MAX_WAIT_S),
        ("wait=0", 0),
        ("wait=soon", None),
        ("wait=-3", None),
        ("wait=1.5", None),
        ("handling=lenient", None),
    ],
)
def test_prefer_wait_is_read_as_rfc_7240_delta_seconds(
    prefer: str | None, seconds: int | None
) -> None:
    assert preferred_wait(prefer) == seconds


async def test_a_commit_wakes_the_waiters_of_the_commands_it_wrote_only() -> None:
    waiters = waiting.Waiters()
    with waiters.watching("c-1") as mine, waiters.watching("c-2") as other:
        waiting.committed(["c-1", "c-3"])
        assert mine.is_set()
        assert not other.is_set()
        # Two waiters of one command: each has its own event, so one clearing its event
        # cannot swallow the other's wake-up.
        with waiters.watching("c-1") as second:
            mine.clear()
            waiting.committed(["c-1"])
            mine.clear()
            assert second.is_set()
    assert waiters.waiting == 0


async def test_another_replicas_commit_wakes_every_waiter() -> None:
    waiters = waiting.Waiters()
    with waiters.watching("c-1") as one, waiters.watching("c-2") as two:
        waiters.changed_elsewhere()
        assert one.is_set()
        assert two.is_set()


async def test_an_unwoken_waiter_reads_again_after_the_recheck_interval() -> None:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await waiting.wait_for_change(event, 60)
    # Returned without a wake-up: the safety net, not the 60 s asked.
    assert not event.is_set()
    assert loop.time() - started < 60


async def test_stopping_answers_every_waiter_and_no_one_waits_after() -> None:
    waiters = waiting.Waiters()
    with waiters.watching("c-1") as one:
        waiters.stop()
        assert one.is_set()
    assert waiters.stopping
