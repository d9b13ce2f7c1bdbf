"""Idempotent consumers: remember processed event ids in the consumer's own transaction.

Call `first_delivery()` inside the transaction that applies the event; when it returns False
the event was applied before (a redelivery) and the handler must do nothing.
"""

import uuid
from collections.abc import Collection

from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Uuid,
    any_,
    bindparam,
    delete,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
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


async def first_deliveries(
    session: AsyncSession | AsyncConnection,
    processed: Table,
    *,
    consumer: str,
    event_ids: Collection[uuid.UUID],
) -> set[uuid.UUID]:
    """Record the events as processed by `consumer` in one statement; returns those that were
    not already (a concurrent transaction recording one of them makes this wait for it)."""
    if not event_ids:
        return set()
    table = processed.fullname
    result = await session.execute(
        text(
            f"INSERT INTO {table} (consumer, event_id)"  # noqa: S608 - a table name of ours
            " SELECT :consumer, e FROM unnest(CAST(:event_ids AS uuid[])) AS e"
            " ORDER BY e"  # one order for every batch: concurrent ones cannot deadlock
            " ON CONFLICT DO NOTHING RETURNING event_id"
        ),
        {"consumer": consumer, "event_ids": list(event_ids)},
    )
    return set(result.scalars())


async def forget_deliveries(
    session: AsyncSession | AsyncConnection,
    processed: Table,
    *,
    consumer: str,
    event_ids: Collection[uuid.UUID],
) -> None:
    """Take back records made in this transaction for events that were not processed after
    all, so a redelivery processes them."""
    if not event_ids:
        return
    await session.execute(
        delete(processed).where(
            processed.c.consumer == consumer,
            processed.c.event_id == any_(bindparam(None, list(event_ids), type_=ARRAY(Uuid))),
        )
    )
