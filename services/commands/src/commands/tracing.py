"""Spans for a command's status updates, in the trace its accept started.

FastStream's span of a batch starts a new trace (linking its records'). So a status update gets
its own span: a consumer span, child of the record's trace context when the record carries one
(the gateway puts the command's MQTT publish context on a device's report), otherwise a child of
the trace context stored with the command at accept; either way linked to the batch's span. Its
`command.status.v1` event goes through the outbox, which stores the current context, so the
event continues the same trace.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TracerProvider,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_W3C = TraceContextTextMapPropagator()


def stored_context(traceparent: str | None) -> SpanContext | None:
    """The span context in a stored `traceparent`, if it is a valid one."""
    if not traceparent:
        return None
    found = trace.get_current_span(_W3C.extract({"traceparent": traceparent})).get_span_context()
    return found if found.is_valid else None


class StepTracer:
    """Makes the span of one status update of one command."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("commands")

    @contextmanager
    def step(
        self,
        name: str,
        command_id: str,
        traceparent: str | None,
        record_traceparent: str | None = None,
    ) -> Iterator[None]:
        """A span around writing one update (and its event) of `command_id`: under the record's
        trace context if given and valid, else under the command's stored one. Ended even if
        the block raises, with the error recorded on it."""
        span: Span | None = None
        try:
            # Ended after the block's context closed, which records an error on it.
            with self.open_step(name, command_id, traceparent, record_traceparent) as span:
                yield
        finally:
            if span is not None:
                span.end()

    @contextmanager
    def open_step(
        self,
        name: str,
        command_id: str,
        traceparent: str | None,
        record_traceparent: str | None = None,
    ) -> Iterator[Span]:
        """As `step`, current inside the block but left open after it: the caller ends it once
        the update is written, or drops it if the update was not (a span is exported when it
        ends, so a dropped one never is: an attempt that wrote nothing leaves no span)."""
        current = trace.get_current_span().get_span_context()
        origin = stored_context(record_traceparent) or stored_context(traceparent)
        parent = None  # no stored context (a command from before 0004): the current one
        links: list[Link] = []
        if origin is not None:
            parent = trace.set_span_in_context(NonRecordingSpan(origin))
            if current.is_valid and current.trace_id != origin.trace_id:
                links.append(Link(current))
        span = self._tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={"command.id": command_id},
        )
        with trace.use_span(span, end_on_exit=False):
            yield span
