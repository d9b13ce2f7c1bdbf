"""Alembic, driven from code: each service ships its migrations inside its package.

A service's `migrations/env.py` is two lines: it calls `run_env(metadata)`. The service CLI's
`migrate` command calls `upgrade(url, package)`.
"""

import asyncio
from importlib import resources

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine


def alembic_config(database_url: str, package: str) -> Config:
    """An Alembic config for `<package>.migrations` against `database_url`."""
    config = Config()
    config.set_main_option("script_location", str(resources.files(package) / "migrations"))
    # Alembic's config is ConfigParser-based: a literal % must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, package: str, revision: str = "head") -> None:
    """Bring the service's database to `revision`."""
    command.upgrade(alembic_config(database_url, package), revision)


def run_env(metadata: MetaData) -> None:
    """Body of a service's `env.py`: run migrations online over asyncpg."""
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("sqlalchemy.url is not set")

    def _migrate(connection: Connection) -> None:
        context.configure(connection=connection, target_metadata=metadata, compare_type=True)
        with context.begin_transaction():
            # Replicas starting together (Kubernetes init containers) migrate one at a time;
            # the later ones then find nothing to do.
            connection.exec_driver_sql(
                "SELECT pg_advisory_xact_lock(hashtext('alembic:' || current_database()))"
            )
            context.run_migrations()

    async def _run() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        async with engine.connect() as conn:
            await conn.run_sync(_migrate)
        await engine.dispose()

    asyncio.run(_run())


def create_messaging_tables_v1() -> None:
    """Migration step: the outbox and processed-events tables, version 1 of their schema.

    Frozen: a later change to these tables gets a new function and a new migration.
    """
    import sqlalchemy as sa  # noqa: PLC0415 - only migrations need the op-level API
    from alembic import op  # noqa: PLC0415
    from sqlalchemy.dialects import postgresql  # noqa: PLC0415

    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
        sa.Column("event_id", sa.Uuid(), nullable=False, unique=True),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("key", sa.String(200), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_table(
        "processed_events",
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("consumer", "event_id"),
    )


def drop_messaging_tables_v1() -> None:
    """Undo `create_messaging_tables_v1`."""
    from alembic import op  # noqa: PLC0415

    op.drop_table("processed_events")
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")
