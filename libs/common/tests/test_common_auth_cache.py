"""The verifier's cache of verified internal tokens (common.auth), as the fleet relies on it:
a repeated token is not verified again, but never outlives its expiry or the cache's TTL."""

import asyncio
import time

import jwt
import pytest

from common.auth import AuthError, Principal
from common.testing.auth import TestIssuer

DEALER = Principal(user_id="u-d", role="dealer", dealer_id="d-1")


async def test_a_repeated_token_is_answered_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuer = TestIssuer()
    verifier = issuer.verifier()
    token = issuer.token(DEALER)
    assert await verifier.verify(token) == DEALER
    decoded = 0
    original = jwt.decode

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal decoded
        decoded += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counting)
    assert await verifier.verify(token) == DEALER
    assert decoded == 0
    assert await verifier.verify(issuer.token(DEALER, ttl_s=120)) == DEALER  # another token
    assert decoded == 1


async def test_a_cached_token_is_refused_once_it_expires() -> None:
    issuer = TestIssuer()
    verifier = issuer.verifier()
    verifier._leeway_s = 0
    token = issuer.token(DEALER, ttl_s=1)
    assert await verifier.verify(token) == DEALER
    deadline = time.monotonic() + 10
    while True:  # the token's exp is whole seconds: wait until it has passed
        try:
            await verifier.verify(token)
        except AuthError:
            break
        assert time.monotonic() < deadline, "an expired token stayed valid"
        await asyncio.sleep(0.1)


async def test_the_cache_ttl_bounds_an_entry_and_zero_turns_it_off() -> None:
    issuer = TestIssuer()
    verifier = issuer.verifier()
    token = issuer.token(DEALER)
    await verifier.verify(token)
    verifier._verified[token] = (DEALER, time.time() - 1)  # the cache TTL has passed
    verifier._keys.clear()  # so only a fresh verification can answer, and it cannot
    with pytest.raises(AuthError):
        await verifier.verify(token)
    uncached = issuer.verifier()
    uncached._cache_ttl_s = 0
    await uncached.verify(token)
    assert uncached._verified == {}


async def test_an_invalid_token_is_never_cached() -> None:
    issuer, other = TestIssuer(), TestIssuer()
    verifier = issuer.verifier()
    forged = other.token(DEALER)
    for _ in range(2):
        with pytest.raises(AuthError):
            await verifier.verify(forged)
    assert forged not in verifier._verified
