"""The tokens service's tables (its own database; no other service reads them) and queries."""

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from common.auth import DeviceOwnership
from common.idempotency import processed_events_table
from common.outbox import outbox_table
from tokens.domain import Account

metadata = MetaData()
outbox = outbox_table(metadata)
processed_events = processed_events_table(metadata)

dealers = Table(
    "dealers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("email", String(320), nullable=False),
    Column("name", String(200), nullable=False),
    Column("role", String(16), nullable=False),
    Column("dealer_id", String(64), ForeignKey("dealers.id"), nullable=True),
    Column("password_hash", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
Index("ux_users_email", func.lower(users.c.email), unique=True)
Index("ix_users_dealer", users.c.dealer_id)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("access", String(16), nullable=False),
    Column("device_ids", ARRAY(String(64)), nullable=True),
    Column("created_by", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("revoked_by", String(64), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Index("ix_api_tokens_user", "user_id"),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("private_key_enc", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("active_from", DateTime(timezone=True), nullable=False),
    Column("retire_after", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# Projection of fleet.device.v1: who owns each device (for device-restricted tokens).
devices = Table(
    "devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("dealer_id", String(64), nullable=False),
    Column("customer_email", String(320), nullable=True),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("action", String(64), nullable=False),
    Column("actor_user_id", String(64), nullable=True),
    Column("actor_token_id", String(64), nullable=True),
    Column("target_type", String(32), nullable=False),
    Column("target_id", String(64), nullable=False),
    Column("dealer_id", String(64), nullable=True),
    Column("client_ip", String(64), nullable=True),
    Column("detail", JSONB, nullable=False, server_default="{}"),
    Index("ix_audit_target", "target_type", "target_id"),
)

Conn = AsyncSession | AsyncConnection


def account_of(row: Any) -> Account:
    """An `Account` from a `users` row."""
    return Account(id=row.id, email=row.email, role=row.role, dealer_id=row.dealer_id)


async def get_user(conn: Conn, user_id: str) -> Any | None:
    """A user row by id."""
    return (await conn.execute(select(users).where(users.c.id == user_id))).first()


async def get_user_by_email(conn: Conn, email: str) -> Any | None:
    """A user row by email (case-insensitive)."""
    query = select(users).where(func.lower(users.c.email) == email.strip().lower())
    return (await conn.execute(query)).first()


async def get_dealer(conn: Conn, dealer_id: str) -> Any | None:
    """A dealer row by id."""
    return (await conn.execute(select(dealers).where(dealers.c.id == dealer_id))).first()


async def get_dealer_by_name(conn: Conn, name: str) -> Any | None:
    """A dealer row by its exact name."""
    return (await conn.execute(select(dealers).where(dealers.c.name == name))).first()


async def device_ownership(conn: Conn, device_ids: list[str]) -> dict[str, DeviceOwnership]:
    """What the projection knows about these devices."""
    if not device_ids:
        return {}
    rows = await conn.execute(select(devices).where(devices.c.device_id.in_(device_ids)))
    return {
        row.device_id: DeviceOwnership(
            device_id=row.device_id, dealer_id=row.dealer_id, customer_email=row.customer_email
        )
        for row in rows
    }


async def upsert_device(
    conn: Conn, *, device_id: str, dealer_id: str, customer_email: str | None, at: datetime
) -> None:
    """Keep the latest snapshot of a device (an older one never overwrites a newer one)."""
    stmt = insert(devices).values(
        device_id=device_id, dealer_id=dealer_id, customer_email=customer_email, occurred_at=at
    )
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[devices.c.device_id],
            set_={
                "dealer_id": stmt.excluded.dealer_id,
                "customer_email": stmt.excluded.customer_email,
                "occurred_at": stmt.excluded.occurred_at,
            },
            where=devices.c.occurred_at <= stmt.excluded.occurred_at,
        )
    )


async def delete_device(conn: Conn, *, device_id: str, at: datetime) -> None:
    """Forget a device removed from the registry (unless a newer snapshot came first)."""
    await conn.execute(
        devices.delete().where(devices.c.device_id == device_id, devices.c.occurred_at <= at)
    )


async def token_with_account(conn: Conn, secret_hash: str) -> Any | None:
    """An API token row with its account's fields, by the secret's hash."""
    query = (
        select(
            api_tokens,
            users.c.email,
            users.c.role,
            users.c.dealer_id,
        )
        .join(users, users.c.id == api_tokens.c.user_id)
        .where(api_tokens.c.secret_hash == secret_hash)
    )
    return (await conn.execute(query)).first()


async def token_by_id(conn: Conn, token_id: str) -> Any | None:
    """An API token row with its account's dealer, by id."""
    query = (
        select(api_tokens, users.c.dealer_id, users.c.email, users.c.role)
        .join(users, users.c.id == api_tokens.c.user_id)
        .where(api_tokens.c.id == token_id)
    )
    return (await conn.execute(query)).first()


async def touch_last_used(conn: Conn, used: dict[str, datetime]) -> None:
    """Record last use, at most once a minute per token whatever the number of replicas."""
    for token_id, at in used.items():
        await conn.execute(
            update(api_tokens)
            .where(
                api_tokens.c.id == token_id,
                or_(
                    api_tokens.c.last_used_at.is_(None),
                    api_tokens.c.last_used_at < at - func.make_interval(0, 0, 0, 0, 0, 1),
                ),
            )
            .values(last_used_at=at)
        )


async def add_audit(
    conn: Conn,
    *,
    action: str,
    target_type: str,
    target_id: str,
    actor_user_id: str | None = None,
    actor_token_id: str | None = None,
    dealer_id: str | None = None,
    client_ip: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit record in the caller's transaction."""
    await conn.execute(
        audit_log.insert().values(
            action=action,
            target_type=target_type,
            target_id=target_id,
            actor_user_id=actor_user_id,
            actor_token_id=actor_token_id,
            dealer_id=dealer_id,
            client_ip=client_ip,
            detail=detail or {},
        )
    )
