"""Wires the firmware service together: settings, infrastructure, routes, consumers, dispatcher."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry.sdk.trace import SpanProcessor

from common.auth import InternalTokenVerifier
from common.health import health_router
from common.http import install_http_conventions, problem_response
from common.infra import Infra
from common.telemetry import FASTAPI_NATIVE_TELEMETRY_OFF, instrument_app
from firmware import consumers, metrics, store
from firmware.api import build_router
from firmware.dispatcher import Dispatcher
from firmware.domain import Policy, RuleError
from firmware.progress import ProgressHandlers
from firmware.settings import FirmwareSettings


def policy_of(settings: FirmwareSettings) -> Policy:
    """Deadlines and retries from the settings."""
    return Policy(
        deadline_wifi=timedelta(seconds=settings.deadline_wifi_s),
        deadline_gsm=timedelta(seconds=settings.deadline_gsm_s),
        deadline_gps=timedelta(seconds=settings.deadline_gps_s),
        max_retries=settings.ota_max_retries,
        backoff=timedelta(seconds=settings.retry_backoff_s),
        backoff_max=timedelta(seconds=settings.retry_backoff_max_s),
    )


def create_app(
    settings: FirmwareSettings | None = None,
    *,
    span_processors: tuple[SpanProcessor, ...] = (),
    verifier: InternalTokenVerifier | None = None,
) -> FastAPI:
    """The ASGI app; settings come from the environment unless given (tests pass a verifier)."""
    settings = settings or FirmwareSettings()
    infra = Infra.build(settings, outbox=store.outbox, span_processors=span_processors)
    assert infra.engine is not None  # noqa: S101 - DatabaseSettings always build an engine
    engine = infra.engine
    policy = policy_of(settings)
    dispatcher = Dispatcher(
        engine,
        policy,
        action=settings.ota_action,
        interval_s=settings.dispatch_interval_s,
        max_per_pass=settings.dispatch_max_per_pass,
    )
    handlers = ProgressHandlers(engine, policy, consumer_prefix=settings.kafka_topic_prefix)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with infra.running():
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(dispatcher.run(stop), name="rollout-dispatcher"),
                asyncio.create_task(
                    metrics.run(engine, stop, settings.metrics_interval_s), name="rollout-metrics"
                ),
            ]
            try:
                yield
            finally:
                stop.set()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)

    app = FastAPI(
        telemetry=FASTAPI_NATIVE_TELEMETRY_OFF,
        title="AutoGen Fleet firmware service",
        version="1",
        lifespan=lifespan,
    )
    app.state.infra = infra
    app.state.verifier = verifier or InternalTokenVerifier(jwks_url=settings.jwks_url)
    app.state.dispatcher = dispatcher
    app.state.consumers = consumers.register(infra.broker, settings, engine, handlers)
    install_http_conventions(app)

    @app.exception_handler(RuleError)
    async def _rule(_: Request, exc: RuleError) -> JSONResponse:
        titles = {409: "Conflict", 422: "Invalid request"}
        return problem_response(
            exc.status,
            titles.get(exc.status, "Error"),
            str(exc),
            errors=[{"field": exc.field, "message": exc.message}],
        )

    app.include_router(health_router(infra.health_checks()))
    app.include_router(build_router(engine))
    instrument_app(app, infra.tracer_provider)
    return app
