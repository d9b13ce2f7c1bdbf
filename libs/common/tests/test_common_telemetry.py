"""`common.telemetry`: reading and writing the W3C trace context carried in message headers."""

from collections.abc import Mapping
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from common.telemetry import current_trace_headers, trace_id_of

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
