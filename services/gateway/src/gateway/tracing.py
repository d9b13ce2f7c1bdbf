"""A command's trace across the MQTT hop: the publish span, and the device's reports after it.

MQTT v5 could carry a trace context in user properties, but the device protocol is the firmware
contract and devices would not echo it back. So the gateway remembers, per (device, command id),
the span context of the command's publish, in a bounded LRU with a TTL; a report (`up/ack`,
`up/ota`) for a remembered command is produced to Kafka with that context as its `traceparent`,
and the commands service's consumer continues the command's trace. Telemetry and presence never
look here: they pay nothing for it.
"""

import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TracerProvider,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

MAX_ENTRIES = 100_000
# Long enough for a slow OTA (download, install, reboot) to report under its command's trace.
TTL_S = 24 * 3600.0
Headers = list[tuple[str, bytes]]
_W3C = TraceContextTextMapPropagator()


class CommandTraces:
    """Bounded map (device id, command id) → span context of the command's MQTT publish."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        max_entries: int = MAX_ENTRIES,
        ttl_s: float = TTL_S,
    ) -> None:
        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("gateway.mqtt")
        self._max = max_entries
        self._ttl_s = ttl_s
        self._spans: OrderedDict[tuple[str, str], tuple[SpanContext, float]] = OrderedDict()

    def use(self, tracer_provider: TracerProvider) -> None:
        """Make spans with this provider (tests run several apps, each with its own, in one
        process; a service process has one, the global one, which is the default)."""
        self._tracer = tracer_provider.get_tracer("gateway.mqtt")

    def __len__(self) -> int:
        return len(self._spans)

    @contextmanager
    def publishing(self, device_id: str, command_id: str, topic: str) -> Iterator[Span]:
        """A producer span around the command's publish, child of the current (dispatch) span.

        Remembered before the publish: the device may answer before the broker's PUBACK is read.
        A failed publish is retried under a new span, which replaces it.
        """
        with self._tracer.start_as_current_span(
            f"{topic} publish",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "mqtt",
                "messaging.destination.name": topic,
                "messaging.operation": "publish",
                "command.id": command_id,
                "device.id": device_id,
            },
        ) as span:
            self._remember((device_id, command_id), span.get_span_context())
            yield span

    @contextmanager
    def consuming(self, name: str, traceparent: str | None) -> Iterator[None]:
        """Handle one record of a batch in its own trace: FastStream's span of a batch continues
        the first record's trace only, so a record of another trace gets a consumer span of its
        own (child of its context, linked to the batch's span); the others run as they are."""
        origin = _W3C.extract({"traceparent": traceparent}) if traceparent else None
        record = trace.get_current_span(origin).get_span_context() if origin else None
        current = trace.get_current_span().get_span_context()
        if record is None or not record.is_valid or record.trace_id == current.trace_id:
            yield
            return
        links = [Link(current)] if current.is_valid else []
        with self._tracer.start_as_current_span(
            name, context=origin, kind=SpanKind.CONSUMER, links=links
        ):
            yield

    def _remember(self, key: tuple[str, str], context: SpanContext) -> None:
        if not context.is_valid:
            return
        self._spans[key] = (context, time.monotonic() + self._ttl_s)
        self._spans.move_to_end(key)
        while len(self._spans) > self._max:
            self._spans.popitem(last=False)

    def headers_for(self, device_id: str, command_id: str) -> Headers | None:
        """Kafka headers continuing the command's trace, or None for an unknown command."""
        key = (device_id, command_id)
        entry = self._spans.get(key)
        if entry is None:
            return None
        context, expires = entry
        if time.monotonic() > expires:
            del self._spans[key]
            return None
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(NonRecordingSpan(context)))
        return [(name, value.encode()) for name, value in carrier.items()]
