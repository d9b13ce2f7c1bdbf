"""Commands, their transitions, and the device, device-state and release projections.

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

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "commands",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("params", postgresql.JSONB(), nullable=False),
        sa.Column("dispatch_params", postgresql.JSONB(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("requested_by", sa.String(200), nullable=False),
        sa.Column("requested_by_email", sa.String(320), nullable=True),
        sa.Column("token_id", sa.String(64), nullable=True),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("idempotency_scope", sa.String(200), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column(
            "correlation",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column("device_result", sa.String(16), nullable=True),
        sa.Column("device_result_at", _TS, nullable=True),
        sa.Column("acked_at", _TS, nullable=True),
        sa.Column("ota_version", sa.String(64), nullable=True),
        sa.Column("ota_phase", sa.String(16), nullable=True),
        sa.Column("ota_progress", sa.Float(), nullable=True),
    )
    op.create_index("ix_commands_device_created", "commands", ["device_id", "created_at", "id"])
    op.create_index(
        "ix_commands_active_expiry",
        "commands",
        ["expires_at"],
        postgresql_where=sa.text("status IN ('queued', 'sent', 'acked')"),
    )
    op.create_index(
        "ix_commands_awaiting_run_state",
        "commands",
        ["device_result_at"],
        postgresql_where=sa.text("status = 'acked' AND device_result = 'succeeded'"),
    )
    op.create_index(
        "ux_commands_idempotency",
        "commands",
        ["idempotency_scope", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_table(
        "command_transitions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
        sa.Column("command_id", sa.String(64), sa.ForeignKey("commands.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("reporter", sa.String(16), nullable=False),
        sa.Column("at", _TS, nullable=False),
    )
    op.create_index("ix_command_transitions_command", "command_transitions", ["command_id", "id"])
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("dealer_id", sa.String(64), nullable=False),
        sa.Column("customer_email", sa.String(320), nullable=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("engine", sa.String(64), nullable=True),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )
    op.create_table(
        "device_state",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("online", sa.Boolean(), nullable=True),
        sa.Column("fw", sa.String(64), nullable=True),
        sa.Column("presence_at", _TS, nullable=True),
        sa.Column("run_state", sa.String(16), nullable=True),
        sa.Column("run_state_at", _TS, nullable=True),
    )
    op.create_table(
        "releases",
        sa.Column("release_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("models", postgresql.JSONB(), nullable=False),
        sa.Column("engine", sa.String(64), nullable=True),
        sa.Column("transport", sa.String(16), nullable=True),
        sa.Column("artifact_url", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("withdrawn", sa.Boolean(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("releases")
    op.drop_table("device_state")
    op.drop_table("devices")
    op.drop_table("command_transitions")
    op.drop_table("commands")
