"""Scope rules and the internal JWT every service trusts."""

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import jwt
import pytest
from fastapi import FastAPI

from common.auth import (
    INTERNAL_TOKEN_HEADER,
    AuthError,
    CurrentPrincipal,
    DeviceOwnership,
    InternalTokenVerifier,
    Principal,
    can_act_for_dealer,
    can_control_device,
    can_read_device,
    sign_internal_token,
)
from common.http import install_http_conventions
from common.testing.auth import TestIssuer

ADMIN = Principal(user_id="u-admin", role="admin")
DEALER_A = Principal(user_id="u-a", role="dealer", dealer_id="A", email="staff@a.example")
DEALER_B = Principal(user_id="u-b", role="dealer", dealer_id="B")
CUSTOMER_A = Principal(user_id="u-c", role="customer", dealer_id="A", email="Owner@Farm.example")
READ_TOKEN_A = DEALER_A.model_copy(update={"access": "read", "token_id": "t-1"})
RESTRICTED_A = DEALER_A.model_copy(update={"device_ids": frozenset({"D-1"}), "token_id": "t-2"})

D1 = DeviceOwnership(device_id="D-1", dealer_id="A", customer_email="owner@farm.example")
D2 = DeviceOwnership(device_id="D-2", dealer_id="A", customer_email="other@farm.example")
D3 = DeviceOwnership(device_id="D-3", dealer_id="B")


@pytest.mark.parametrize(
    ("principal", "device", "read", "control"),
    [
        (ADMIN, D3, True, True),
        (DEALER_A, D1, True, True),
        (DEALER_A, D3, False, False),
        (DEALER_B, D1, False, False),
        (DEALER_B, D3, True, True),
        (CUSTOMER_A, D1, True, True),  # e-mail matched case-insensitively
        (CUSTOMER_A, D2, False, False),
        (CUSTOMER_A, D3, False, False),
        (READ_TOKEN_A, D1, True, False),
        (RESTRICTED_A, D1, True, True),
        (RESTRICTED_A, D2, False, False),
    ],
)
def test_device_scope(
    principal: Principal, device: DeviceOwnership, read: bool, control: bool
) -> None:
    assert can_read_device(principal, device) is read
    assert can_control_device(principal, device) is control


def test_restricted_admin_token_is_still_restricted() -> None:
    restricted_admin = ADMIN.model_copy(update={"device_ids": frozenset({"D-1"})})
    assert can_read_device(restricted_admin, D1)
    assert not can_read_device(restricted_admin, D3)


def test_dealer_management_scope() -> None:
    assert can_act_for_dealer(ADMIN, "B")
    assert can_act_for_dealer(DEALER_A, "A")
    assert not can_act_for_dealer(DEALER_A, "B")
    assert not can_act_for_dealer(CUSTOMER_A, "A")


async def test_signed_principal_round_trips() -> None:
    issuer = TestIssuer()
    verified = await issuer.verifier().verify(issuer.token(RESTRICTED_A))
    assert verified == RESTRICTED_A


async def test_tokens_from_another_key_expired_or_tampered_are_refused() -> None:
    issuer, stranger = TestIssuer(), TestIssuer()
    verifier = issuer.verifier()
    with pytest.raises(AuthError, match="unknown key"):
        await verifier.verify(stranger.token(ADMIN))
    expired = sign_internal_token(DEALER_A, private_key=issuer._key, kid=issuer.kid, ttl_s=-60)
    with pytest.raises(AuthError, match="expired"):
        await verifier.verify(expired)
    header, payload, signature = issuer.token(DEALER_A).split(".")
    forged = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b'"dealer"', b'"admin"')
    ).decode()
    with pytest.raises(AuthError):
        await verifier.verify(f"{header}.{forged}.{signature}")
    with pytest.raises(AuthError, match="malformed"):
        await verifier.verify("not a jwt")


async def test_unsigned_token_is_refused() -> None:
    issuer = TestIssuer()
    unsigned = jwt.encode(
        {"sub": "x", "agf": ADMIN.model_dump(mode="json"), "exp": int(time.time()) + 60},
        key="",
        algorithm="none",
        headers={"kid": issuer.kid},
    )
    with pytest.raises(AuthError):
        await issuer.verifier().verify(unsigned)


async def test_verifier_refetches_jwks_when_keys_rotate() -> None:
    old, new = TestIssuer(), TestIssuer()
    served = {"jwks": old.jwks, "fetches": 0}

    def jwks_endpoint(request: httpx.Request) -> httpx.Response:
        served["fetches"] += 1  # type: ignore[operator]
        return httpx.Response(200, json=served["jwks"])

    transport = httpx.MockTransport(jwks_endpoint)
    verifier = InternalTokenVerifier(jwks_url="http://tokens/.well-known/jwks.json")
    original = httpx.AsyncClient

    class Client(original):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: object) -> None:
            super().__init__(transport=transport)

    httpx.AsyncClient = Client  # type: ignore[misc]
    try:
        assert await verifier.verify(old.token(DEALER_A)) == DEALER_A
        served["jwks"] = {"keys": old.jwks["keys"] + new.jwks["keys"]}
        verifier._fetched_at = float("-inf")  # the refresh interval has passed
        assert await verifier.verify(new.token(DEALER_B)) == DEALER_B
        assert served["fetches"] == 2
        assert await verifier.verify(old.token(DEALER_A)) == DEALER_A  # old kid still valid
    finally:
        httpx.AsyncClient = original  # type: ignore[misc]


@pytest.fixture
def serve_jwks() -> Iterator[Callable[[Callable[[httpx.Request], httpx.Response]], None]]:
    """Route the verifier's JWKS fetches to a handler (async, so fetches can be slow)."""
    original = httpx.AsyncClient

    def install(handler: Callable[[httpx.Request], httpx.Response]) -> None:
        async def slow(request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(0.05)  # a fetch takes a while: requests pile up behind it
            return handler(request)

        class Client(original):  # type: ignore[misc, valid-type]
            def __init__(self, **kwargs: object) -> None:
                super().__init__(transport=httpx.MockTransport(slow))

        httpx.AsyncClient = Client  # type: ignore[misc]

    yield install
    httpx.AsyncClient = original  # type: ignore[misc]


async def test_concurrent_first_requests_all_verify_with_one_fetch(
    serve_jwks: Callable[[Callable[[httpx.Request], httpx.Response]], None],
) -> None:
    # A service just started: the first burst of requests must not get 401 while the one
    # JWKS fetch is in flight.
    issuer = TestIssuer()
    fetches = 0

    def endpoint(request: httpx.Request) -> httpx.Response:
        nonlocal fetches
        fetches += 1
        return httpx.Response(200, json=issuer.jwks)

    serve_jwks(endpoint)
    verifier = InternalTokenVerifier(jwks_url="http://tokens/.well-known/jwks.json")
    results = await asyncio.gather(*(verifier.verify(issuer.token(DEALER_A)) for _ in range(8)))
    assert results == [DEALER_A] * 8
    assert fetches == 1


async def test_a_failed_fetch_is_retried_soon_not_after_the_interval(
    serve_jwks: Callable[[Callable[[httpx.Request], httpx.Response]], None],
) -> None:
    issuer = TestIssuer()
    up = False

    def endpoint(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=issuer.jwks) if up else httpx.Response(503)

    serve_jwks(endpoint)
    verifier = InternalTokenVerifier(jwks_url="http://tokens/.well-known/jwks.json")
    with pytest.raises(httpx.HTTPStatusError):  # tokens down: an error, not a 401
        await verifier.verify(issuer.token(DEALER_A))
    up = True
    verifier._failed_at -= 1.0  # the short retry delay has passed (30 s interval has not)
    assert await verifier.verify(issuer.token(DEALER_A)) == DEALER_A


async def test_route_dependency_answers_401_problem_without_a_valid_token() -> None:
    issuer = TestIssuer()
    app = FastAPI()
    app.state.verifier = issuer.verifier()
    install_http_conventions(app)

    @app.get("/whoami")
    async def whoami(principal: CurrentPrincipal) -> dict[str, str]:
        return {"user": principal.user_id, "role": principal.role}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        missing = await client.get("/whoami")
        bad = await client.get("/whoami", headers={INTERNAL_TOKEN_HEADER: "garbage"})
        # A client-style bearer alone is not an internal token.
        bearer = await client.get("/whoami", headers={"Authorization": "Bearer agk_x"})
        good = await client.get("/whoami", headers=issuer.headers(CUSTOMER_A))
    for response in (missing, bad, bearer):
        assert response.status_code == 401
        assert response.headers["content-type"].startswith("application/problem+json")
    assert good.status_code == 200
    assert good.json() == {"user": "u-c", "role": "customer"}
