"""API token use cases: issue, list, revoke (one transaction each, event and audit included)."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from common.auth import Access, Principal
from common.contracts import tokens as contract
from common.http import ProblemError
from common.outbox import add_event
from tokens import domain, store
from tokens.domain import ScopeError
from tokens.handlers import Context, new_id, token_event
from tokens.pagination import finish, page


def token_view(row: Any) -> dict[str, Any]:
    """The public form of a token (never its secret or hash)."""
    return {
        "id": row.id,
        "name": row.name,
        "user_id": row.user_id,
        "access": row.access,
        "device_ids": sorted(row.device_ids) if row.device_ids is not None else None,
        "expires_at": row.expires_at.isoformat(),
        "created_at": row.created_at.isoformat(),
        "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


async def create_token(
    ctx: Context,
    caller: Principal,
    *,
    name: str,
    user_id: str,
    access: Access,
    device_ids: list[str] | None,
    expires_in_days: int,
) -> dict[str, Any]:
    """Issue a token no wider than the caller; the secret is in this answer only."""
    now = datetime.now(UTC)
    secret = domain.new_token_secret()
    token_id = new_id()
    async with ctx.sessions() as session, session.begin():
        user = await store.get_user(session, user_id)
        account = store.account_of(user) if user is not None else None
        devices = await store.device_ownership(session, list(device_ids or []))
        try:
            grant = domain.check_token_request(
                caller, account=account, access=access, device_ids=device_ids, devices=devices
            )
        except ScopeError as exc:
            raise ProblemError(exc.status, "Forbidden", exc.detail) from exc
        restricted = sorted(grant.device_ids) if grant.device_ids is not None else None
        await session.execute(
            store.api_tokens.insert().values(
                id=token_id,
                secret_hash=domain.hash_token(secret, ctx.hash_key),
                name=name,
                user_id=user_id,
                access=access,
                device_ids=restricted,
                created_by=caller.user_id,
                created_at=now,
                expires_at=domain.token_expiry(now, expires_in_days),
            )
        )
        row = await store.token_by_id(session, token_id)
        assert row is not None  # noqa: S101 - inserted just above
        await store.add_audit(
            session, action="token.created", target_type="token", target_id=token_id,
            actor_user_id=caller.user_id, dealer_id=row.dealer_id,
            detail={"user_id": user_id, "access": access, "device_ids": restricted},
        )  # fmt: skip
        event = token_event("created", row, actor_user_id=caller.user_id)
        await add_event(session, store.outbox, contract.TOKEN, event)
    return {"token": secret, **token_view(row)}


def _scoped(caller: Principal) -> Any:
    t, u = store.api_tokens, store.users
    query = select(t).join(u, u.c.id == t.c.user_id)
    if caller.is_admin:
        return query
    if caller.role == "dealer":
        return query.where(u.c.dealer_id == caller.dealer_id)
    return query.where(t.c.user_id == caller.user_id)


async def list_tokens(
    ctx: Context, caller: Principal, *, cursor: str | None, limit: int
) -> dict[str, Any]:
    """Tokens of the accounts in the caller's scope, newest first, without secrets."""
    t = store.api_tokens
    query = page(_scoped(caller), created=t.c.created_at, row_id=t.c.id, cursor=cursor,
                 limit=limit, newest_first=True)  # fmt: skip
    async with ctx.sessions() as session:
        rows, next_cursor = finish(list(await session.execute(query)), limit)
    return {"items": [token_view(r) for r in rows], "next_cursor": next_cursor}


async def revoke_token(ctx: Context, caller: Principal, *, token_id: str) -> None:
    """Revoke a token in scope (404 otherwise); it stops working within a second."""
    async with ctx.sessions() as session, session.begin():
        row = (
            await session.execute(
                _scoped(caller).where(store.api_tokens.c.id == token_id).with_for_update()
            )
        ).first()
        if row is None:
            raise ProblemError(404, "Not found", "no such token")
        if caller.access != "control":
            raise ProblemError(403, "Forbidden", "this token is read-only")
        if row.revoked_at is not None:
            return
        await session.execute(
            store.api_tokens.update()
            .where(store.api_tokens.c.id == token_id)
            .values(revoked_at=datetime.now(UTC), revoked_by=caller.user_id)
        )
        full = await store.token_by_id(session, token_id)
        assert full is not None  # noqa: S101
        await store.add_audit(
            session, action="token.revoked", target_type="token", target_id=token_id,
            actor_user_id=caller.user_id, actor_token_id=caller.token_id,
            dealer_id=full.dealer_id,
        )  # fmt: skip
        event = token_event(
            "revoked", full, actor_user_id=caller.user_id, actor_token_id=caller.token_id
        )
        await add_event(session, store.outbox, contract.TOKEN, event)
    # After the commit: every cache answers "revoked" from now on.
    await ctx.cache.mark_revoked(secret_hash=row.secret_hash, token_id=token_id)
