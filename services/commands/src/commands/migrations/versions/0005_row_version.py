"""A version per command row, bumped by every write: a batch that read the row without a lock
writes it only if nothing else wrote it since (see `commands.progress`, the unlocked path).

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
    op.add_column(
        "commands",
        sa.Column("row_version", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    op.drop_column("commands", "row_version")
