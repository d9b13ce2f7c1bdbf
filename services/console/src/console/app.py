"""Wires the console service together: settings, routes and telemetry."""

from fastapi import FastAPI
from opentelemetry.sdk.trace import SpanProcessor

from common.health import health_router
from common.http import install_http_conventions
from common.telemetry import instrument_app, setup_tracing
from console.settings import ConsoleSettings


def create_app(
    settings: ConsoleSettings | None = None,
    *,
    span_processors: tuple[SpanProcessor, ...] = (),
) -> FastAPI:
    """The ASGI app; settings come from the environment unless given."""
    settings = settings or ConsoleSettings()
    provider = setup_tracing(
        "console",
        exporter=settings.otel_exporter,
        endpoint=settings.otel_endpoint,
        extra_processors=span_processors,
    )
    app = FastAPI(title="AutoGen Fleet dealer console", version="1")
    install_http_conventions(app)
    # The console keeps no state and calls only the public API: it is ready when it runs.
    app.include_router(health_router({}))
    instrument_app(app, provider)
    return app
