"""The commands service's tables (its own database; no other service reads them) and queries."""

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    MetaData,
    Row,
    String,
    Table,
    Text,
    literal,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from commands import domain
from common.idempotency import processed_events_table
from common.outbox import outbox_table

metadata = MetaData()
outbox = outbox_table(metadata)
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
    Index("ix_commands_device_created", "device_id", "created_at", "id"),
    Index(
        "ix_commands_active_expiry",
        "expires_at",
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


# ------------------------------------------------------------------ projections


async def get_device(conn: Conn, device_id: str, *, lock: bool = False) -> domain.Device | None:
    """The device's ownership snapshot (None if unknown or deleted); `lock` serialises accepts."""
    query = select(devices).where(devices.c.device_id == device_id)
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    if row is None or row.deleted:
        return None
    return domain.Device(
        device_id=row.device_id,
        dealer_id=row.dealer_id,
        customer_email=row.customer_email,
        model=row.model,
        engine=row.engine,
        transport=row.transport,
    )


async def upsert_device(conn: Conn, values: dict[str, Any]) -> None:
    """Store the latest snapshot of a device."""
    stmt = insert(devices).values(**values)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[devices.c.device_id],
            set_={k: stmt.excluded[k] for k in values if k != "device_id"},
        )
    )


async def upsert_release(conn: Conn, values: dict[str, Any]) -> None:
    """Store the latest description of a release."""
    stmt = insert(releases).values(**values)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[releases.c.release_id],
            set_={k: stmt.excluded[k] for k in values if k != "release_id"},
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


async def get_state(conn: Conn, device_id: str) -> Row[Any] | None:
    """The device's last presence and run state."""
    return (
        await conn.execute(select(device_state).where(device_state.c.device_id == device_id))
    ).first()


async def record_presence(
    conn: Conn, device_id: str, *, online: bool, fw: str | None, at: datetime
) -> None:
    """Store a presence report unless a newer one is known."""
    stmt = insert(device_state).values(device_id=device_id, online=online, fw=fw, presence_at=at)
    newer = or_(device_state.c.presence_at.is_(None), device_state.c.presence_at <= at)
    fw_value = stmt.excluded.fw if fw is not None else device_state.c.fw
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[device_state.c.device_id],
            set_={"online": stmt.excluded.online, "fw": fw_value, "presence_at": at},
            where=newer,
        )
    )


async def record_run_state(conn: Conn, device_id: str, *, run_state: str, at: datetime) -> None:
    """Store a telemetry run state unless a newer one is known."""
    stmt = insert(device_state).values(device_id=device_id, run_state=run_state, run_state_at=at)
    newer = or_(device_state.c.run_state_at.is_(None), device_state.c.run_state_at <= at)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[device_state.c.device_id],
            set_={"run_state": run_state, "run_state_at": at},
            where=newer,
        )
    )


# ------------------------------------------------------------------ commands


def to_domain(row: Row[Any]) -> domain.Command:
    """The lifecycle's view of a stored command."""
    return domain.Command(
        id=row.id,
        device_id=row.device_id,
        action=row.action,
        status=row.status,
        created_at=row.created_at,
        expires_at=row.expires_at,
        detail=row.detail,
        device_result=row.device_result,
        device_result_at=row.device_result_at,
        ota_version=row.ota_version,
        ota_phase=row.ota_phase,
        ota_progress=row.ota_progress,
        acked_at=row.acked_at,
        correlation=dict(row.correlation or {}),
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


async def insert_command(conn: Conn, values: dict[str, Any]) -> None:
    """Store a new command."""
    await conn.execute(commands.insert().values(**values))


async def save(conn: Conn, cmd: domain.Command, at: datetime) -> None:
    """Write the lifecycle fields of `cmd` back."""
    await conn.execute(
        commands.update()
        .where(commands.c.id == cmd.id)
        .values(
            status=cmd.status,
            detail=cmd.detail,
            device_result=cmd.device_result,
            device_result_at=cmd.device_result_at,
            acked_at=cmd.acked_at,
            ota_phase=cmd.ota_phase,
            ota_progress=cmd.ota_progress,
            updated_at=at,
        )
    )


async def add_transition(
    conn: Conn, command_id: str, *, status: str, detail: str | None, reporter: str, at: datetime
) -> None:
    """Record one lifecycle transition with its time."""
    await conn.execute(
        transitions.insert().values(
            command_id=command_id, status=status, detail=detail, reporter=reporter, at=at
        )
    )


async def history(conn: Conn, command_id: str) -> list[Row[Any]]:
    """Every transition of a command, in order."""
    query = select(transitions).where(transitions.c.command_id == command_id)
    return list((await conn.execute(query.order_by(transitions.c.id))).all())


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
