"""`common.logging`: one JSON object per line, with ids, and rate-limited warnings."""

import io
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

import common.logging as common_logging
from common.logging import JsonFormatter, RateLimitedLogger, request_id_var


@dataclass
class Captured:
    logger: logging.Logger
    stream: io.StringIO

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def captured() -> Iterator[Captured]:
    """A private logger whose lines go through `JsonFormatter` into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("fleet"))
    logger = logging.getLogger(f"tests.common.logging.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield Captured(logger, stream)
    logger.removeHandler(handler)


def test_one_json_object_per_line_with_the_basics(captured: Captured) -> None:
    captured.logger.warning("device %s went quiet", "AG-1")
    [line] = captured.lines()
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["msg"] == "device AG-1 went quiet"
    assert entry["service"] == "fleet"
    assert entry["logger"] == captured.logger.name
    assert entry["ts"].endswith("+00:00")
    # Outside a request and a span there are no ids at all.
    assert "request_id" not in entry
    assert "trace_id" not in entry
    assert "span_id" not in entry


def test_a_multiline_message_stays_on_one_line(captured: Captured) -> None:
    captured.logger.info("first\nsecond")
    [line] = captured.lines()
    assert json.loads(line)["msg"] == "first\nsecond"


def test_request_id_is_included_while_set(captured: Captured) -> None:
    token = request_id_var.set("req-12345678")
    try:
        captured.logger.info("inside")
    finally:
        request_id_var.reset(token)
    captured.logger.info("after")
    inside, after = captured.entries()
    assert inside["request_id"] == "req-12345678"
    assert "request_id" not in after


def test_trace_and_span_ids_inside_an_active_span(captured: Captured) -> None:
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("outer") as span:
        captured.logger.info("traced")
    context = span.get_span_context()
    [entry] = captured.entries()
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")
    assert len(entry["trace_id"]) == 32
    assert len(entry["span_id"]) == 16


def test_extra_fields_are_top_level_keys(captured: Captured) -> None:
    device_id = uuid.uuid4()
    captured.logger.info(
        "handled", extra={"device_id": device_id, "count": 3, "nested": {"a": [1, 2]}}
    )
    [entry] = captured.entries()
    assert entry["device_id"] == str(device_id)  # unknown types become strings, not errors
    assert entry["count"] == 3
    assert entry["nested"] == {"a": [1, 2]}
    # LogRecord internals are not dumped.
    for internal in ("args", "levelno", "pathname", "lineno", "exc_info", "msecs"):
        assert internal not in entry


def test_exception_text_is_included(captured: Captured) -> None:
    try:
        raise KeyError("missing-thing")
    except KeyError:
        captured.logger.exception("lookup failed")
    [line] = captured.lines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert entry["msg"] == "lookup failed"
    assert "Traceback" in entry["exc"]
    assert "KeyError: 'missing-thing'" in entry["exc"]


class FakeClock:
    """Stands in for the `time` module inside `common.logging` only."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(common_logging, "time", fake)
    return fake


def test_rate_limited_logger_logs_once_per_interval_and_counts_the_rest(
    captured: Captured, clock: FakeClock
) -> None:
    limited = RateLimitedLogger(captured.logger, interval_s=10.0)

    assert limited.warning("AG-1", "bad payload", device_id="AG-1") is True
    for _ in range(4):
        clock.now += 2.0  # 8 s after the first line: still inside the interval
        assert limited.warning("AG-1", "bad payload", device_id="AG-1") is False
    first, *rest = captured.entries()
    assert rest == []
    assert first["msg"] == "bad payload"
    assert first["level"] == "warning"
    assert first["device_id"] == "AG-1"
    assert first["suppressed_since_last"] == 0

    clock.now += 2.0  # 10 s after the first line: the interval is over
    assert limited.warning("AG-1", "bad payload", device_id="AG-1") is True
    _, second = captured.entries()
    assert second["suppressed_since_last"] == 4

    # The count starts again after each line that was written.
    clock.now += 1.0
    assert limited.warning("AG-1", "bad payload") is False
    clock.now += 10.0
    assert limited.warning("AG-1", "bad payload") is True
    assert captured.entries()[-1]["suppressed_since_last"] == 1


def test_rate_limited_logger_keys_are_independent(captured: Captured, clock: FakeClock) -> None:
    limited = RateLimitedLogger(captured.logger, interval_s=60.0)
    assert limited.warning("AG-1", "bad payload") is True
    assert limited.warning("AG-2", "bad payload") is True
    assert limited.warning("AG-1", "bad payload") is False
    assert limited.warning("AG-2", "bad payload") is False
    assert len(captured.lines()) == 2
