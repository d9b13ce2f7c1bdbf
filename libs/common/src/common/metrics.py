"""Prometheus metrics every service exposes on `/metrics`.

Generic ones live here (HTTP traffic, Kafka consumption, dead letters, the outbox); a service adds
its own domain metrics (commands by status, connected devices, ...) with `prometheus_client`
next to its code. One process serves one service, so the default registry is the service's.
"""

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

HTTP_REQUESTS = Counter(
    "autogen_http_requests_total",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "autogen_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
KAFKA_CONSUMED = Counter(
    "autogen_kafka_records_total",
    "Kafka records a consumer finished with, by outcome (handled, dead_lettered, retried).",
    ["consumer", "topic", "outcome"],
)
OUTBOX_PUBLISHED = Counter(
    "autogen_outbox_published_total", "Events the outbox relay published to Kafka."
)
OUTBOX_PENDING = Gauge(
    "autogen_outbox_pending", "Events committed to the outbox and not yet published."
)
CONSUMER_LAG = Gauge(
    "autogen_kafka_consumer_lag",
    "Records behind the end of the partition, per consumer group and topic (summed).",
    ["consumer", "topic"],
)

_UNMATCHED = "(unmatched)"
_NOT_MEASURED = frozenset({"/metrics", "/healthz", "/readyz"})


def record_request(scope: Mapping[str, Any], status: int, seconds: float) -> None:
    """Count and time a request by its route template (never the raw path: ids explode)."""
    template = getattr(scope.get("route"), "path", _UNMATCHED)
    if template in _NOT_MEASURED:
        return
    method = str(scope.get("method", "-"))
    HTTP_REQUESTS.labels(method, template, str(status)).inc()
    HTTP_LATENCY.labels(method, template).observe(seconds)


def metrics_router(refresh: Callable[[], Awaitable[None]] | None = None) -> APIRouter:
    """`GET /metrics` in Prometheus' text format; `refresh` updates gauges read on scrape."""
    router = APIRouter(tags=["operations"])

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        if refresh is not None:
            await refresh()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router
