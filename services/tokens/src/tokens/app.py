"""Wires the tokens service together: settings, infrastructure, routes, consumers."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry.sdk.trace import SpanProcessor

from common.health import health_router
from common.http import install_http_conventions
from common.infra import Infra
from common.telemetry import instrument_app
from tokens import store
from tokens.settings import TokensSettings


def create_app(
    settings: TokensSettings | None = None,
    *,
    span_processors: tuple[SpanProcessor, ...] = (),
) -> FastAPI:
    """The ASGI app; settings come from the environment unless given."""
    settings = settings or TokensSettings()
    infra = Infra.build(settings, outbox=store.outbox, span_processors=span_processors)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with infra.running():
            yield

    app = FastAPI(title="AutoGen Fleet tokens service", version="1", lifespan=lifespan)
    app.state.infra = infra
    install_http_conventions(app)
    app.include_router(health_router(infra.health_checks()))
    instrument_app(app, infra.tracer_provider)
    return app
