"""The reported firmware keeps its own event time.

Telemetry moves `presence_at` forward (a device sending telemetry is connected), so a status
message carrying the firmware that was consumed after newer telemetry lost its `fw` along with
its (older) connection state. `firmware_at` orders firmware reports among themselves.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("firmware_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("devices", "firmware_at")
