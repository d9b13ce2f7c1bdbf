"""The gateway service's tables (its own database; no other service reads them)."""

from datetime import datetime

from sqlalchemy import Column, DateTime, MetaData, String, Table, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from common.idempotency import processed_events_table
from common.outbox import outbox_table

metadata = MetaData()
outbox = outbox_table(metadata, wake_relay=True)
processed_events = processed_events_table(metadata)

# Which devices hold broker credentials, and when they changed. Never the password: it lives
# only (hashed) in the broker's dynamic security store and in the registering person's hands.
device_credentials = Table(
    "device_credentials",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("rotated_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)


async def record_issued(session: AsyncSession, device_id: str, at: datetime) -> None:
    """The device's credentials were (re)issued at `at`."""
    stmt = insert(device_credentials).values(device_id=device_id, rotated_at=at, revoked_at=None)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[device_credentials.c.device_id],
            set_={"rotated_at": at, "revoked_at": None},
        )
    )


async def record_revoked(session: AsyncSession, device_id: str, at: datetime) -> None:
    """The device's credentials were removed at `at` (kept as a record)."""
    await session.execute(
        device_credentials.update()
        .where(device_credentials.c.device_id == device_id)
        .values(revoked_at=at)
    )


async def credentials_of(
    session: AsyncSession, device_id: str
) -> tuple[datetime, datetime | None] | None:
    """(rotated_at, revoked_at) of the device's credentials, if it ever had any."""
    row = (
        await session.execute(
            select(device_credentials.c.rotated_at, device_credentials.c.revoked_at).where(
                device_credentials.c.device_id == device_id
            )
        )
    ).first()
    return None if row is None else (row.rotated_at, row.revoked_at)
