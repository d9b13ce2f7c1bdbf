"""Active commands by device: the batch consumers look them up for a whole poll of devices.

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
    op.create_index(
        "ix_commands_active_device",
        "commands",
        ["device_id"],
        postgresql_where=sa.text("status IN ('queued', 'sent', 'acked')"),
    )


def downgrade() -> None:
    op.drop_index("ix_commands_active_device", table_name="commands")
