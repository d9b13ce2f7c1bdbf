"""Devices with their live state, recent positions, and trigram search indexes.

pg_trgm is a trusted extension (PostgreSQL 13+), so the database's owner (the `fleet` role,
not a superuser) may create it.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("model", sa.String(32), nullable=False),
        sa.Column("engine", sa.String(32), nullable=True),
        sa.Column("transport", sa.String(8), nullable=False),
        sa.Column("gps", sa.Boolean(), nullable=False),
        sa.Column("dealer_id", sa.String(64), nullable=False),
        sa.Column("customer_email", sa.String(254), nullable=True),
        sa.Column("test_device", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("firmware_version", sa.String(64), nullable=True),
        sa.Column("connection", sa.String(8), nullable=False, server_default="offline"),
        sa.Column("last_seen_at", tz, nullable=True),
        sa.Column("presence_at", tz, nullable=True),
        sa.Column("telemetry_at", tz, nullable=True),
        sa.Column("run_state", sa.String(16), nullable=True),
        sa.Column("battery_v", sa.Float(), nullable=True),
        sa.Column("fuel_pct", sa.Float(), nullable=True),
        sa.Column("engine_hours", sa.Float(), nullable=True),
        sa.Column("lat", sa.Float(), nullable=True),
        sa.Column("lon", sa.Float(), nullable=True),
        sa.Column("position_at", tz, nullable=True),
        sa.Column("position_seq", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", tz, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", tz, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("connection IN ('live', 'offline')", name="ck_devices_connection"),
        sa.CheckConstraint("transport IN ('gsm', 'wifi')", name="ck_devices_transport"),
    )
    op.create_index("ix_devices_dealer_id", "devices", ["dealer_id", "id"])
    op.create_index("ix_devices_dealer_customer", "devices", ["dealer_id", "customer_email"])
    for column in ("id", "name", "customer_email"):
        op.create_index(
            f"ix_devices_{column}_trgm",
            "devices",
            [column],
            postgresql_using="gin",
            postgresql_ops={column: "gin_trgm_ops"},
        )
    op.create_index(
        "ix_devices_position",
        "devices",
        ["lon", "lat"],
        postgresql_where=sa.text("gps AND lat IS NOT NULL"),
    )
    op.create_table(
        "device_positions",
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("lat", sa.Float(), nullable=False),
        sa.Column("lon", sa.Float(), nullable=False),
        sa.Column("at", tz, nullable=False),
        sa.PrimaryKeyConstraint("device_id", "slot"),
    )


def downgrade() -> None:
    op.drop_table("device_positions")
    op.drop_table("devices")
