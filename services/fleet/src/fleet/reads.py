"""The GET routes' statements, run straight on a pooled driver connection.

A read is one statement on an autocommit connection (`app.make_read_engine`), so it needs no ORM
session. Through one, a search spent about 1 ms of CPU beyond the statement's own (the session,
the connection wrapper, result and row objects): most of what it cost over the same SQL on a
bare connection (`bench/search.py`). The statements stay SQLAlchemy Core with named bind
parameters; each is compiled once to the driver's SQL (`$1`, `$2`, ...) and runs on the
engine's pooled asyncpg connection, with asyncpg's own prepared-statement cache.

No pre-ping either (a round trip per read): a connection PostgreSQL dropped (a restart, an idle
kill) fails its statement, and the read is run once more on a new pool, since the pooled
connections all predate the drop. A read has no side effects, so running it twice is safe.
"""

from collections.abc import Mapping
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

# What asyncpg raises on a connection the server closed: 08 (connection exception), 57
# (operator intervention: admin shutdown, crash shutdown), a closed connection.
DISCONNECTED: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    ConnectionError,
)

# Statements are module constants or cached per shape, so this stays small; the bound only
# guards against a caller that builds a statement per call.
_MAX_COMPILED = 1024


class Reads:
    """Runs read statements on `engine`'s pool (an autocommit engine: no transaction)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # id(statement) -> (SQL, parameter names in order, their default values, statement);
        # the statement is kept so its id is not reused while the entry lives.
        self._compiled: dict[int, tuple[str, tuple[str, ...], dict[str, Any], ClauseElement]] = {}

    async def fetch(
        self, statement: ClauseElement, params: Mapping[str, Any] | None = None
    ) -> list[asyncpg.Record]:
        """The rows of `statement` with its named parameters bound from `params`."""
        sql, names, defaults = self._sql(statement)
        given = params or {}
        args = [given[name] if name in given else defaults[name] for name in names]
        rows = await self._fetch(sql, args, last_try=False)
        if rows is None:  # a dropped connection: its pool mates predate the drop too
            await self._engine.dispose(close=False)
            rows = await self._fetch(sql, args, last_try=True)
        return rows or []

    async def _fetch(self, sql: str, args: list[Any], *, last_try: bool) -> list[Any] | None:
        """The rows, or None when the connection turned out dropped (unless `last_try`)."""
        pooled = await self._engine.raw_connection()
        try:
            driver = pooled.driver_connection
            if driver is None:  # only after close(), which is ours to call
                raise RuntimeError("a pooled connection without its driver connection")
            try:
                rows: list[asyncpg.Record] = await driver.fetch(sql, *args)
            except Exception as exc:
                # A connection the server closed while it sat in the pool does not always
                # fail with a connection error (e.g. "cannot switch to state"); it is closed.
                if not (isinstance(exc, DISCONNECTED) or driver.is_closed()):
                    raise
                # Closing a connection is awaited inside SQLAlchemy: it needs its greenlet.
                await greenlet_spawn(pooled.invalidate, exc)
                if last_try:
                    raise
                return None
            return rows
        finally:
            pooled.close()  # back to the pool (autocommit: nothing to roll back)

    def _sql(self, statement: ClauseElement) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        found = self._compiled.get(id(statement))
        if found is None or found[3] is not statement:
            compiled = statement.compile(dialect=self._engine.dialect)
            if not isinstance(compiled, SQLCompiler):
                raise TypeError(f"not a SQL statement: {statement!r}")
            sql = str(compiled)
            if "POSTCOMPILE" in sql:
                raise ValueError("expanding parameters cannot be compiled once; use = ANY(...)")
            if len(self._compiled) >= _MAX_COMPILED:
                self._compiled.clear()
            found = (sql, tuple(compiled.positiontup or ()), dict(compiled.params), statement)
            self._compiled[id(statement)] = found
        return found[0], found[1], found[2]
