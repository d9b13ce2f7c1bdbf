"""The span of a status update is exported even when writing the update fails."""

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from commands.tracing import StepTracer

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_failed_update_leaves_its_span_with_the_error() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = StepTracer(provider)

    with pytest.raises(RuntimeError), tracer.step("command ack accepted", "c-1", TRACEPARENT):
        raise RuntimeError("write failed")

    (span,) = exporter.get_finished_spans()
    assert span.name == "command ack accepted"
    assert span.status.status_code is StatusCode.ERROR
    assert span.context.trace_id == int(TRACEPARENT.split("-")[1], 16)
