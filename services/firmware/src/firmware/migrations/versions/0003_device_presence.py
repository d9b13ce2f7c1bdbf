"""Presence apart from the device registry projection: either topic may be read first.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_presence",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("fw", sa.String(length=64), nullable=True),
        sa.Column("presence_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.execute(
        "INSERT INTO device_presence (device_id, online, fw, presence_at) "
        "SELECT device_id, coalesce(online, false), fw, presence_at FROM devices "
        "WHERE presence_at IS NOT NULL"
    )
    op.drop_column("devices", "presence_at")
    op.drop_column("devices", "fw")
    op.drop_column("devices", "online")


def downgrade() -> None:
    op.add_column("devices", sa.Column("online", sa.Boolean(), nullable=True))
    op.add_column("devices", sa.Column("fw", sa.String(length=64), nullable=True))
    op.add_column("devices", sa.Column("presence_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE devices d SET online = p.online, fw = p.fw, presence_at = p.presence_at "
        "FROM device_presence p WHERE p.device_id = d.device_id"
    )
    op.drop_table("device_presence")
