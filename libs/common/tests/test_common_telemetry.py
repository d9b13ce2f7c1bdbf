"""`common.telemetry`: reading and writing the W3C trace context carried in message headers."""

from collections.abc import Mapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from common.settings import OtelExporter
from common.telemetry import (
    FASTAPI_NATIVE_TELEMETRY_OFF,
    current_trace_headers,
    instrument_app,
    setup_tracing,
    trace_id_of,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": TRACEPARENT},
        {"traceparent": TRACEPARENT.encode()},  # Kafka header values are bytes
        {"content-type": "application/json", "traceparent": TRACEPARENT},
    ],
)
def test_trace_id_of_reads_the_traceparent(headers: Mapping[str, Any]) -> None:
    assert trace_id_of(headers) == TRACE_ID


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": None},
        {"traceparent": 42},
        {"traceparent": ""},
        {"traceparent": f"00-{TRACE_ID}-01"},
        {"traceparent": f"{TRACEPARENT}-extra"},
        {"tracestate": "vendor=1"},
    ],
)
def test_trace_id_of_is_none_without_a_usable_traceparent(headers: Mapping[str, Any]) -> None:
    assert trace_id_of(headers) is None


def test_current_trace_headers_carry_the_active_span() -> None:
    assert trace_id_of(current_trace_headers()) is None
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("request") as span:
        headers = current_trace_headers()
    assert trace_id_of(headers) == format(span.get_span_context().trace_id, "032x")


def test_without_an_exporter_spans_are_not_recorded_but_the_context_still_travels() -> None:
    tracer = setup_tracing("tests", exporter=OtelExporter.NONE).get_tracer("tests")
    with tracer.start_as_current_span("request") as span:
        assert not span.is_recording()
        headers = current_trace_headers()
        with tracer.start_as_current_span("child") as child:
            assert not child.is_recording()
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert trace_id_of(headers) == trace_id
    assert format(child.get_span_context().trace_id, "032x") == trace_id


def test_with_somewhere_to_send_spans_they_are_recorded_and_a_sampled_parent_is_honoured() -> None:
    spans = InMemorySpanExporter()
    exporting = setup_tracing(
        "tests", exporter=OtelExporter.NONE, extra_processors=(SimpleSpanProcessor(spans),)
    ).get_tracer("tests")
    with exporting.start_as_current_span("request"):
        sampled = current_trace_headers()
    assert [s.name for s in spans.get_finished_spans()] == ["request"]

    # A service that exports nothing still records under a caller that samples.
    silent = setup_tracing("tests", exporter=OtelExporter.NONE).get_tracer("tests")
    with silent.start_as_current_span("handler", context=propagate.extract(sampled)) as span:
        assert span.is_recording()


def _app_reporting_its_trace_context(provider: TracerProvider) -> FastAPI:
    app = FastAPI()

    @app.get("/where")
    async def where() -> dict[str, str]:
        return current_trace_headers()

    instrument_app(app, provider)
    return app


async def test_a_service_that_exports_nothing_still_continues_the_callers_trace() -> None:
    app = _app_reporting_its_trace_context(setup_tracing("tests", exporter=OtelExporter.NONE))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        continued = (await http.get("/where", headers={"traceparent": TRACEPARENT})).json()
        fresh = (await http.get("/where")).json()
    assert trace_id_of(continued) == TRACE_ID
    assert trace_id_of(fresh) not in (None, TRACE_ID)  # a trace of its own, still carried on


async def test_a_service_that_exports_records_a_server_span_per_request() -> None:
    spans = InMemorySpanExporter()
    provider = setup_tracing(
        "tests", exporter=OtelExporter.NONE, extra_processors=(SimpleSpanProcessor(spans),)
    )
    app = _app_reporting_its_trace_context(provider)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        answer = (await http.get("/where", headers={"traceparent": TRACEPARENT})).json()
    assert trace_id_of(answer) == TRACE_ID
    server = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert [s.name for s in server] == ["GET /where"]


def test_fastapis_own_telemetry_stays_off_with_a_global_provider() -> None:
    # `setup_tracing` sets the global provider, which turns FastAPI's own layer on by default.
    setup_tracing("tests", exporter=OtelExporter.NONE)
    assert FastAPI()._native_telemetry.enabled()
    assert not FastAPI(telemetry=FASTAPI_NATIVE_TELEMETRY_OFF)._native_telemetry.enabled()
