"""Plan every query for its own parameters (no generic plans from prepared statements).

asyncpg prepares every statement; after five runs PostgreSQL may switch a prepared statement to
a generic plan, which cannot see an `ILIKE $1` pattern or a bbox and picks a scan of the whole
table in id order: seconds instead of a millisecond at a million devices. The fleet's queries
depend on their parameters, so the database plans each one for its own (a USERSET setting the
database's owner may change).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "DO $$ BEGIN EXECUTE format("
        "'ALTER DATABASE %I SET plan_cache_mode = force_custom_plan', current_database()); END $$"
    )


def downgrade() -> None:
    op.execute(
        "DO $$ BEGIN EXECUTE format("
        "'ALTER DATABASE %I RESET plan_cache_mode', current_database()); END $$"
    )
