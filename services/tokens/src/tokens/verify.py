"""`/auth/verify`: turns a bearer (session or API token) into a signed internal JWT.

It is on the path of every API request, so it is served by a small ASGI endpoint in front of
the FastAPI app (no routing, no per-request middleware) and a cached verify touches neither
the database nor, within `local_cache_ttl_s`, Redis. `last_used_at` is collected in memory and
written by a background task, at most once a minute per token.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

import jwt

from common.auth import INTERNAL_TOKEN_HEADER, sign_internal_token
from common.http import PROBLEM_JSON
from tokens import domain, handlers, store
from tokens.cache import LocalEntry, Verdict
from tokens.handlers import Context

logger = logging.getLogger(__name__)

VERIFY_PATH = "/auth/verify"
LAST_USED_EVERY_S = 60.0
_SESSIONS_MAX = 50_000

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RefusedError(Exception):
    """The bearer is not valid: 401 with this reason."""


class LastUsed:
    """Token uses noted in memory, flushed to the database off the request path."""

    def __init__(self) -> None:
        self._pending: dict[str, datetime] = {}
        self._noted_at: dict[str, float] = {}

    def note(self, token_id: str) -> None:
        """Remember a use (cheap; at most one note a minute per token per process)."""
        now = time.monotonic()
        if now - self._noted_at.get(token_id, -LAST_USED_EVERY_S) < LAST_USED_EVERY_S:
            return
        self._noted_at[token_id] = now
        self._pending[token_id] = datetime.now(UTC)

    async def flush(self, ctx: Context) -> int:
        """Write pending uses; returns how many tokens were noted."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        async with ctx.sessions() as session, session.begin():
            await store.touch_last_used(session, pending)
        return len(pending)


class Verifier:
    """Bearer → principal → internal JWT, through the caches."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.last_used = LastUsed()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: dict[str, tuple[str, float]] = {}

    async def verify(self, authorization: str | None, client_ip: str | None) -> str:
        """The internal JWT for this `Authorization` header; raises `RefusedError`."""
        entry = await self._entry(_bearer(authorization))
        verdict = entry.verdict
        if verdict.revoked_token_id is not None:
            self._background(
                handlers.record_revoked_use(
                    self.ctx, token_id=verdict.revoked_token_id, client_ip=client_ip
                )
            )
        if verdict.principal is None:
            raise RefusedError(verdict.refusal or "unknown credentials")
        now = time.time()
        if now >= verdict.expires_at:
            raise RefusedError("token expired")
        if verdict.principal.token_id is not None:
            self.last_used.note(verdict.principal.token_id)
        ttl = self.ctx.settings.internal_token_ttl_s
        # Reuse the signed token while more than half its life is left (signing is the cost).
        if entry.internal_token is None or entry.internal_expires_at - now < ttl / 2:
            signing = self.ctx.keys.signing_key()
            entry.internal_token = sign_internal_token(
                verdict.principal, private_key=signing.private_key, kid=signing.kid, ttl_s=ttl
            )
            entry.internal_expires_at = now + ttl
        return entry.internal_token

    async def _entry(self, bearer: str) -> LocalEntry:
        """The cached verdict for a bearer, through the in-process, Redis and database layers."""
        session_exp = None
        if bearer.startswith(domain.TOKEN_PREFIX):
            if not domain.looks_like_api_token(bearer):
                raise RefusedError("malformed API token")
            key = domain.hash_token(bearer, self.ctx.hash_key)
        else:
            user_id, session_exp = self._session_user(bearer)
            if time.time() >= session_exp:
                raise RefusedError("session expired")
            key = f"u:{user_id}"
        entry = self.ctx.cache.local(key)
        if entry is not None:
            return entry
        verdict = await self.ctx.cache.get(key)
        if verdict is None:
            if session_exp is None:
                verdict = await self._api_token_from_db(key)
            else:
                verdict = await self._account_from_db(key.removeprefix("u:"))
            await self.ctx.cache.put(key, verdict)
        return self.ctx.cache.remember(key, verdict)

    def _session_user(self, bearer: str) -> tuple[str, float]:
        # Session tokens cannot be revoked, so a checked signature is remembered until expiry.
        known = self._sessions.get(bearer)
        if known is not None:
            return known
        try:
            claims = self.ctx.keys.read_session(bearer)
        except jwt.ExpiredSignatureError as exc:
            raise RefusedError("session expired") from exc
        except (jwt.PyJWTError, ValueError) as exc:
            raise RefusedError("invalid bearer token") from exc
        if len(self._sessions) >= _SESSIONS_MAX:
            self._sessions.clear()
        known = (str(claims["sub"]), float(claims["exp"]))
        self._sessions[bearer] = known
        return known

    async def _api_token_from_db(self, secret_hash: str) -> Verdict:
        async with self.ctx.sessions() as session:
            row = await store.token_with_account(session, secret_hash)
        if row is None or not _same(row.secret_hash, secret_hash):
            return Verdict(principal=None, expires_at=0, refusal="unknown token")
        if row.revoked_at is not None:
            return Verdict(
                principal=None, expires_at=0, refusal="token revoked", revoked_token_id=row.id
            )
        account = domain.Account(
            id=row.user_id, email=row.email, role=row.role, dealer_id=row.dealer_id
        )
        grant = domain.TokenGrant(
            token_id=row.id,
            account=account,
            access=row.access,
            device_ids=frozenset(row.device_ids) if row.device_ids is not None else None,
        )
        return Verdict(principal=grant.principal(), expires_at=row.expires_at.timestamp())

    async def _account_from_db(self, user_id: str) -> Verdict:
        async with self.ctx.sessions() as session:
            row = await store.get_user(session, user_id)
        if row is None:
            return Verdict(principal=None, expires_at=0, refusal="unknown account")
        # The session's own expiry is checked separately; the account does not expire.
        return Verdict(principal=store.account_of(row).principal(), expires_at=float("inf"))

    def _background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                logger.exception("background audit failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run_last_used(self, stop: asyncio.Event) -> None:
        """Flush `last_used_at` every few seconds until `stop` is set (and once more then)."""
        interval = self.ctx.settings.last_used_flush_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            try:
                await self.last_used.flush(self.ctx)
            except Exception:
                logger.exception("could not record last use of tokens; will retry")

    async def drain(self) -> None:
        """Wait for background audits (shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise RefusedError("missing bearer token")
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or " " in value or len(value) > 4096:
        raise RefusedError("malformed Authorization header; expected 'Bearer <token>'")
    return value


class VerifyEndpoint:
    """ASGI wrapper: answers `GET /auth/verify` itself, passes everything else on."""

    def __init__(self, app: ASGIApp, get_verifier: Callable[[], Verifier]) -> None:
        self.app = app
        self._get_verifier = get_verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http" or scope["path"] != VERIFY_PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, _problem(405, "Method not allowed", "use GET"), [])
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        client = scope.get("client")
        try:
            token = await self._get_verifier().verify(authorization, client[0] if client else None)
        except RefusedError as exc:
            body = _problem(401, "Unauthorized", str(exc))
            extra = [(b"www-authenticate", b"Bearer"), (b"x-auth-error", str(exc).encode())]
            await _respond(send, 401, body, extra)
            return
        except Exception:
            logger.exception("verify failed")
            await _respond(send, 503, _problem(503, "Service unavailable", "try again"), [])
            return
        await _respond(send, 200, b"", [(INTERNAL_TOKEN_HEADER.lower().encode(), token.encode())])


def _problem(status: int, title: str, detail: str) -> bytes:
    return json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail}
    ).encode()


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    base = [(b"content-length", str(len(body)).encode())]
    if body:
        base.append((b"content-type", PROBLEM_JSON.encode()))
    await send({"type": "http.response.start", "status": status, "headers": base + headers})
    await send({"type": "http.response.body", "body": body})
