"""Rollouts: device projection, releases, rollouts and validations, per-device progress, audit log.

A device is in at most one active rollout: a partial unique index on rollout_devices.device_id.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("object_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("dealer_id", sa.String(length=64), nullable=False),
        sa.Column("customer_email", sa.String(length=320), nullable=True),
        sa.Column("model", sa.String(length=32), nullable=False),
        sa.Column("engine", sa.String(length=32), nullable=True),
        sa.Column("transport", sa.String(length=8), nullable=False),
        sa.Column("gps", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("test_device", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("deleted", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=True),
        sa.Column("fw", sa.String(length=64), nullable=True),
        sa.Column("presence_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_index("ix_devices_dealer_model", "devices", ["dealer_id", "model"], unique=False)
    op.create_table(
        "releases",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("console", sa.String(length=16), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("models", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("engine", sa.String(length=32), nullable=True),
        sa.Column("transport", sa.String(length=8), nullable=True),
        sa.Column("artifact_url", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("notes", sa.Text(), server_default="", nullable=False),
        sa.Column("withdrawn", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_releases_console_version",
        "releases",
        ["console", "version", "engine", "transport"],
        unique=False,
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("release_id", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("dealer_id", sa.String(length=64), nullable=True),
        sa.Column(
            "target",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("max_per_minute", sa.Integer(), nullable=True),
        sa.Column("failure_threshold_pct", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("override_reason", sa.Text(), nullable=True),
        sa.Column("skipped", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("bucket_tokens", sa.Float(), server_default=sa.text("1"), nullable=False),
        sa.Column("bucket_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_failed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["release_id"],
            ["releases.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_rollouts_release_dealer",
        "rollouts",
        ["release_id", "dealer_id", "purpose"],
        unique=False,
    )
    op.create_index("ix_rollouts_status", "rollouts", ["status"], unique=False)
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("dealer_id", sa.String(length=64), nullable=False),
        sa.Column("transport", sa.String(length=8), nullable=False),
        sa.Column("gps", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("command_id", sa.String(length=64), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reported_version", sa.String(length=64), nullable=True),
        sa.Column("last_report", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    op.create_index(
        "ix_rollout_devices_deadline",
        "rollout_devices",
        ["deadline_at"],
        unique=False,
        postgresql_where=sa.text("state IN ('sent', 'updating', 'awaiting_return')"),
    )
    op.create_index(
        "ix_rollout_devices_pending",
        "rollout_devices",
        ["rollout_id", "seq"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "uq_rollout_devices_active_device",
        "rollout_devices",
        ["device_id"],
        unique=True,
        postgresql_where=sa.text("state IN ('pending', 'sent', 'updating', 'awaiting_return')"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_rollout_devices_active_device",
        table_name="rollout_devices",
        postgresql_where=sa.text("state IN ('pending', 'sent', 'updating', 'awaiting_return')"),
    )
    op.drop_index(
        "ix_rollout_devices_pending",
        table_name="rollout_devices",
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.drop_index(
        "ix_rollout_devices_deadline",
        table_name="rollout_devices",
        postgresql_where=sa.text("state IN ('sent', 'updating', 'awaiting_return')"),
    )
    op.drop_table("rollout_devices")
    op.drop_index("ix_rollouts_status", table_name="rollouts")
    op.drop_index("ix_rollouts_release_dealer", table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_index("ix_releases_console_version", table_name="releases")
    op.drop_table("releases")
    op.drop_index("ix_devices_dealer_model", table_name="devices")
    op.drop_table("devices")
    op.drop_table("audit_log")
