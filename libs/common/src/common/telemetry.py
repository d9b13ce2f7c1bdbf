"""OpenTelemetry set-up: one tracer provider per process, exporter chosen by settings.

Kafka spans come from FastStream's `KafkaTelemetryMiddleware` (see `common.kafka`), which
carries the W3C trace context in Kafka headers; the outbox stores the same headers so a
relayed event continues the trace of the request that caused it.
"""

import weakref
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Receive, Scope, Send

from common.settings import OtelExporter


def setup_tracing(
    service: str,
    *,
    exporter: OtelExporter,
    endpoint: str | None = None,
    extra_processors: tuple[SpanProcessor, ...] = (),
) -> TracerProvider:
    """Build the process's tracer provider and make it the global one.

    With nowhere to send spans (exporter `none`, no extra processors) new traces are not
    sampled: every span is then a non-recording one that still carries a valid context, so
    `traceparent` still travels through HTTP, Kafka, the outbox and the commands' rows, but no
    span is built, timed and given attributes per request, message and SQL statement for
    nobody (on the commands service that was a large part of a command's CPU). A sampled
    parent (a caller that does export) is still honoured.
    """
    exporting = exporter is not OtelExporter.NONE or bool(extra_processors)
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ALWAYS_ON if exporting else ParentBased(ALWAYS_OFF),
    )
    if exporting:
        _EXPORTING.add(provider)
    if exporter is OtelExporter.CONSOLE:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter is OtelExporter.OTLP:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        otlp = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(otlp))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    _set_global_provider(provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    return provider


def _set_global_provider(provider: TracerProvider) -> None:
    # The OTel API refuses a second global provider; tests build several apps in one process,
    # so the first one stays global and each app uses its own provider explicitly.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(provider)


def instrument_app(app: FastAPI, provider: TracerProvider) -> None:
    """Server spans for every HTTP request (health probes excluded).

    A provider that exports nothing gets `_ServerContext` instead of OpenTelemetry's FastAPI
    middleware, which even for spans nobody records matched the route a second time and
    collected request attributes: about a sixth of a fleet search's CPU.
    """
    if provider in _EXPORTING:
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=provider, excluded_urls=",".join(_UNTRACED)
        )
    else:
        app.add_middleware(_ServerContext, tracer=provider.get_tracer(__name__))


# For `FastAPI(telemetry=...)`: FastAPI's own OpenTelemetry layer (0.165) turns itself on once a
# global tracer provider exists, and would trace each request a second time beside
# `instrument_app`: its spans, attributes and context handling were about a quarter of a fleet
# search's time in a profile, for spans nobody records (and duplicate server spans when
# exporting).
FASTAPI_NATIVE_TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}

# Providers `setup_tracing` gave somewhere to send spans.
_EXPORTING: "weakref.WeakSet[TracerProvider]" = weakref.WeakSet()
_UNTRACED = ("healthz", "readyz", "metrics")
_CONTEXT_HEADERS = (b"traceparent", b"tracestate")


class _ServerContext:
    """The trace context of each request without the cost of a span's details: the caller's
    `traceparent` is continued (a new trace id otherwise) in a server span that is recorded
    only under a sampled caller, so logs, the outbox and Kafka headers carry the trace on."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self._app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.rstrip("/").rsplit("/", 1)[-1] in _UNTRACED:
            await self._app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in _CONTEXT_HEADERS
        }
        parent = propagate.extract(carrier) if carrier else None
        with self._tracer.start_as_current_span(
            f"HTTP {scope.get('method', '')}", context=parent, kind=trace.SpanKind.SERVER
        ):
            await self._app(scope, receive, send)


def instrument_engine(engine: AsyncEngine, provider: TracerProvider) -> None:
    """Client spans for SQL statements."""
    SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine, tracer_provider=provider)


def current_trace_headers() -> dict[str, str]:
    """The W3C trace context of the current span, as message headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def trace_id_of(headers: Mapping[str, Any]) -> str | None:
    """The trace id in a `traceparent` header, if any."""
    value = headers.get("traceparent")
    if isinstance(value, bytes):
        value = value.decode()
    if not isinstance(value, str):
        return None
    parts = value.split("-")
    return parts[1] if len(parts) == 4 else None
