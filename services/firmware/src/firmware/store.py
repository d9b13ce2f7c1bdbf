"""The firmware service's tables (its own database; no other service reads them)."""

from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from common.events import Envelope
from common.idempotency import processed_events_table
from common.outbox import outbox_table
from common.telemetry import current_trace_headers

metadata = MetaData()
outbox = outbox_table(metadata)
processed_events = processed_events_table(metadata)

# Projection of fleet.device.v1 and device.presence.v1: what rollouts need to know of a device.
devices = Table(
    "devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("dealer_id", String(64), nullable=False),
    Column("customer_email", String(320), nullable=True),
    Column("model", String(32), nullable=False),
    Column("engine", String(32), nullable=True),
    Column("transport", String(8), nullable=False),
    Column("gps", Boolean, nullable=False, server_default=text("false")),
    Column("test_device", Boolean, nullable=False, server_default=text("false")),
    Column("deleted", Boolean, nullable=False, server_default=text("false")),
    Index("ix_devices_dealer_model", "dealer_id", "model"),
)

# Projection of device.presence.v1, apart from `devices` because either topic may be read first.
device_presence = Table(
    "device_presence",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("online", Boolean, nullable=False),
    Column("fw", String(64), nullable=True),
    Column("presence_at", DateTime(timezone=True), nullable=False),
)


def devices_with_presence() -> Select[Any]:
    """Devices with their last known connection state and firmware (`online`, `fw`)."""
    return select(devices, device_presence.c.online, device_presence.c.fw).outerjoin(
        device_presence, device_presence.c.device_id == devices.c.device_id
    )


releases = Table(
    "releases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("console", String(16), nullable=False),
    Column("version", String(64), nullable=False),
    Column("models", JSONB, nullable=False),
    Column("engine", String(32), nullable=True),
    Column("transport", String(8), nullable=True),
    Column("artifact_url", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("notes", Text, nullable=False, server_default=""),
    Column("withdrawn", Boolean, nullable=False, server_default=text("false")),
    Column("created_by", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_releases_console_version", "console", "version", "engine", "transport"),
)

# A rollout, or a validation (a one-device rollout on a test device: purpose = 'validation').
rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("purpose", String(16), nullable=False),
    Column("release_id", String(64), ForeignKey("releases.id"), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("dealer_id", String(64), nullable=True),
    Column("target", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("batch_size", Integer, nullable=False),
    Column("max_per_minute", Integer, nullable=True),
    Column("failure_threshold_pct", Float, nullable=False),
    Column("failure_min_finished", Integer, nullable=False, server_default=text("10")),
    Column("status", String(16), nullable=False),
    Column("status_reason", Text, nullable=True),
    Column("override_reason", Text, nullable=True),
    Column("skipped", Integer, nullable=False, server_default=text("0")),
    # The pace of max_per_minute, kept here so replicas and restarts share one pace: devices
    # sent since `pace_anchor_at` (the start, the last resume, or the end of a long stall).
    Column("pace_anchor_at", DateTime(timezone=True), nullable=True),
    Column("pace_sent", Float, nullable=False, server_default=text("0")),
    # Failures already seen when the rollout was last resumed (they do not pause it again).
    Column("acknowledged_failed", Integer, nullable=False, server_default=text("0")),
    Column("created_by", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("ix_rollouts_status", "status"),
    Index("ix_rollouts_release_dealer", "release_id", "dealer_id", "purpose"),
)

rollout_devices = Table(
    "rollout_devices",
    metadata,
    Column("rollout_id", String(64), ForeignKey("rollouts.id"), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("dealer_id", String(64), nullable=False),
    Column("transport", String(8), nullable=False),
    Column("gps", Boolean, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("command_id", String(64), nullable=True),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    Column("deadline_at", DateTime(timezone=True), nullable=True),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Column("reported_version", String(64), nullable=True),
    Column("last_report", Text, nullable=True),
    Column("detail", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # A device is in at most one active rollout: the database refuses a second one.
    Index(
        "uq_rollout_devices_active_device",
        "device_id",
        unique=True,
        postgresql_where=text("state IN ('pending', 'sent', 'updating', 'awaiting_return')"),
    ),
    Index(
        "ix_rollout_devices_pending",
        "rollout_id",
        "seq",
        postgresql_where=text("state = 'pending'"),
    ),
    Index(
        "ix_rollout_devices_deadline",
        "deadline_at",
        postgresql_where=text("state IN ('sent', 'updating', 'awaiting_return')"),
    ),
)

# Admin overrides and other decisions someone must be able to answer for later.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("object_id", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
)


def outbox_row(topic_name: str, event: Envelope[Any]) -> dict[str, Any]:
    """A row for `outbox`, like `common.outbox.add_event` writes, for bulk inserts."""
    headers = current_trace_headers()
    headers["content-type"] = "application/json"
    headers["event-type"] = event.type
    return {
        "event_id": event.event_id,
        "topic": topic_name,
        "key": event.key,
        "payload": event.model_dump_json().encode(),
        "headers": headers,
    }


async def insert_outbox(conn: AsyncSession | AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Stage many events in the caller's transaction in one statement."""
    if rows:
        await conn.execute(outbox.insert(), rows)
