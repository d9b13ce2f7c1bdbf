"""Wires the fleet service together: settings, infrastructure, routes, consumers."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry.sdk.trace import SpanProcessor
from sqlalchemy.ext.asyncio import AsyncEngine

from common.auth import InternalTokenVerifier
from common.db import make_engine, make_sessionmaker
from common.health import health_router
from common.http import install_http_conventions, problem_response
from common.infra import Infra
from common.telemetry import FASTAPI_NATIVE_TELEMETRY_OFF, instrument_app
from fleet import consumers, metrics, store
from fleet.api import build_router
from fleet.domain import AttentionRules, InvalidInputError
from fleet.gateway_client import CredentialsIssuer, HttpGateway
from fleet.reads import Reads
from fleet.settings import FleetSettings


def attention_rules(settings: FleetSettings) -> AttentionRules:
    """The `attention` thresholds from the settings."""
    return AttentionRules(
        offline_wifi=timedelta(seconds=settings.offline_attention_wifi_s),
        offline_gsm=timedelta(seconds=settings.offline_attention_gsm_s),
        offline_gps=timedelta(seconds=settings.offline_attention_gps_s),
        low_fuel_pct=settings.low_fuel_pct,
        low_battery_v=settings.low_battery_v,
    )


def make_read_engine(settings: FleetSettings) -> AsyncEngine:
    """The engine of the GET routes: autocommit connections, so a read is its one statement.

    Each of them is one statement (one snapshot), so it needs no transaction; the shared
    engine's pool would wrap the read in BEGIN/ROLLBACK and its pre-ping in another
    BEGIN/;/ROLLBACK (SQLAlchemy's asyncpg dialect does that outside autocommit): six round
    trips per search. No pre-ping either: one round trip per search, the query. A dead pooled
    connection fails the read's statement instead, and `fleet.reads` runs it once more.
    """
    return make_engine(
        settings.database_url.get_secret_value(),
        pool_size=settings.database_pool_size,
        application_name="fleet-reads",
        autocommit=True,
        pre_ping=False,
    )


def create_app(
    settings: FleetSettings | None = None,
    *,
    span_processors: tuple[SpanProcessor, ...] = (),
    verifier: InternalTokenVerifier | None = None,
    issuer: CredentialsIssuer | None = None,
) -> FastAPI:
    """The ASGI app; settings come from the environment unless given.

    Tests pass a verifier for their own signing key and a fake credentials issuer.
    """
    settings = settings or FleetSettings()
    infra = Infra.build(settings, outbox=store.outbox, span_processors=span_processors)
    assert infra.sessions is not None  # noqa: S101 - DatabaseSettings always build sessions
    # Not given SQL spans: OpenTelemetry's SQLAlchemy instrumentor is a singleton that takes
    # one engine (the write engine); reads are traced by their request's server span.
    read_engine = make_read_engine(settings)
    reads = Reads(read_engine)
    counts = make_sessionmaker(read_engine)  # the gauge's periodic count
    gateway = HttpGateway(settings.gateway_url, timeout_s=settings.gateway_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with infra.running():
            stop = asyncio.Event()
            counting = asyncio.create_task(
                metrics.keep_counting(counts, settings, stop), name="fleet-state-metric"
            )
            try:
                yield
            finally:
                stop.set()
                await counting
                await gateway.aclose()
                await read_engine.dispose()

    app = FastAPI(
        telemetry=FASTAPI_NATIVE_TELEMETRY_OFF,
        title="AutoGen Fleet registry",
        version="1",
        lifespan=lifespan,
    )
    app.state.infra = infra
    app.state.verifier = verifier or InternalTokenVerifier(jwks_url=settings.jwks_url)
    app.state.consumers = consumers.register(infra.broker, settings, infra.sessions)
    install_http_conventions(app)

    @app.exception_handler(InvalidInputError)
    async def _invalid(_: Request, exc: InvalidInputError) -> JSONResponse:
        return problem_response(
            422, "Invalid request", str(exc), errors=[{"field": exc.field, "message": exc.message}]
        )

    app.include_router(health_router(infra.health_checks()))
    app.include_router(
        build_router(
            sessions=infra.sessions,
            reads=reads,
            rules=attention_rules(settings),
            issuer=issuer or gateway,
            map_limit=settings.map_max_features,
        )
    )
    instrument_app(app, infra.tracer_provider)
    return app
