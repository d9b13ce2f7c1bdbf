"""Pooled connections without pre-ping: a restarted PostgreSQL costs one retryable error.

`common.db.make_engine` no longer pings every connection it hands out (three round trips,
BEGIN / ";" / ROLLBACK, per checkout: a third of a command's statements). A connection that
died meanwhile then fails its first statement; that error must be one the services answer 503
(and consumers retry), and it must invalidate the pool so that the retry gets a new connection
instead of the next dead one.
"""

import asyncpg
import pytest
from sqlalchemy import text

from common.db import make_engine, make_sessionmaker, transaction
from common.http import is_unavailable
from common.testing.plugin import Migrate
from common.testing.stack import StackAddresses

pytestmark = pytest.mark.stack


async def test_dead_pooled_connections_cost_one_retryable_error(
    stack: StackAddresses, fresh_database: Migrate
) -> None:
    url = await fresh_database("empty_reconnect")
    engine = make_engine(url, pool_size=3, application_name="test-reconnect")
    sessions = make_sessionmaker(engine)
    try:
        # Fill the pool with three live connections, as a busy service would have.
        held = [await engine.connect() for _ in range(3)]
        for conn in held:
            await conn.execute(text("SELECT 1"))
        for conn in held:
            await conn.close()

        # What a PostgreSQL restart does to them.
        admin = await asyncpg.connect(stack.pg_admin_url)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'test-reconnect'"
            )
        finally:
            await admin.close()
        assert killed == 3

        with pytest.raises(Exception) as failed:  # noqa: PT011 - the type is what is asserted
            async with transaction(sessions) as session:
                await session.execute(text("SELECT 1"))
        # A 503 with Retry-After on HTTP; both consumer kinds re-read the record on it.
        assert is_unavailable(failed.value), repr(failed.value)

        # The failure invalidated the whole pool: every retry gets a fresh connection.
        for _ in range(3):
            async with transaction(sessions) as session:
                assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()
