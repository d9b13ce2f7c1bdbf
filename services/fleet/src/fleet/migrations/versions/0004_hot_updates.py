"""Let live-state updates stay HOT: no index on the position, free space in every page.

Telemetry rewrites a device's row many times a minute. An UPDATE that changes no indexed column
and finds room on the same page is a HOT update: PostgreSQL then touches none of the indexes
(three of them are trigram GIN indexes, the costliest to maintain). The (lon, lat) index made
every position change a full update; the map filters by scope first (dealer index) and by the
box on the remaining rows instead. The ring of recent positions drops its foreign key: its
per-row check cost more than the rest of a telemetry batch (120 ms of 220 ms for 2,000
devices), and rows reach it only from devices the same statement just updated.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_devices_position", table_name="devices")
    op.execute("ALTER TABLE devices SET (fillfactor = 70)")
    op.drop_constraint("device_positions_device_id_fkey", "device_positions", type_="foreignkey")


def downgrade() -> None:
    op.create_foreign_key(
        "device_positions_device_id_fkey",
        "device_positions",
        "devices",
        ["device_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.execute("ALTER TABLE devices RESET (fillfactor)")
    op.execute(
        "CREATE INDEX ix_devices_position ON devices (lon, lat) WHERE gps AND lat IS NOT NULL"
    )
