"""Structured JSON logging that carries the request id and the current trace ids."""

import json
import logging
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# Record attributes that are not `extra=` fields (uvicorn adds an ANSI-coloured copy of msg).
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids and any `extra=` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as JSON."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (request_id := request_id_var.get()) is not None:
            entry["request_id"] = request_id
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, *, level: str = "INFO", json_output: bool = True) -> None:
    """Send all logs to stdout, as JSON unless a developer asks for plain text."""
    handler = logging.StreamHandler(sys.stdout)
    if json_output:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries: their INFO lines are noise at fleet scale.
    for noisy in ("aiokafka", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class RateLimitedLogger:
    """Logs at most one line per key and interval, counting what it suppressed.

    Bad input from one misbehaving device must not flood the logs of the whole platform.
    """

    def __init__(self, logger: logging.Logger, *, interval_s: float = 60.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, **fields: Any) -> bool:
        """Log unless `key` was logged within the interval; returns whether it logged."""
        now = time.monotonic()
        last_at, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last_at < self._interval_s:
            self._last[key] = (last_at, suppressed + 1)
            return False
        if len(self._last) > 10_000:  # bound memory under key churn
            self._last.clear()
        self._last[key] = (now, 0)
        self._logger.warning(msg, extra={**fields, "suppressed_since_last": suppressed})
        return True
