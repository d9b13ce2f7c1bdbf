"""Verification caches: Redis (shared by replicas) in front of the database, and a tiny
in-process cache in front of Redis.

A revocation overwrites the Redis entry with a "revoked" marker, and positive entries are only
ever written with SET NX, so a verify that read the database just before the revocation cannot
put the token back. Each process re-checks Redis after `local_ttl_s` (< 1 s), which bounds
how long a revoked token keeps working anywhere.
"""

import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from common.auth import Principal

REVOKED_MARKER_TTL_S = 600
UNKNOWN_TTL_S = 5
_LOCAL_MAX = 50_000


@dataclass(frozen=True)
class Verdict:
    """What a bearer is worth: a principal until `expires_at`, or a refusal."""

    principal: Principal | None
    expires_at: float  # epoch seconds; the bearer's own expiry
    refusal: str | None = None
    revoked_token_id: str | None = None

    def to_json(self) -> str:
        """Redis form."""
        body: dict[str, Any] = {"exp": self.expires_at}
        if self.principal is not None:
            body["p"] = self.principal.model_dump(mode="json", exclude_none=True)
        if self.refusal is not None:
            body["refusal"] = self.refusal
        if self.revoked_token_id is not None:
            body["revoked"] = self.revoked_token_id
        return json.dumps(body)

    @classmethod
    def from_json(cls, raw: str) -> "Verdict":
        """Read the Redis form back."""
        body = json.loads(raw)
        principal = Principal.model_validate(body["p"]) if "p" in body else None
        return cls(
            principal=principal,
            expires_at=float(body["exp"]),
            refusal=body.get("refusal"),
            revoked_token_id=body.get("revoked"),
        )


@dataclass
class LocalEntry:
    checked_at: float
    verdict: Verdict
    internal_token: str | None = None
    internal_expires_at: float = 0.0


class VerifyCache:
    """Both cache layers; keys are the token hash (API tokens) or `u:<user id>` (sessions)."""

    def __init__(self, redis: "Redis", *, ttl_s: int, local_ttl_s: float) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._local_ttl_s = local_ttl_s
        self._local: dict[str, LocalEntry] = {}

    @staticmethod
    def _key(key: str) -> str:
        return f"tokens:verify:{key}"

    def local(self, key: str) -> LocalEntry | None:
        """The in-process entry when it is fresh enough to answer without Redis."""
        entry = self._local.get(key)
        if entry is None or time.monotonic() - entry.checked_at >= self._local_ttl_s:
            return None
        return entry

    def remember(self, key: str, verdict: Verdict) -> LocalEntry:
        """Keep `verdict` in this process (keeping a still-valid signed internal token)."""
        if len(self._local) >= _LOCAL_MAX:
            self._local.clear()
        old = self._local.get(key)
        entry = LocalEntry(checked_at=time.monotonic(), verdict=verdict)
        if old is not None and old.verdict.principal == verdict.principal:
            entry.internal_token = old.internal_token
            entry.internal_expires_at = old.internal_expires_at
        self._local[key] = entry
        return entry

    async def get(self, key: str) -> Verdict | None:
        """The shared verdict, if cached."""
        raw = await self._redis.get(self._key(key))
        return Verdict.from_json(str(raw)) if raw is not None else None

    async def put(self, key: str, verdict: Verdict) -> None:
        """Share a verdict read from the database (never over a revocation marker)."""
        if verdict.principal is not None:
            remaining = verdict.expires_at - time.time()  # may be infinite (accounts)
            ttl = self._ttl_s if remaining > self._ttl_s else int(remaining)
        else:
            ttl = UNKNOWN_TTL_S if verdict.revoked_token_id is None else REVOKED_MARKER_TTL_S
        if ttl > 0:
            await self._redis.set(self._key(key), verdict.to_json(), ex=ttl, nx=True)

    async def mark_revoked(self, *, secret_hash: str, token_id: str) -> None:
        """From now on every process answers 'revoked' for this token."""
        verdict = Verdict(
            principal=None, expires_at=0, refusal="token revoked", revoked_token_id=token_id
        )
        await self._redis.set(self._key(secret_hash), verdict.to_json(), ex=REVOKED_MARKER_TTL_S)
        self._local.pop(secret_hash, None)

    async def forget(self, key: str) -> None:
        """Drop a shared entry (e.g. an account changed)."""
        await self._redis.delete(self._key(key))
        self._local.pop(key, None)
