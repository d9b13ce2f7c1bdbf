"""Wires the commands service together: settings, infrastructure, routes, consumers, timers."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from opentelemetry.sdk.trace import SpanProcessor

from commands import consumers, store
from commands.api import router
from commands.handlers import CommandService
from commands.settings import CommandsSettings
from common.auth import InternalTokenVerifier
from common.health import health_router
from common.http import install_http_conventions
from common.infra import Infra
from common.outbox import OutboxRelay
from common.telemetry import instrument_app

logger = logging.getLogger(__name__)


class RelayKicker:
    """Runs the outbox relay right after an accept committed, instead of at its next poll."""

    def __init__(self, relay: OutboxRelay) -> None:
        self._relay = relay
        self._wake = asyncio.Event()

    def kick(self) -> None:
        """Something was committed to the outbox: publish it soon."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: on each kick, publish what is pending."""
        while not stop.is_set():
            await _first(self._wake.wait(), stop.wait())
            self._wake.clear()
            # The relay's advisory lock may be held by its own poll loop (relay_once then
            # returns 0 without looking): try again shortly, a few times.
            for _ in range(3):
                try:
                    if await self._relay.relay_once():
                        break
                except Exception:
                    logger.exception("outbox kick failed; the relay's poll will publish")
                    break
                await asyncio.sleep(0.002)


async def _first(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _every(
    seconds: float, stop: asyncio.Event, work: Callable[[], Awaitable[object]]
) -> None:
    while not stop.is_set():
        try:
            await work()
        except Exception:
            logger.exception("periodic work failed; trying again")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)


def create_app(
    settings: CommandsSettings | None = None,
    *,
    span_processors: tuple[SpanProcessor, ...] = (),
    verifier: InternalTokenVerifier | None = None,
) -> FastAPI:
    """The ASGI app; settings come from the environment unless given."""
    settings = settings or CommandsSettings()
    infra = Infra.build(settings, outbox=store.outbox, span_processors=span_processors)
    assert infra.sessions is not None  # noqa: S101 - DatabaseSettings always give sessions
    service = CommandService(
        sessions=infra.sessions,
        run_state_window=timedelta(seconds=settings.run_state_window_s),
    )
    stats = consumers.register(infra.broker, service, settings)
    kicker = RelayKicker(infra.relay) if infra.relay is not None and settings.relay_kick else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with infra.running():
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(
                    _every(settings.sweep_interval_s, stop, service.sweep), name="sweep"
                )
            ]
            if kicker is not None:
                tasks.append(asyncio.create_task(kicker.run(stop), name="relay-kick"))
            try:
                yield
            finally:
                stop.set()
                await asyncio.wait(tasks, timeout=10)
                for task in tasks:
                    task.cancel()

    app = FastAPI(title="AutoGen Fleet commands service", version="1", lifespan=lifespan)
    app.state.infra = infra
    app.state.service = service
    app.state.consumer_stats = stats
    app.state.kick_relay = kicker.kick if kicker is not None else (lambda: None)
    app.state.verifier = verifier or InternalTokenVerifier(jwks_url=settings.jwks_url)
    install_http_conventions(app)
    app.include_router(health_router(infra.health_checks()))
    app.include_router(router)
    instrument_app(app, infra.tracer_provider)
    return app
