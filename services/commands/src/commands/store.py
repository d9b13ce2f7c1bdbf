"""The commands service's tables (its own database; no other service reads them) and queries.

The hot paths (the batches' locked reads, the lifecycle write, the accept's device read) run on
the session's pooled asyncpg connection (`driver`) with their SQL compiled once (`fetch`):
through the session, each statement cost more client CPU in SQLAlchemy (cache key, compile,
result objects, greenlet hops) than the round trip itself.
"""

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import asyncpg
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Row,
    Select,
    String,
    Table,
    Text,
    any_,
    bindparam,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON, JSONB, aggregate_order_by, insert
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.selectable import TextualSelect

from commands import domain
from common.contracts.commands import DISPATCH
from common.idempotency import processed_events_table
from common.outbox import StagedInsert, outbox_table, statement

metadata = MetaData()
# Accepted commands wake the relay at once, and their dispatch is sent right after the commit,
# without a relay round (`common.outbox`: it is on every command's latency path, and the
# gateway delivers a command once whatever the order or number of its dispatches).
outbox = outbox_table(metadata, wake_relay=True, eager_topics=(DISPATCH.name,))
processed_events = processed_events_table(metadata)

commands = Table(
    "commands",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("device_id", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    # As asked (e.g. {"release_id"}), and as the device gets it (e.g. {"version", "url", ...}).
    Column("params", JSONB, nullable=False),
    Column("dispatch_params", JSONB, nullable=False),
    Column("status", String(16), nullable=False),
    Column("detail", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("requested_by", String(200), nullable=False),
    Column("requested_by_email", String(320), nullable=True),
    Column("token_id", String(64), nullable=True),
    Column("origin", String(16), nullable=False),  # "api" or "bus" (command.request.v1)
    Column("idempotency_scope", String(200), nullable=True),
    Column("idempotency_key", String(200), nullable=True),
    Column("fingerprint", String(64), nullable=True),
    Column("correlation", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("device_result", String(16), nullable=True),
    Column("device_result_at", DateTime(timezone=True), nullable=True),
    Column("acked_at", DateTime(timezone=True), nullable=True),
    Column("ota_version", String(64), nullable=True),
    Column("ota_phase", String(16), nullable=True),
    Column("ota_progress", Float, nullable=True),
    # W3C `traceparent` of the accept: the command's later steps join the trace it started.
    Column("traceparent", String(64), nullable=True),
    # Bumped by every write of the row: an unlocked read's write is guarded by it (`write`).
    Column("row_version", Integer, nullable=False, server_default=text("0")),
    Index("ix_commands_device_created", "device_id", "created_at", "id"),
    Index(
        "ix_commands_active_expiry",
        "expires_at",
        postgresql_where=text("status IN ('queued', 'sent', 'acked')"),
    ),
    Index(
        "ix_commands_active_device",
        "device_id",
        postgresql_where=text("status IN ('queued', 'sent', 'acked')"),
    ),
    Index(
        "ix_commands_awaiting_run_state",
        "device_result_at",
        postgresql_where=text("status = 'acked' AND device_result = 'succeeded'"),
    ),
    Index(
        "ux_commands_idempotency",
        "idempotency_scope",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
)

transitions = Table(
    "command_transitions",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("command_id", String(64), ForeignKey("commands.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("detail", Text, nullable=True),
    Column("reporter", String(16), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_command_transitions_command", "command_id", "id"),
)

# Projection of fleet.device.v1: ownership for scope checks, the variant for release matching.
devices = Table(
    "devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("dealer_id", String(64), nullable=False),
    Column("customer_email", String(320), nullable=True),
    Column("model", String(64), nullable=False),
    Column("engine", String(64), nullable=True),
    Column("transport", String(16), nullable=False),
    Column("deleted", Boolean, nullable=False, server_default=text("false")),
)

# What the devices said last (presence and telemetry from the gateway), independent of fleet.
device_state = Table(
    "device_state",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("online", Boolean, nullable=True),
    Column("fw", String(64), nullable=True),
    Column("presence_at", DateTime(timezone=True), nullable=True),
    Column("run_state", String(16), nullable=True),
    Column("run_state_at", DateTime(timezone=True), nullable=True),
)

# Projection of firmware.release.v1.
releases = Table(
    "releases",
    metadata,
    Column("release_id", String(64), primary_key=True),
    Column("version", String(64), nullable=False),
    Column("models", JSONB, nullable=False),
    Column("engine", String(64), nullable=True),
    Column("transport", String(16), nullable=True),
    Column("artifact_url", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("withdrawn", Boolean, nullable=False),
)

Conn = AsyncSession | AsyncConnection
# A stored row as the driver returns it (columns by name: `row["status"]`).
Record = asyncpg.Record


# ------------------------------------------------------------------ the driver connection

# What asyncpg raises on a connection the server closed: 08 (connection exception), 57
# (operator intervention: shutdown), a closed connection.
_DISCONNECTED: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    ConnectionError,
)
_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]
# id(statement) -> (SQL, parameter names in order, their defaults, statement); the statement is
# kept so its id is not reused. Statements are module constants or cached per shape.
_COMPILED: dict[int, tuple[str, tuple[str, ...], dict[str, Any], ClauseElement]] = {}


class Driver(NamedTuple):
    """A session's asyncpg connection, in the session's transaction (if it has one)."""

    conn: AsyncConnection
    driver: asyncpg.Connection


async def driver(source: AsyncSession | AsyncConnection, *, begin: bool = True) -> Driver:
    """The pooled asyncpg connection under `source`, its transaction begun: statements run on
    it belong to the session's transaction, which the session commits or rolls back as usual
    (and its commit hooks run). On an autocommit engine there is no transaction to begin.

    `begin=False` (a session that ran nothing yet): no BEGIN, each statement commits on its
    own, and the session's commit sends nothing but still runs its hooks. For one statement
    that is atomic by itself (the accept's INSERT) this saves BEGIN and COMMIT."""
    conn = await source.connection() if isinstance(source, AsyncSession) else source
    fairy = await conn.get_raw_connection()
    # SQLAlchemy's asyncpg adapter sends BEGIN lazily, before the first statement *it* runs;
    # statements run on the driver itself would otherwise run outside the transaction (a
    # FOR UPDATE lock released at once). `_start_transaction` is a no-op under autocommit.
    adapted = cast(Any, fairy.dbapi_connection)
    if begin and not adapted._started:
        await adapted._start_transaction()
    raw = fairy.driver_connection
    if raw is None:  # only after close(), which is SQLAlchemy's to call
        raise RuntimeError("a pooled connection without its driver connection")
    return Driver(conn, cast(asyncpg.Connection, raw))


def _sql(statement: ClauseElement) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    found = _COMPILED.get(id(statement))
    if found is None or found[3] is not statement:
        compiled = statement.compile(dialect=_DIALECT)
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"not a SQL statement: {statement!r}")
        sql = str(compiled)
        if "POSTCOMPILE" in sql:
            raise ValueError("expanding parameters cannot be compiled once; use = ANY(...)")
        found = (sql, tuple(compiled.positiontup or ()), dict(compiled.params), statement)
        _COMPILED[id(statement)] = found
    return found[0], found[1], found[2]


async def fetch(
    on: Driver, statement: ClauseElement, params: Mapping[str, Any] | None = None
) -> list[Record]:
    """The rows of `statement` (its named parameters bound from `params`) run on the driver:
    compiled once to `$n` SQL, prepared once per connection by asyncpg. No SQLAlchemy type
    processing: values go and come as asyncpg (and the dialect's JSON codecs) have them."""
    sql, names, defaults = _sql(statement)
    given = params or {}
    args = [given[name] if name in given else defaults[name] for name in names]
    try:
        return await on.driver.fetch(sql, *args)
    except _DISCONNECTED as exc:
        # As SQLAlchemy does for its own statements: drop the connection and the pool's others
        # (they predate the drop), and raise what callers retry (503, re-read batch).
        await on.conn.invalidate(exc)
        await on.conn.engine.dispose(close=False)
        raise OperationalError(sql, None, exc, connection_invalidated=True) from exc
    except asyncpg.PostgresError as exc:
        # SQLAlchemy's exceptions, as its own statements raise them (`orig` keeps the SQLSTATE):
        # callers tell a key race (IntegrityError) and refused values (class 22) by them.
        raise _wrapped(sql, exc) from exc


def _wrapped(sql: str, exc: asyncpg.PostgresError) -> DBAPIError:
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(sql, None, exc)
    if isinstance(exc, asyncpg.DataError):
        return DataError(sql, None, exc)
    return DBAPIError(sql, None, exc)


class Fetched:
    """A stored row with its columns as attributes (`row.status`), like SQLAlchemy's rows."""

    __slots__ = ("_record",)

    def __init__(self, record: Record) -> None:
        self._record = record

    def __getattr__(self, name: str) -> Any:
        try:
            return self._record[name]
        except KeyError:
            raise AttributeError(name) from None


def _ids(name: str) -> Any:
    # `= ANY($n)`: one prepared statement for any number of values.
    return any_(bindparam(name, type_=ARRAY(String)))


# In the partial indexes' own words, so the planner can use them.
_IS_ACTIVE = text("commands.status IN ('queued', 'sent', 'acked')")
assert set(domain.ACTIVE) == {"queued", "sent", "acked"}  # noqa: S101 - the literal above

_BY_ID = select(commands).where(commands.c.id == _ids("ids")).order_by(commands.c.id)
_BY_ID_LOCKED = _BY_ID.with_for_update()
_STATES = select(device_state).where(device_state.c.device_id == _ids("device_ids"))
_ACTIVE_FOR_DEVICES = (
    select(commands)
    .where(
        commands.c.device_id == _ids("device_ids"), _IS_ACTIVE, commands.c.action == _ids("actions")
    )
    .order_by(commands.c.id)
    .with_for_update()
)
_DEVICE = select(devices).where(devices.c.device_id == bindparam("device_id", type_=String))


async def locked_commands(on: Driver, ids: Collection[str]) -> dict[str, Record]:
    """The commands of `ids` that exist, locked in id order (every batch locks in that order,
    so concurrent batches cannot deadlock)."""
    if not ids:
        return {}
    rows = await fetch(on, _BY_ID_LOCKED, {"ids": sorted(ids)})
    return {row["id"]: row for row in rows}


async def read_commands(on: Driver, ids: Collection[str]) -> dict[str, Record]:
    """The commands of `ids` that exist, unlocked."""
    if not ids:
        return {}
    return {row["id"]: row for row in await fetch(on, _BY_ID, {"ids": sorted(ids)})}


async def device_states(on: Driver, device_ids: Collection[str]) -> dict[str, Record]:
    """The last presence and run state of each of `device_ids` that has one."""
    if not device_ids:
        return {}
    rows = await fetch(on, _STATES, {"device_ids": list(device_ids)})
    return {row["device_id"]: row for row in rows}


async def locked_active_for_devices(
    on: Driver, device_ids: Collection[str], *, actions: Sequence[str]
) -> list[Record]:
    """The active commands of `actions` on any of `device_ids`, locked in id order."""
    if not device_ids:
        return []
    return await fetch(
        on, _ACTIVE_FOR_DEVICES, {"device_ids": sorted(device_ids), "actions": list(actions)}
    )


async def device_of(on: Driver, device_id: str) -> domain.Device | None:
    """The device's ownership snapshot (None if unknown or deleted), unlocked."""
    rows = await fetch(on, _DEVICE, {"device_id": device_id})
    if not rows or rows[0]["deleted"]:
        return None
    return _device(device_id, Fetched(rows[0]))


# ------------------------------------------------------------------ projections


async def get_device(conn: Conn, device_id: str, *, lock: bool = False) -> domain.Device | None:
    """The device's ownership snapshot (None if unknown or deleted); `lock` serialises accepts."""
    query = select(devices).where(devices.c.device_id == device_id)
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    if row is None or row.deleted:
        return None
    return _device(row.device_id, row)


def _device(device_id: str, row: Row[Any] | Fetched) -> domain.Device:
    return domain.Device(
        device_id=device_id,
        dealer_id=row.dealer_id,
        customer_email=row.customer_email,
        model=row.model,
        engine=row.engine,
        transport=row.transport,
    )


async def upsert_devices(conn: Conn, snapshots: Sequence[dict[str, Any]]) -> None:
    """Store the latest snapshot of each device (the last of a device's in `snapshots` wins)."""
    await _upsert_latest(conn, devices, "device_id", snapshots)


async def upsert_releases(conn: Conn, descriptions: Sequence[dict[str, Any]]) -> None:
    """Store the latest description of each release (the last in `descriptions` wins)."""
    await _upsert_latest(conn, releases, "release_id", descriptions)


async def _upsert_latest(
    conn: Conn, table: Table, key: str, rows: Sequence[dict[str, Any]]
) -> None:
    # One statement may not touch a row twice: keep each key's last version, in key order.
    latest = {row[key]: row for row in rows}
    if not latest:
        return
    stmt = insert(table).values([latest[k] for k in sorted(latest)])
    columns = next(iter(latest.values())).keys()
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[table.c[key]],
            set_={c: stmt.excluded[c] for c in columns if c != key},
        )
    )


async def get_release(conn: Conn, release_id: str) -> domain.Release | None:
    """A release by id."""
    row = (await conn.execute(select(releases).where(releases.c.release_id == release_id))).first()
    if row is None:
        return None
    return domain.Release(
        release_id=row.release_id,
        version=row.version,
        models=tuple(row.models),
        engine=row.engine,
        transport=row.transport,
        artifact_url=row.artifact_url,
        sha256=row.sha256,
        size=row.size,
        withdrawn=row.withdrawn,
    )


async def record_presences(
    conn: Conn, latest: Mapping[str, tuple[bool, str | None, datetime]]
) -> None:
    """Store each device's latest presence `(online, fw, at)` unless a newer one is known."""
    if not latest:
        return
    stmt = insert(device_state).values(
        [
            {"device_id": d, "online": online, "fw": fw, "presence_at": at}
            for d, (online, fw, at) in sorted(latest.items())
        ]
    )
    newer = or_(
        device_state.c.presence_at.is_(None),
        device_state.c.presence_at <= stmt.excluded.presence_at,
    )
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[device_state.c.device_id],
            set_={
                "online": stmt.excluded.online,
                # An `offline` says nothing about the firmware: keep the one known.
                "fw": func.coalesce(stmt.excluded.fw, device_state.c.fw),
                "presence_at": stmt.excluded.presence_at,
            },
            where=newer,
        )
    )


def _one_of(column: ColumnElement[str], values: Collection[str]) -> ColumnElement[bool]:
    """`column = ANY($1)`: one prepared statement for any number of values (`IN` renders one
    placeholder per value, so every batch size was another statement to prepare)."""
    return column == any_(bindparam(None, list(values), type_=ARRAY(String)))


async def states_of(conn: Conn, device_ids: Collection[str]) -> dict[str, Row[Any]]:
    """The last presence and run state of each of `device_ids` that has one."""
    if not device_ids:
        return {}
    query = select(device_state).where(_one_of(device_state.c.device_id, device_ids))
    return {row.device_id: row for row in (await conn.execute(query)).all()}


async def record_run_states(conn: Conn, latest: Mapping[str, tuple[str, datetime]]) -> None:
    """Store each device's latest telemetry run state `(run_state, at)` unless a newer is known."""
    if not latest:
        return
    stmt = insert(device_state).values(
        [
            {"device_id": d, "run_state": state, "run_state_at": at}
            for d, (state, at) in sorted(latest.items())
        ]
    )
    newer = or_(
        device_state.c.run_state_at.is_(None),
        device_state.c.run_state_at <= stmt.excluded.run_state_at,
    )
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[device_state.c.device_id],
            set_={"run_state": stmt.excluded.run_state, "run_state_at": stmt.excluded.run_state_at},
            where=newer,
        )
    )


# ------------------------------------------------------------------ commands


def to_domain(row: Row[Any] | Record) -> domain.Command:
    """The lifecycle's view of a stored command (a SQLAlchemy row or the driver's record)."""
    m: Any = row._mapping if isinstance(row, Row) else row
    return domain.Command(
        id=m["id"],
        device_id=m["device_id"],
        action=m["action"],
        status=m["status"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        detail=m["detail"],
        device_result=m["device_result"],
        device_result_at=m["device_result_at"],
        ota_version=m["ota_version"],
        ota_phase=m["ota_phase"],
        ota_progress=m["ota_progress"],
        acked_at=m["acked_at"],
        correlation=dict(m["correlation"] or {}),
    )


async def get_command(conn: Conn, command_id: str, *, lock: bool = False) -> Row[Any] | None:
    """A command by id; `lock` holds it for the transaction."""
    query = select(commands).where(commands.c.id == command_id)
    if lock:
        query = query.with_for_update()
    return (await conn.execute(query)).first()


async def find_by_key(conn: Conn, scope: str, key: str) -> Row[Any] | None:
    """The command an idempotency key already made."""
    return (
        await conn.execute(
            select(commands).where(
                commands.c.idempotency_scope == scope, commands.c.idempotency_key == key
            )
        )
    ).first()


async def active_for_device(
    conn: Conn, device_id: str, *, actions: Sequence[str] | None = None, lock: bool = False
) -> list[Row[Any]]:
    """The device's commands still on their way (oldest first)."""
    query = select(commands).where(
        commands.c.device_id == device_id, commands.c.status.in_(domain.ACTIVE)
    )
    if actions is not None:
        query = query.where(commands.c.action.in_(actions))
    if lock:
        query = query.with_for_update()
    return list((await conn.execute(query.order_by(commands.c.created_at, commands.c.id))).all())


async def commands_by_id(
    conn: Conn, ids: Collection[str], *, lock: bool = True
) -> dict[str, Row[Any]]:
    """The commands of `ids` that exist, locked in id order (every batch locks in that order,
    so concurrent batches cannot deadlock) unless `lock` is false."""
    if not ids:
        return {}
    query = select(commands).where(_one_of(commands.c.id, sorted(ids))).order_by(commands.c.id)
    rows = (await conn.execute(query.with_for_update() if lock else query)).all()
    return {row.id: row for row in rows}


async def active_for_devices(
    conn: Conn, device_ids: Collection[str], *, actions: Sequence[str]
) -> list[Row[Any]]:
    """The active commands of `actions` on any of `device_ids`, locked in id order."""
    if not device_ids:
        return []
    query = (
        select(commands)
        .where(
            _one_of(commands.c.device_id, sorted(device_ids)),
            commands.c.status.in_(domain.ACTIVE),
            commands.c.action.in_(actions),
        )
        .order_by(commands.c.id)
        .with_for_update()
    )
    return list((await conn.execute(query)).all())


async def count_active(conn: Conn) -> dict[str, int]:
    """How many commands are in each active status (the partial indexes keep this cheap)."""
    query = (
        select(commands.c.status, func.count())
        .where(commands.c.status.in_(domain.ACTIVE))
        .group_by(commands.c.status)
    )
    counts = dict.fromkeys(domain.ACTIVE, 0)
    counts.update({status: int(n) for status, n in (await conn.execute(query)).all()})
    return counts


class TransitionRow(NamedTuple):
    """One lifecycle transition to store."""

    command_id: str
    status: str
    detail: str | None
    reporter: str
    at: datetime


# Arrays, not a VALUES row each: one prepared statement whatever the number of rows.
_SAVE_SET = (
    "UPDATE commands AS c SET status = v.status, detail = v.detail,"
    " device_result = v.device_result, device_result_at = v.device_result_at,"
    " acked_at = v.acked_at, ota_phase = v.ota_phase, ota_progress = v.ota_progress,"
    " updated_at = v.updated_at, row_version = c.row_version + 1"
    " FROM unnest(CAST(:row_ids AS varchar[]), CAST(:row_statuses AS varchar[]),"
    " CAST(:row_details AS text[]), CAST(:row_device_results AS varchar[]),"
    " CAST(:row_device_result_ats AS timestamptz[]), CAST(:row_acked_ats AS timestamptz[]),"
    " CAST(:row_ota_phases AS varchar[]), CAST(:row_ota_progresses AS float8[]),"
    " CAST(:row_updated_ats AS timestamptz[]), CAST(:row_versions AS int[]))"
    " AS v(id, status, detail, device_result, device_result_at, acked_at, ota_phase,"
    " ota_progress, updated_at, row_version)"
    " WHERE c.id = v.id"
)
_SAVE_ALL = f"saved AS ({_SAVE_SET} RETURNING c.id)"
# Only rows nobody wrote since they were read (unlocked): their versions are the ones read.
# Locked first in id order, as every batch locks them: an UPDATE alone locks its rows in no
# set order, and could deadlock with a batch holding some of them.
_SAVE_UNCHANGED = (
    "locked AS (SELECT id FROM commands WHERE id = ANY(CAST(:row_ids AS varchar[]))"  # noqa: S608
    " ORDER BY id FOR UPDATE), "
    f"saved AS ({_SAVE_SET} AND c.row_version = v.row_version"
    " AND c.id IN (SELECT id FROM locked) RETURNING c.id)"
)
_STEPS = (
    "INSERT INTO command_transitions (command_id, status, detail, reporter, at)"
    " SELECT t.command_id, t.status, t.detail, t.reporter, t.at"
    " FROM unnest(CAST(:step_command_ids AS varchar[]), CAST(:step_statuses AS varchar[]),"
    " CAST(:step_details AS text[]), CAST(:step_reporters AS varchar[]),"
    " CAST(:step_ats AS timestamptz[]))"
    " WITH ORDINALITY AS t(command_id, status, detail, reporter, at, n)"
)
_ORDERED = " ORDER BY t.n)"  # ids in the order given: the history's order
_ADD_TRANSITIONS = f"steps AS ({_STEPS}{_ORDERED}"
# The transitions of the rows `saved` wrote, no others.
_ADD_SAVED_TRANSITIONS = (
    f"steps AS ({_STEPS} WHERE t.command_id IN (SELECT id FROM saved){_ORDERED}"  # noqa: S608
)


_INSERTED_COLUMNS = tuple(c for c in commands.c if c.name != "row_version")  # its default: 0
_INSERT_COMMAND = (  # the table's own column names, nothing from outside
    f"new_command AS (INSERT INTO commands ({', '.join(c.name for c in _INSERTED_COLUMNS)})"  # noqa: S608
    f" VALUES ({', '.join(f':cmd_{c.name}' for c in _INSERTED_COLUMNS)}) RETURNING *)"
)
_JSON_COLUMNS = frozenset(c.name for c in commands.c if isinstance(c.type, JSONB))
_INSERTED: dict[tuple[str, ...], TextualSelect] = {}


def new_command(values: Mapping[str, Any]) -> domain.Command:
    """The lifecycle's view of a command about to be inserted with `values`."""
    return domain.Command(
        id=values["id"],
        device_id=values["device_id"],
        action=values["action"],
        status=values["status"],
        created_at=values["created_at"],
        expires_at=values["expires_at"],
        detail=values.get("detail"),
        ota_version=values.get("ota_version"),
        correlation=dict(values.get("correlation") or {}),
    )


async def write(
    on: Driver,
    changed: Sequence[tuple[domain.Command, datetime]],
    steps: Sequence[TransitionRow],
    events: StagedInsert | None,
    *,
    insert: Mapping[str, Any] | None = None,
) -> Fetched | None:
    """Write the lifecycle fields of each changed command (each at most once, stamped with its
    time), the transitions in this order and the events, in one statement (one round trip);
    with `insert`, a new command too (its transitions may name it: foreign keys are checked at
    the end of the statement), whose row as stored is returned."""
    ctes, params = _writes(changed, steps, events, guarded=False)
    if insert is not None:
        ctes.insert(0, _INSERT_COMMAND)
        params.update(
            {
                f"cmd_{c.name}": _json(insert.get(c.name, {}))
                if c.name in _JSON_COLUMNS
                else insert.get(c.name)
                for c in _INSERTED_COLUMNS
            }
        )
        (row,) = await fetch(on, _returning_new(tuple(ctes)), params)
        return Fetched(row)
    if ctes:
        await fetch(on, statement(ctes), params)
    return None


async def write_unchanged(
    on: Driver,
    changed: Sequence[tuple[domain.Command, datetime]],
    steps: Sequence[TransitionRow],
    events: StagedInsert | None,
    read_versions: Mapping[str, int],
) -> set[str]:
    """As `write`, for commands read without a lock (`read_versions`: id → `row_version` as
    read): only those still at that version are written, with their transitions and the events
    staged as theirs (see `outbox.staged_insert`'s `owned`); returns the ids written."""
    if not changed:
        return set()
    ctes, params = _writes(changed, steps, events, guarded=True)
    params["row_versions"] = [read_versions[c.id] for c, _ in changed]
    rows = await fetch(on, statement(ctes, "SELECT id FROM saved"), params)
    return {row["id"] for row in rows}


def _writes(
    changed: Sequence[tuple[domain.Command, datetime]],
    steps: Sequence[TransitionRow],
    events: StagedInsert | None,
    *,
    guarded: bool,
) -> tuple[list[str], dict[str, Any]]:
    ctes: list[str] = []
    params: dict[str, Any] = {}
    if changed:
        ctes.append(_SAVE_UNCHANGED if guarded else _SAVE_ALL)
        params.update(
            row_ids=[c.id for c, _ in changed],
            row_statuses=[c.status for c, _ in changed],
            row_details=[c.detail for c, _ in changed],
            row_device_results=[c.device_result for c, _ in changed],
            row_device_result_ats=[c.device_result_at for c, _ in changed],
            row_acked_ats=[c.acked_at for c, _ in changed],
            row_ota_phases=[c.ota_phase for c, _ in changed],
            row_ota_progresses=[c.ota_progress for c, _ in changed],
            row_updated_ats=[at for _, at in changed],
            row_versions=[None] * len(changed),
        )
    if steps:
        ctes.append(_ADD_SAVED_TRANSITIONS if guarded else _ADD_TRANSITIONS)
        params.update(
            step_command_ids=[t.command_id for t in steps],
            step_statuses=[t.status for t in steps],
            step_details=[t.detail for t in steps],
            step_reporters=[t.reporter for t in steps],
            step_ats=[t.at for t in steps],
        )
    if events is not None:
        ctes.extend(events.ctes)
        params.update(events.params)
    return ctes, params


def _returning_new(ctes: tuple[str, ...]) -> TextualSelect:
    """`WITH <ctes> SELECT * FROM new_command`, its columns typed like the table's."""
    found = _INSERTED.get(ctes)
    if found is None:
        found = _INSERTED[ctes] = statement(ctes, "SELECT * FROM new_command").columns(*commands.c)
    return found


def _json(value: Any) -> str:
    # Text without SQLAlchemy's types: JSON goes as its text, as the JSONB type would send it.
    return json.dumps(value)


@dataclass(frozen=True)
class CommandView:
    """A command, its device's ownership snapshot (None if unknown or deleted) and its history."""

    row: Row[Any]
    device: domain.Device | None
    history: list[TransitionRow]


def _view_query() -> Select[Any]:
    steps = (
        select(
            func.json_agg(
                aggregate_order_by(
                    func.json_build_array(
                        transitions.c.status,
                        transitions.c.detail,
                        transitions.c.reporter,
                        transitions.c.at,
                    ),
                    transitions.c.id,
                ),
                type_=JSON,
            )
        )
        .where(transitions.c.command_id == commands.c.id)
        .scalar_subquery()
    )
    return (
        select(
            commands,
            devices.c.dealer_id,
            devices.c.customer_email,
            devices.c.model,
            devices.c.engine,
            devices.c.transport,
            devices.c.deleted.label("device_deleted"),
            steps.label("history"),
        )
        .select_from(commands.outerjoin(devices, devices.c.device_id == commands.c.device_id))
        .where(commands.c.id == bindparam("command_id"))
    )


_VIEW = _view_query()


async def command_view(conn: Conn, command_id: str) -> CommandView | None:
    """A command with its device and history in one statement (one snapshot: on an autocommit
    connection, a GET is one round trip instead of BEGIN, three queries and ROLLBACK)."""
    row = (await conn.execute(_VIEW, {"command_id": command_id})).first()
    if row is None:
        return None
    device = None if row.dealer_id is None or row.device_deleted else _device(row.device_id, row)
    steps = [
        TransitionRow(command_id, status, detail, reporter, _timestamp(at))
        for status, detail, reporter, at in row.history or ()
    ]
    return CommandView(row, device, steps)


def _timestamp(value: str) -> datetime:
    # JSON carries timestamps as text, in the session's time zone.
    return datetime.fromisoformat(value).astimezone(UTC)


async def list_for_device(
    conn: Conn, device_id: str, *, limit: int, after: tuple[datetime, str] | None
) -> list[Row[Any]]:
    """A device's commands, newest first, after the cursor position."""
    query = select(commands).where(commands.c.device_id == device_id)
    if after is not None:
        query = query.where(
            tuple_(commands.c.created_at, commands.c.id)
            < tuple_(literal(after[0]), literal(after[1]))
        )
    query = query.order_by(commands.c.created_at.desc(), commands.c.id.desc()).limit(limit)
    return list((await conn.execute(query)).all())


async def due(
    conn: Conn, now: datetime, *, run_state_cutoff: datetime, limit: int
) -> list[Row[Any]]:
    """Active commands whose time ran out (locked; rows another replica holds are skipped)."""
    expired = (
        select(commands)
        .where(commands.c.status.in_(domain.ACTIVE), commands.c.expires_at <= now)
        .order_by(commands.c.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    unconfirmed = (
        select(commands)
        .where(
            commands.c.status == "acked",
            commands.c.device_result == "succeeded",
            commands.c.device_result_at <= run_state_cutoff,
            commands.c.action.in_(tuple(domain.RUN_STATE_OF)),
        )
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = {row.id: row for row in (await conn.execute(expired)).all()}
    for row in (await conn.execute(unconfirmed)).all():
        rows.setdefault(row.id, row)
    return list(rows.values())
