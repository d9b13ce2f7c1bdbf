"""HTTP conventions shared by every service: problem+json errors and request ids."""

import logging
import re
import time
import uuid
from typing import Any

import httpx
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.logging import request_id_var
from common.metrics import record_request

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 5
# A dependency that is down: the request may succeed later, so 503 + Retry-After, never 500.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    # The pool had no connection to give within its timeout (the database is slow or away).
    PoolTimeoutError,
    # An outgoing HTTP call (another service, the JWKS) could not connect or timed out.
    httpx.TransportError,
)
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._-]{8,128}$")


class ProblemError(Exception):
    """Raise from a handler to answer with a problem document."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.extra = extra


def problem_response(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def install_http_conventions(app: FastAPI) -> None:
    """Problem+json for every error, an `X-Request-ID` on every request and response, metrics."""

    @app.exception_handler(ProblemError)
    async def _problem(_: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = _TITLES.get(exc.status_code, "Error")
        response = problem_response(exc.status_code, title, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"] if p != "body"), "message": err["msg"]}
            for err in exc.errors()
        ]
        first = errors[0] if errors else {"field": "", "message": "invalid request"}
        detail = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        return problem_response(422, "Invalid request", detail, errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Only errors raised outside RequestContextMiddleware get here.
        logger.error("unhandled error", exc_info=exc)
        return _internal_error()

    app.add_middleware(RequestContextMiddleware)


class RequestContextMiddleware:
    """Request id in, request id out, metrics, and last-resort problem answers.

    Pure ASGI rather than `BaseHTTPMiddleware`: it runs on every request of every service, and
    the latter costs a task and a stream copy per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if response_started:
                raise
            if is_unavailable(exc):
                logger.warning("dependency unavailable", extra={"error": repr(exc)[:300]})
                response = _unavailable()
            elif _is_unstorable_value(exc):
                logger.warning("value refused by the database", extra={"error": repr(exc)[:300]})
                response = problem_response(
                    422,
                    "Invalid request",
                    "a value cannot be stored (e.g. a NUL character or an out-of-range number)",
                )
            else:
                logger.error("unhandled error", exc_info=exc)
                response = _internal_error()
            await response(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            record_request(scope, status, time.perf_counter() - started)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means a dependency is away (503, retry later) rather than a bug (500)."""
    if isinstance(exc, UNAVAILABLE_ERRORS):
        return True
    # PostgreSQL connection exceptions (08...) and "shutting down / starting up" (57P...), raised
    # raw by asyncpg while the pool connects or wrapped by SQLAlchemy.
    for candidate in (exc, getattr(exc, "orig", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str) and state.startswith(("08", "57P")):
            return True
    # A connection that died under a query (PostgreSQL restarted): the pool drops it.
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    # Kafka says "try again" (no leader, broker unreachable, request timed out).
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


def _is_unstorable_value(exc: BaseException) -> bool:
    """PostgreSQL refused a value itself (SQLSTATE class 22, data exception: a NUL character in
    text, a number out of range): the client's input, so 422, not a 500."""
    if not isinstance(exc, DBAPIError):
        return False
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return isinstance(state, str) and state.startswith("22")


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def _unavailable() -> JSONResponse:
    response = problem_response(
        503,
        "Service unavailable",
        "a dependency of this service is not answering; retry shortly",
    )
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _internal_error() -> JSONResponse:
    return problem_response(500, "Internal error", "the server could not complete the request")


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    422: "Invalid request",
    429: "Too many requests",
    503: "Service unavailable",
}
