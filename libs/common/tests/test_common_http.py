"""`common.http`: every error is problem+json, every request has an `X-Request-ID`."""

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from common.http import PROBLEM_JSON, REQUEST_ID_HEADER, ProblemError, install_http_conventions
from common.logging import request_id_var

SECRET = "password=hunter2 at db.internal"


class Widget(BaseModel):
    name: str = Field(min_length=1)
    count: int


def make_app() -> FastAPI:
    app = FastAPI()
    install_http_conventions(app)

    @app.get("/conflict")
    async def conflict() -> None:
        raise ProblemError(409, "Conflict", "widget w-1 exists", widget_id="w-1")

    @app.get("/forbidden")
    async def forbidden() -> None:
        raise HTTPException(403, "not your device")

    @app.post("/widgets")
    async def create(widget: Widget) -> dict[str, str]:
        return {"name": widget.name}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(SECRET)

    @app.get("/whoami")
    async def whoami() -> dict[str, str | None]:
        return {"request_id": request_id_var.get()}

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # The app answers 500 itself; the transport must not re-raise the error into the test.
    transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        yield http


def assert_problem(response: httpx.Response, status: int, title: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, object] = response.json()
    assert body["type"] == "about:blank"
    assert body["title"] == title
    assert body["status"] == status
    assert isinstance(body["detail"], str)
    return body


async def test_problem_error_answers_problem_json(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/conflict"), 409, "Conflict")
    assert body["detail"] == "widget w-1 exists"
    assert body["widget_id"] == "w-1"


async def test_unknown_route_is_a_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/no/such/route"), 404, "Not found")


async def test_wrong_method_is_a_problem_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/conflict")
    assert_problem(response, 405, "Method not allowed")
    assert response.headers["allow"] == "GET"


async def test_http_exception_keeps_its_detail(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/forbidden"), 403, "Forbidden")
    assert body["detail"] == "not your device"


async def test_body_validation_error_names_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/widgets", json={"name": "pump", "count": "many"})
    body = assert_problem(response, 422, "Invalid request")
    assert isinstance(body["detail"], str)
    assert body["detail"].startswith("count: ")
    assert body["errors"] == [{"field": "count", "message": body["detail"].removeprefix("count: ")}]


async def test_body_validation_lists_every_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/widgets", json={"name": ""})
    body = assert_problem(response, 422, "Invalid request")
    errors = body["errors"]
    assert isinstance(errors, list)
    assert {error["field"] for error in errors} == {"name", "count"}


async def test_unparseable_body_is_a_problem(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/widgets", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "Invalid request")


async def test_unexpected_error_is_500_without_leaking_the_message(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="common.http"):
        response = await client.get("/boom")
    body = assert_problem(response, 500, "Internal error")
    assert "hunter2" not in response.text
    assert body["detail"] == "the server could not complete the request"
    # The operator still gets the whole story in the log.
    [record] = [r for r in caplog.records if r.name == "common.http"]
    assert record.exc_info is not None
    assert SECRET in str(record.exc_info[1])


async def test_well_formed_request_id_is_echoed_and_used(client: httpx.AsyncClient) -> None:
    request_id = "edge-4f2a.9b_c-0001"
    response = await client.get("/whoami", headers={REQUEST_ID_HEADER: request_id})
    assert response.headers[REQUEST_ID_HEADER] == request_id
    assert response.json() == {"request_id": request_id}


@pytest.mark.parametrize(
    "incoming",
    [
        "has spaces in it",
        "x" * 129,
        "short",
        "semi;colon-12345",
        "<script>alert(1)</script>",
    ],
)
async def test_malformed_request_id_is_replaced(client: httpx.AsyncClient, incoming: str) -> None:
    response = await client.get("/whoami", headers={REQUEST_ID_HEADER: incoming})
    replaced = response.headers[REQUEST_ID_HEADER]
    assert replaced != incoming
    assert len(replaced) == 32
    int(replaced, 16)  # a fresh uuid4 hex
    assert response.json() == {"request_id": replaced}


async def test_request_id_is_fresh_per_request_and_not_left_behind(
    client: httpx.AsyncClient,
) -> None:
    first = (await client.get("/whoami")).headers[REQUEST_ID_HEADER]
    second = (await client.get("/whoami")).headers[REQUEST_ID_HEADER]
    assert first != second
    assert request_id_var.get() is None


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/whoami", 200),
        ("GET", "/conflict", 409),
        ("GET", "/no/such/route", 404),
        ("POST", "/widgets", 422),
    ],
)
async def test_request_id_is_on_every_answer(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    response = await client.request(method, path, json={})
    assert response.status_code == status
    assert len(response.headers[REQUEST_ID_HEADER]) == 32


async def test_request_id_is_on_a_500_answer(client: httpx.AsyncClient) -> None:
    response = await client.get("/boom", headers={REQUEST_ID_HEADER: "req-500-000001"})
    assert response.status_code == 500
    assert response.headers.get(REQUEST_ID_HEADER) == "req-500-000001"


async def test_unhandled_error_log_carries_the_request_id(client: httpx.AsyncClient) -> None:
    seen: list[str | None] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(request_id_var.get())

    spy = Spy()
    logging.getLogger("common.http").addHandler(spy)
    try:
        await client.get("/boom", headers={REQUEST_ID_HEADER: "req-500-000002"})
    finally:
        logging.getLogger("common.http").removeHandler(spy)
    assert seen == ["req-500-000002"]


async def test_a_dependency_that_is_down_answers_503_with_retry_after() -> None:
    from fastapi import FastAPI
    from sqlalchemy.exc import OperationalError

    from common.http import install_http_conventions

    app = FastAPI()
    install_http_conventions(app)

    @app.get("/db")
    async def db() -> None:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    @app.get("/cache")
    async def cache() -> None:
        import redis.exceptions

        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:56379")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        for path in ("/db", "/cache"):
            response = await client.get(path)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"
            assert response.headers["content-type"].startswith("application/problem+json")
            assert "56379" not in response.text  # no internals leak
            assert response.headers["x-request-id"]
