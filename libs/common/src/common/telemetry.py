"""OpenTelemetry set-up: one tracer provider per process, exporter chosen by settings.

Kafka spans come from FastStream's `KafkaTelemetryMiddleware` (see `common.kafka`), which
carries the W3C trace context in Kafka headers; the outbox stores the same headers so a
relayed event continues the trace of the request that caused it.
"""

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
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
    """Server spans for every HTTP request (health probes excluded)."""
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=provider, excluded_urls="healthz,readyz,metrics"
    )


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
