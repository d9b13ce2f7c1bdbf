"""The API client over httpx.MockTransport: problem documents, pagination, unreachable API."""

import json

import httpx
import pytest

from autogen_cli.client import ApiError, Client, UnreachableError

BASE = "http://api.test/api/v1"


def client(handler: httpx.MockTransport, token: str | None = "tok") -> Client:  # noqa: S107
    return Client(BASE, token, transport=handler)


def test_problem_json_becomes_an_api_error_with_title_detail_and_fields() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            422,
            headers={"content-type": "application/problem+json"},
            json={
                "type": "about:blank",
                "title": "Invalid request",
                "status": 422,
                "detail": "scope: Input should be 'my_fleet' or 'global'",
                "errors": [{"field": "scope", "message": "Input should be 'my_fleet'"}],
            },
        )

    with pytest.raises(ApiError) as raised:
        client(httpx.MockTransport(handler)).create_rollout({"scope": "everything"})
    assert raised.value.status == 422
    assert raised.value.title == "Invalid request"
    assert raised.value.detail.startswith("scope:")
    assert raised.value.errors == [{"field": "scope", "message": "Input should be 'my_fleet'"}]


def test_an_error_without_a_problem_document_still_reads_clearly() -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(502, text="<html>bad gateway</html>"))
    with pytest.raises(ApiError) as raised:
        client(transport).me()
    assert (raised.value.status, raised.value.title) == (502, "Bad Gateway")
    assert raised.value.detail == "The API answered 502 Bad Gateway."


def test_the_bearer_token_is_sent_and_ids_cannot_change_the_path() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "x"})

    client(httpx.MockTransport(handler)).device("../tokens/AG 1")
    assert seen[0].headers["authorization"] == "Bearer tok"
    assert seen[0].url.raw_path == b"/api/v1/devices/..%2Ftokens%2FAG%201"


def test_lists_follow_cursors_up_to_the_limit_and_say_whether_more_exist() -> None:
    calls: list[dict[str, str]] = []
    pages = {None: (["a", "b"], "c1"), "c1": (["c", "d"], "c2"), "c2": (["e"], None)}

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        calls.append(params)
        ids, cursor = pages[params.get("cursor")]
        limit = int(params["limit"])
        return httpx.Response(
            200, json={"items": [{"id": i} for i in ids[:limit]], "next_cursor": cursor}
        )

    api = client(httpx.MockTransport(handler))
    three = api.devices(q="pump", limit=3)
    assert [d["id"] for d in three.items] == ["a", "b", "c"]
    assert three.more
    assert calls[0] == {"q": "pump", "limit": "3"}  # empty filters are not sent
    assert calls[1] == {"q": "pump", "limit": "1", "cursor": "c1"}

    calls.clear()
    everything = api.devices(limit=None)
    assert [d["id"] for d in everything.items] == ["a", "b", "c", "d", "e"]
    assert not everything.more
    assert all(c["limit"] == "500" for c in calls)


def test_connection_refused_is_an_unreachable_error_naming_the_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(UnreachableError, match=r"Cannot connect to the API at http://api\.test"):
        client(httpx.MockTransport(handler)).me()


def test_a_non_json_answer_says_the_base_url_is_probably_wrong() -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(200, text="<html>console</html>"))
    with pytest.raises(UnreachableError, match=r"did not answer with JSON"):
        client(transport).me()


def test_commands_carry_the_idempotency_key_and_revoking_accepts_204() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(202, json={"id": "cmd-1", "status": "queued"})

    api = client(httpx.MockTransport(handler))
    api.send_command("AG1", "reboot", {}, ttl_s=30, idempotency_key="k-1")
    assert seen[0].headers["idempotency-key"] == "k-1"
    assert json.loads(seen[0].content) == {"action": "reboot", "params": {}, "ttl_s": 30}
    api.revoke_token("t-1")  # a 204 is no error
    assert (seen[1].method, seen[1].url.path) == ("DELETE", "/api/v1/tokens/t-1")
