"""The pace anchored to the rollout's start (exact over a run), and the failure threshold's
minimum sample.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rollouts created before keep the old behaviour (judged from the first finished device).
    op.add_column(
        "rollouts",
        sa.Column(
            "failure_min_finished", sa.Integer(), server_default=sa.text("1"), nullable=False
        ),
    )
    op.alter_column("rollouts", "failure_min_finished", server_default=sa.text("10"))
    op.add_column(
        "rollouts", sa.Column("pace_anchor_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "rollouts",
        sa.Column("pace_sent", sa.Float(), server_default=sa.text("0"), nullable=False),
    )
    # An unfinished rollout's pace starts over from now with its current bucket as credit.
    op.execute(
        "UPDATE rollouts SET pace_anchor_at = coalesce(bucket_at, now()), "
        "pace_sent = 1 - bucket_tokens"
    )
    op.drop_column("rollouts", "bucket_tokens")
    op.drop_column("rollouts", "bucket_at")


def downgrade() -> None:
    op.add_column(
        "rollouts",
        sa.Column("bucket_tokens", sa.Float(), server_default=sa.text("1"), nullable=False),
    )
    op.add_column("rollouts", sa.Column("bucket_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE rollouts SET bucket_at = pace_anchor_at")
    op.drop_column("rollouts", "pace_sent")
    op.drop_column("rollouts", "pace_anchor_at")
    op.drop_column("rollouts", "failure_min_finished")
