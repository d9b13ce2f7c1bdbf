"""Signing keys rotate without downtime; secrets never keep development defaults in production."""

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from common.auth import InternalTokenVerifier, Principal, sign_internal_token
from common.db import make_engine
from common.settings import InsecureSettingsError
from common.testing.plugin import Migrate
from tokens.keys import KeyPolicy, KeyRing
from tokens.settings import TokensSettings

POLICY = KeyPolicy(
    rotation=timedelta(days=30), publish_lead=timedelta(minutes=2), max_token_ttl=timedelta(hours=1)
)


@pytest.mark.stack
async def test_rotation_publishes_first_and_keeps_the_old_key_valid(
    fresh_database: Migrate,
) -> None:
    engine = make_engine(await fresh_database("tokens"), pool_size=1)
    ring = KeyRing("secret")
    try:
        async with engine.begin() as conn:
            assert await ring.ensure(conn, POLICY)
            assert not await ring.ensure(conn, POLICY), "a fresh key was rotated again"
        old = ring.signing_key()
        principal = Principal(user_id="u1", role="admin")
        before = sign_internal_token(principal, private_key=old.private_key, kid=old.kid)

        async with engine.begin() as conn:
            assert await ring.ensure(conn, POLICY, force=True)
        new = ring.keys[0]
        assert new.kid != old.kid
        # Published at once, but the old key signs until every verifier has refreshed.
        assert {k["kid"] for k in ring.jwks()["keys"]} == {old.kid, new.kid}
        assert ring.signing_key().kid == old.kid
        later = datetime.now(UTC) + POLICY.publish_lead + timedelta(seconds=1)
        assert ring.signing_key(later).kid == new.kid

        verifier = InternalTokenVerifier(jwks=ring.jwks())
        assert (await verifier.verify(before)).user_id == "u1"
        after = sign_internal_token(principal, private_key=new.private_key, kid=new.kid)
        assert (await verifier.verify(after)).user_id == "u1"

        # Another replica reads the same keys back (the private halves are stored encrypted).
        other = KeyRing("secret")
        async with engine.connect() as conn:
            await other.load(conn)
        assert other.jwks() == ring.jwks()
        with pytest.raises(Exception):  # noqa: B017, PT011 - Fernet's InvalidToken
            async with engine.connect() as conn:
                await KeyRing("wrong secret").load(conn)
    finally:
        await engine.dispose()


def test_production_refuses_development_secrets() -> None:
    with pytest.raises(InsecureSettingsError) as refused:
        TokensSettings(
            env="production",
            database_url=SecretStr("postgresql+asyncpg://t:x@db/t"),
            redis_url=SecretStr("redis://r:6379/0"),
        )
    message = str(refused.value)
    for name in ("admin_password", "token_hash_key", "key_encryption_secret"):
        assert name in message
