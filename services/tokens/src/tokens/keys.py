"""The service's ES256 signing keys: generated, stored encrypted, published, rotated.

A new key is published in the JWKS `publish_lead` before it signs anything, so every
verifier's periodic refresh already knows it; the old key keeps signing until then and stays
published until the last token it signed has expired. Rotation therefore needs no downtime.
"""

import base64
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.auth import INTERNAL_ALGORITHM, INTERNAL_ISSUER
from tokens.store import signing_keys

logger = logging.getLogger(__name__)

SESSION_AUDIENCE = "autogen-session"
_ROTATION_LOCK = 0x746F6B6B  # "tokk": one replica rotates at a time


@dataclass(frozen=True)
class SigningKey:
    """One key pair and its life."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey
    active_from: datetime
    retire_after: datetime
    expires_at: datetime

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK."""
        jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": INTERNAL_ALGORITHM})
        return jwk


@dataclass(frozen=True)
class KeyPolicy:
    """How long keys sign and stay published."""

    rotation: timedelta
    publish_lead: timedelta
    max_token_ttl: timedelta


class KeyRing:
    """The keys a process signs with and publishes, reloaded from the database."""

    def __init__(self, encryption_secret: str) -> None:
        digest = hashlib.sha256(encryption_secret.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))
        self._keys: list[SigningKey] = []

    @property
    def keys(self) -> list[SigningKey]:
        """Every published key, newest first."""
        return list(self._keys)

    def signing_key(self, now: datetime | None = None) -> SigningKey:
        """The key to sign with now: the newest one already active and not retired."""
        now = now or datetime.now(UTC)
        for key in self._keys:
            if key.active_from <= now < key.expires_at:
                return key
        raise LookupError("no signing key is active; run key rotation")

    def jwks(self, now: datetime | None = None) -> dict[str, Any]:
        """The public JWK set: every key not yet expired, upcoming ones included."""
        now = now or datetime.now(UTC)
        return {"keys": [key.public_jwk() for key in self._keys if key.expires_at > now]}

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        """The public key of `kid`, if it is published."""
        for key in self._keys:
            if key.kid == kid:
                return key.private_key.public_key()
        return None

    async def load(self, conn: AsyncConnection) -> None:
        """Read the published keys."""
        rows = await conn.execute(
            select(signing_keys)
            .where(signing_keys.c.expires_at > func.now())
            .order_by(signing_keys.c.active_from.desc())
        )
        self._keys = [
            SigningKey(
                kid=row.kid,
                private_key=self._decrypt(row.private_key_enc),
                active_from=row.active_from,
                retire_after=row.retire_after,
                expires_at=row.expires_at,
            )
            for row in rows
        ]

    async def ensure(
        self, conn: AsyncConnection, policy: KeyPolicy, *, force: bool = False
    ) -> bool:
        """Create the next key when the current one nears retirement; True if one was made.

        Call in a transaction; replicas serialise on an advisory lock.
        """
        await conn.execute(select(func.pg_advisory_xact_lock(_ROTATION_LOCK)))
        await self.load(conn)
        now = datetime.now(UTC)
        newest = self._keys[0] if self._keys else None
        if newest is not None and not force and newest.retire_after - policy.publish_lead > now:
            return False
        # The very first key signs at once; later ones wait until verifiers have fetched them.
        active_from = now if newest is None else now + policy.publish_lead
        retire_after = active_from + policy.rotation
        expires_at = retire_after + policy.max_token_ttl + timedelta(minutes=5)
        private_key = ec.generate_private_key(ec.SECP256R1())
        kid = f"k-{now:%Y%m%d}-{uuid.uuid4().hex[:8]}"
        await conn.execute(
            signing_keys.insert().values(
                kid=kid,
                private_key_enc=self._encrypt(private_key),
                active_from=active_from,
                retire_after=retire_after,
                expires_at=expires_at,
            )
        )
        if newest is not None:
            # The old key must outlive every token it signs until the new one takes over.
            await conn.execute(
                signing_keys.update()
                .where(signing_keys.c.kid == newest.kid)
                .values(
                    retire_after=func.least(signing_keys.c.retire_after, active_from),
                    expires_at=func.greatest(
                        signing_keys.c.expires_at,
                        active_from + policy.max_token_ttl + timedelta(minutes=5),
                    ),
                )
            )
        logger.info(
            "signing key created", extra={"kid": kid, "active_from": active_from.isoformat()}
        )
        await self.load(conn)
        return True

    def sign_session(self, *, user_id: str, ttl_s: int) -> str:
        """A session token (login): ES256, audience `autogen-session`."""
        key = self.signing_key()
        now = int(datetime.now(UTC).timestamp())
        claims = {
            "sub": user_id,
            "iss": INTERNAL_ISSUER,
            "aud": SESSION_AUDIENCE,
            "iat": now,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims, key.private_key, algorithm=INTERNAL_ALGORITHM, headers={"kid": key.kid}
        )

    def read_session(self, token: str) -> dict[str, Any]:
        """Verified claims of a session token; raises `jwt.PyJWTError` when not valid."""
        kid = jwt.get_unverified_header(token).get("kid")
        public = self.public_key(kid) if isinstance(kid, str) else None
        if public is None:
            raise jwt.InvalidKeyError("unknown signing key")
        claims: dict[str, Any] = jwt.decode(
            token,
            key=public,
            algorithms=[INTERNAL_ALGORITHM],
            audience=SESSION_AUDIENCE,
            issuer=INTERNAL_ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
        )
        return claims

    def _encrypt(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return self._fernet.encrypt(pem)

    def _decrypt(self, blob: bytes) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self._fernet.decrypt(blob), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("stored signing key is not an EC key")
        return key
