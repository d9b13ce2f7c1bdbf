"""Async SQLAlchemy 2 (asyncpg) engine and session factory."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

# Bounds on every wait for PostgreSQL, so a request meets a dead database with a 503 within
# seconds instead of hanging: opening a connection, waiting for a free one in the pool, and one
# statement (generous: the slowest legitimate query is far below it).
CONNECT_TIMEOUT_S = 5.0
POOL_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 60.0


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    application_name: str = "autogen",
    autocommit: bool = False,
    pre_ping: bool = False,
) -> AsyncEngine:
    """An engine whose pool a restarted PostgreSQL costs one retryable error, not an outage.

    No pre-ping by default: SQLAlchemy's asyncpg ping is BEGIN, ";" and ROLLBACK on every
    checkout, a third of the statements of a command's round trip. A pooled connection that
    died (PostgreSQL restarted) fails its first statement instead, with an error the services
    answer 503 with Retry-After and consumers retry (`common.http.is_unavailable`), and that
    failure invalidates the whole pool, so the retry connects afresh
    (tests/integration/test_db_reconnect.py). `autocommit=True` suits single-statement reads
    on a hot path: no BEGIN/ROLLBACK around them.
    """
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args={
            "server_settings": {"application_name": application_name},
            "timeout": CONNECT_TIMEOUT_S,
            "command_timeout": COMMAND_TIMEOUT_S,
        },
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded values after commit (handlers return them to the API)."""
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit on success, roll back on any error."""
    async with sessions() as session, session.begin():
        yield session


async def ping(engine: AsyncEngine) -> None:
    """Raise unless the database answers."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
