"""Wires the commands service together: settings, infrastructure, routes, consumers, timers."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from opentelemetry.sdk.trace import SpanProcessor

from commands import consumers, store, transitions, waiting
from commands.api import router
from commands.handlers import CommandService
from commands.progress import Progress
from commands.settings import CommandsSettings
from commands.tracing import StepTracer
from common.auth import InternalTokenVerifier
from common.db import make_engine
from common.health import health_router
from common.http import install_http_conventions
from common.infra import Infra
from common.outbox import notify_channel
from common.telemetry import FASTAPI_NATIVE_TELEMETRY_OFF, instrument_app

logger = logging.getLogger(__name__)


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
        request_grace=timedelta(seconds=settings.request_grace_s),
    )
    # Autocommit connections for the GET routes and lock-free checks: a read is its one
    # statement, without the BEGIN and ROLLBACK of the write engine's pooled connections.
    reads = make_engine(
        settings.database_url.get_secret_value(),
        pool_size=settings.database_pool_size,
        application_name="commands-reads",
        autocommit=True,
    )
    progress = Progress(
        sessions=infra.sessions,
        reads=reads,
        device_batch_interval_s=settings.device_batch_interval_ms / 1000,
        tracer=StepTracer(infra.tracer_provider),
    )
    stats = consumers.register(infra.broker, service, progress, settings)
    sessions = infra.sessions
    waiters = waiting.Waiters()
    engine = infra.engine
    assert engine is not None  # noqa: S101 - as the sessions

    async def count_active() -> None:
        async with sessions() as session:
            for status, count in (await store.count_active(session)).items():
                transitions.ACTIVE.labels(status).set(count)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            async with infra.running():
                stop = asyncio.Event()
                unchain = waiting.answer_all_on_stop(waiters, asyncio.get_running_loop())
                tasks = [
                    asyncio.create_task(
                        _every(settings.sweep_interval_s, stop, service.sweep), name="sweep"
                    ),
                    asyncio.create_task(
                        _every(settings.metrics_interval_s, stop, count_active), name="metrics"
                    ),
                    asyncio.create_task(
                        waiting.follow_other_replicas(
                            waiters, engine, notify_channel(store.outbox), stop
                        ),
                        name="waiters",
                    ),
                ]
                try:
                    yield
                finally:
                    unchain()
                    waiters.stop()
                    stop.set()
                    await asyncio.wait(tasks, timeout=10)
                    for task in tasks:
                        task.cancel()
        finally:
            await reads.dispose()  # after the consumers, which use it too

    app = FastAPI(
        telemetry=FASTAPI_NATIVE_TELEMETRY_OFF,
        title="AutoGen Fleet commands service",
        version="1",
        lifespan=lifespan,
    )
    app.state.infra = infra
    app.state.service = service
    app.state.reads = reads
    app.state.waiters = waiters
    app.state.consumer_stats = stats
    app.state.verifier = verifier or InternalTokenVerifier(jwks_url=settings.jwks_url)
    install_http_conventions(app)
    app.include_router(health_router(infra.health_checks()))
    app.include_router(router)
    instrument_app(app, infra.tracer_provider)
    return app
