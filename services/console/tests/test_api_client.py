"""The API client: problem+json errors become messages a user can read; 401 ends the session."""

import httpx
import pytest

from console.api_client import ApiClient, ApiError, SessionExpiredError, http_client


def client_answering(handler: httpx.MockTransport) -> ApiClient:
    return ApiClient(http_client("http://api.test/api/v1", 5, handler), "tok")


async def test_problem_detail_is_what_the_user_reads() -> None:
    transport = httpx.MockTransport(
        lambda _: httpx.Response(
            409,
            json={"type": "about:blank", "title": "Conflict", "status": 409,
                  "detail": "the release has no validation in your scope"},
            headers={"Content-Type": "application/problem+json"},
        )
    )  # fmt: skip
    with pytest.raises(ApiError) as caught:
        await client_answering(transport).post("rollouts", {"release_id": "r1"})
    assert caught.value.status == 409
    assert caught.value.detail == "the release has no validation in your scope"
    assert not isinstance(caught.value, SessionExpiredError)


async def test_401_means_the_session_is_over() -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(401, json={"detail": "expired"}))
    with pytest.raises(SessionExpiredError):
        await client_answering(transport).get("me")


async def test_an_error_without_a_problem_document_still_says_something() -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(502, text="<html>bad gateway</html>"))
    with pytest.raises(ApiError) as caught:
        await client_answering(transport).get("devices")
    assert caught.value.status == 502
    assert "502" in caught.value.detail


async def test_unreachable_api_is_a_503_not_a_crash() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ApiError) as caught:
        await client_answering(httpx.MockTransport(refuse)).get("devices")
    assert caught.value.status == 503
    assert "cannot be reached" in caught.value.detail


async def test_a_slow_api_is_a_504() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(ApiError) as caught:
        await client_answering(httpx.MockTransport(slow)).get("devices")
    assert caught.value.status == 504


async def test_bearer_token_and_clean_query_are_sent() -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"items": [{"id": "a"}], "next_cursor": "c2"})

    page = await client_answering(httpx.MockTransport(record)).page(
        "devices", q="alice", model="", cursor=None
    )
    assert page.items == [{"id": "a"}]
    assert page.next_cursor == "c2"
    assert seen[0].headers["Authorization"] == "Bearer tok"
    assert seen[0].url.path == "/api/v1/devices"
    assert dict(seen[0].url.params) == {"q": "alice"}


async def test_a_list_that_is_not_a_list_is_reported() -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json={"rows": []}))
    with pytest.raises(ApiError) as caught:
        await client_answering(transport).page("devices")
    assert caught.value.status == 502


async def test_login_returns_the_token_and_its_lifetime() -> None:
    transport = httpx.MockTransport(
        lambda _: httpx.Response(200, json={"access_token": "s3", "token_type": "bearer",
                                            "expires_in": 600})
    )  # fmt: skip
    assert await ApiClient(http_client("http://api.test/api/v1", 5, transport), None).login(
        "a@b.c", "pw"
    ) == ("s3", 600)
