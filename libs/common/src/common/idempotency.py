"""Idempotent consumers: remember processed event ids in the consumer's own transaction.

Call `first_delivery()` inside the transaction that applies the event; when it returns False
the event was applied before (a redelivery) and the handler must do nothing.
"""

import uuid

from sqlalchemy import Column, DateTime, MetaData, PrimaryKeyConstraint, String, Table, Uuid, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession


def processed_events_table(metadata: MetaData) -> Table:
    """`processed_events(consumer, event_id)`: one row per event a consumer applied."""
    return Table(
        "processed_events",
        metadata,
        Column("consumer", String(200), nullable=False),
        Column("event_id", Uuid, nullable=False),
        Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        PrimaryKeyConstraint("consumer", "event_id"),
    )


async def first_delivery(
    session: AsyncSession | AsyncConnection,
    processed: Table,
    *,
    consumer: str,
    event_id: uuid.UUID,
) -> bool:
    """Record the event as processed by `consumer`; False if it already was."""
    result = await session.execute(
        insert(processed)
        .values(consumer=consumer, event_id=event_id)
        .on_conflict_do_nothing()
        .returning(processed.c.event_id)
    )
    return result.first() is not None
