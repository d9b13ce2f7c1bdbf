"""Use cases of the tokens service: one function each, one transaction each.

Events go to the outbox in the same transaction as the state; audit records too.
"""

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.auth import Principal
from common.contracts import fleet
from common.contracts import tokens as contract
from common.events import Envelope, new_event
from common.http import ProblemError
from common.idempotency import first_delivery
from common.outbox import add_event
from tokens import domain, store
from tokens.cache import VerifyCache
from tokens.domain import ScopeError, UserRole
from tokens.keys import KeyRing
from tokens.pagination import finish, page
from tokens.settings import TokensSettings

logger = logging.getLogger(__name__)

SOURCE = "tokens"
DEVICE_CONSUMER = "tokens-device-projection"
_hasher = PasswordHasher()
# Unknown emails cost an argon2 verification too, so timing does not reveal accounts.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


@dataclass
class Context:
    """What use cases need, wired once in `app.py`."""

    settings: TokensSettings
    sessions: async_sessionmaker[AsyncSession]
    redis: "Redis"
    keys: KeyRing
    cache: VerifyCache

    @property
    def hash_key(self) -> bytes:
        """Key of the token hashes."""
        return self.settings.token_hash_key.get_secret_value().encode()


class ThrottledError(Exception):
    """Too many failed logins; retry after `retry_after_s` seconds (HTTP 429)."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


def new_id() -> str:
    """A new object id."""
    return str(uuid.uuid4())


async def hash_password(password: str) -> str:
    """argon2id, off the event loop."""
    return await asyncio.to_thread(_hasher.hash, password)


async def _password_ok(stored: str, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


# ------------------------------------------------------------------ login


async def login(ctx: Context, *, email: str, password: str, client_ip: str | None) -> str:
    """A session token for valid credentials; 401 otherwise, 429 when throttled."""
    settings = ctx.settings
    email_key = f"tokens:login:email:{email.strip().lower()}"
    ip_key = f"tokens:login:ip:{client_ip or 'unknown'}"
    email_fails, ip_fails = await ctx.redis.mget(email_key, ip_key)
    if (
        int(email_fails or 0) >= settings.login_max_failures_per_email
        or int(ip_fails or 0) >= settings.login_max_failures_per_ip
    ):
        raise ThrottledError(max(await ctx.redis.ttl(email_key), await ctx.redis.ttl(ip_key), 1))
    async with ctx.sessions() as session:
        row = await store.get_user_by_email(session, email)
    ok = await _password_ok(row.password_hash if row else _DUMMY_HASH, password)
    if row is None or not ok:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for key in (email_key, ip_key):
                pipe.incr(key)
                pipe.expire(key, settings.login_window_s, nx=True)
            await pipe.execute()
        async with ctx.sessions() as session, session.begin():
            await store.add_audit(
                session,
                action="login.failed",
                target_type="user",
                target_id=row.id if row else "-",
                client_ip=client_ip,
                detail={"email": email.strip().lower()[:320]},
            )
        raise ProblemError(401, "Unauthorized", "wrong email or password")
    await ctx.redis.delete(email_key)
    return ctx.keys.sign_session(user_id=row.id, ttl_s=settings.session_ttl_s)


# ------------------------------------------------------------------ dealers and users


def dealer_view(row: Any) -> dict[str, Any]:
    """The public form of a dealer."""
    return {"id": row.id, "name": row.name}


def user_view(row: Any) -> dict[str, Any]:
    """The public form of a user (never the password hash)."""
    return {
        "id": row.id,
        "email": row.email,
        "name": row.name,
        "role": row.role,
        "dealer_id": row.dealer_id,
    }


async def create_dealer(ctx: Context, caller: Principal, *, name: str) -> dict[str, Any]:
    """Admins create dealers; 409 for a taken name."""
    if not caller.is_admin or caller.via_api_token:
        raise ProblemError(403, "Forbidden", "only signed-in platform admins create dealers")
    try:
        async with ctx.sessions() as session, session.begin():
            dealer_id = new_id()
            await session.execute(store.dealers.insert().values(id=dealer_id, name=name))
            await store.add_audit(
                session,
                action="dealer.created",
                target_type="dealer",
                target_id=dealer_id,
                actor_user_id=caller.user_id,
                dealer_id=dealer_id,
                detail={"name": name},
            )
    except IntegrityError as exc:
        raise ProblemError(409, "Conflict", f"a dealer named {name!r} exists") from exc
    return {"id": dealer_id, "name": name}


async def list_dealers(
    ctx: Context, caller: Principal, *, cursor: str | None, limit: int
) -> dict[str, Any]:
    """Admins list dealers."""
    if not caller.is_admin:
        raise ProblemError(403, "Forbidden", "only platform admins list dealers")
    d = store.dealers
    query = page(select(d), created=d.c.created_at, row_id=d.c.id, cursor=cursor, limit=limit,
                 newest_first=False)  # fmt: skip
    async with ctx.sessions() as session:
        rows, next_cursor = finish(list(await session.execute(query)), limit)
    return {"items": [dealer_view(r) for r in rows], "next_cursor": next_cursor}


async def create_user(
    ctx: Context,
    caller: Principal,
    *,
    email: str,
    password: str,
    name: str,
    role: UserRole,
    dealer_id: str | None,
) -> dict[str, Any]:
    """Create an account in the caller's scope; 409 for a taken email."""
    if role != "admin" and dealer_id is None and caller.role == "dealer":
        dealer_id = caller.dealer_id
    try:
        domain.check_account_creation(caller, role=role, dealer_id=dealer_id)
    except ScopeError as exc:
        raise ProblemError(exc.status, "Forbidden", exc.detail) from exc
    if role == "admin" and dealer_id is not None:
        raise ProblemError(422, "Invalid request", "dealer_id: must be null for an admin")
    if role != "admin" and dealer_id is None:
        raise ProblemError(422, "Invalid request", "dealer_id: required for this role")
    password_hash = await hash_password(password)
    user_id = new_id()
    async with ctx.sessions() as session, session.begin():
        if dealer_id is not None and await store.get_dealer(session, dealer_id) is None:
            raise ProblemError(422, "Invalid request", "dealer_id: no such dealer")
        if await store.get_user_by_email(session, email) is not None:
            raise ProblemError(409, "Conflict", "an account with this email exists")
        await session.execute(
            store.users.insert().values(
                id=user_id, email=email.strip(), name=name, role=role,
                dealer_id=dealer_id, password_hash=password_hash,
            )
        )  # fmt: skip
        await store.add_audit(
            session,
            action="user.created",
            target_type="user",
            target_id=user_id,
            actor_user_id=caller.user_id,
            dealer_id=dealer_id,
            detail={"email": email.strip(), "role": role},
        )
    return {"id": user_id, "email": email.strip(), "name": name, "role": role,
            "dealer_id": dealer_id}  # fmt: skip


async def list_users(
    ctx: Context, caller: Principal, *, q: str | None, cursor: str | None, limit: int
) -> dict[str, Any]:
    """Accounts in the caller's scope, optionally matching `q` (email or name)."""
    u = store.users
    query = select(u)
    if caller.is_admin:
        pass
    elif caller.role == "dealer":
        query = query.where(u.c.dealer_id == caller.dealer_id)
    else:
        query = query.where(u.c.id == caller.user_id)
    if q:
        pattern = f"%{q.strip().lower()}%"
        query = query.where(
            (func.lower(u.c.email).like(pattern)) | (func.lower(u.c.name).like(pattern))
        )
    query = page(query, created=u.c.created_at, row_id=u.c.id, cursor=cursor, limit=limit,
                 newest_first=False)  # fmt: skip
    async with ctx.sessions() as session:
        rows, next_cursor = finish(list(await session.execute(query)), limit)
    return {"items": [user_view(r) for r in rows], "next_cursor": next_cursor}


async def ensure_user(
    ctx: Context, *, email: str, password: str, name: str, role: UserRole, dealer_id: str | None
) -> str:
    """The id of the account with this email, created if missing (bootstrap and seed)."""
    async with ctx.sessions() as session:
        row = await store.get_user_by_email(session, email)
    if row is not None:
        return str(row.id)
    password_hash = await hash_password(password)
    async with ctx.sessions() as session, session.begin():
        stmt = insert(store.users).values(
            id=new_id(), email=email, name=name, role=role, dealer_id=dealer_id,
            password_hash=password_hash,
        )  # fmt: skip
        await session.execute(stmt.on_conflict_do_nothing())
        row = await store.get_user_by_email(session, email)
    assert row is not None  # noqa: S101 - inserted or already there
    return str(row.id)


async def ensure_dealer(ctx: Context, *, name: str) -> str:
    """The id of the dealer with this name, created if missing (seed)."""
    async with ctx.sessions() as session, session.begin():
        stmt = insert(store.dealers).values(id=new_id(), name=name)
        await session.execute(stmt.on_conflict_do_nothing(index_elements=[store.dealers.c.name]))
        row = await store.get_dealer_by_name(session, name)
    assert row is not None  # noqa: S101
    return str(row.id)


# ------------------------------------------------------------------ device projection


async def apply_device(ctx: Context, event: Envelope[fleet.FleetDevice]) -> None:
    """Project one `fleet.device.v1` snapshot (idempotent; the latest snapshot wins)."""
    data = event.data
    async with ctx.sessions() as session, session.begin():
        if not await first_delivery(
            session, store.processed_events, consumer=DEVICE_CONSUMER, event_id=event.event_id
        ):
            return
        if data.deleted:
            await store.delete_device(session, device_id=data.device_id, at=event.occurred_at)
        else:
            await store.upsert_device(
                session,
                device_id=data.device_id,
                dealer_id=data.dealer_id,
                customer_email=data.customer_email,
                at=event.occurred_at,
            )


def token_event(
    kind: contract.TokenEventKind, row: Any, **extra: Any
) -> Envelope[contract.TokenEvent]:
    """A `tokens.token.v1` event for an `api_tokens` row (joined with its user's dealer)."""
    data = contract.TokenEvent(
        kind=kind,
        token_id=row.id,
        name=row.name,
        user_id=row.user_id,
        dealer_id=row.dealer_id,
        access=row.access,
        device_ids=sorted(row.device_ids) if row.device_ids is not None else None,
        expires_at=row.expires_at,
        at=datetime.now(UTC),
        **extra,
    )
    return new_event(type=contract.TOKEN.event_type, data=data, source=SOURCE, key=row.id)


async def record_revoked_use(ctx: Context, *, token_id: str, client_ip: str | None) -> None:
    """Audit record and event for a revoked token presented again (throttled per token)."""
    gate = f"tokens:revoked-use:{token_id}"
    if not await ctx.redis.set(gate, "1", nx=True, ex=ctx.settings.revoked_use_audit_interval_s):
        return
    async with ctx.sessions() as session, session.begin():
        row = await store.token_by_id(session, token_id)
        if row is None:
            return
        await store.add_audit(
            session, action="token.revoked_use", target_type="token", target_id=token_id,
            dealer_id=row.dealer_id, client_ip=client_ip,
        )  # fmt: skip
        event = token_event("revoked_use", row, client_ip=client_ip)
        await add_event(session, store.outbox, contract.TOKEN, event)
