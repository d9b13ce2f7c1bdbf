"""Replicas that start together may migrate together: all must succeed, and migrate once."""

import asyncio
import os
import sys

import asyncpg
import pytest

from common.testing.plugin import Migrate

pytestmark = pytest.mark.stack


@pytest.mark.parametrize("service", ["fleet", "commands"])
async def test_three_migrations_at_once_all_succeed(service: str, fresh_database: Migrate) -> None:
    url = await fresh_database(f"empty_{service}")  # not a package: an empty database
    env = {**os.environ, f"{service.upper()}_DATABASE_URL": url}
    # Separate processes, as in a cluster (Alembic's context is process-global).
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            service,
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    async with asyncio.timeout(120):
        outputs = [await process.communicate() for process in processes]
    for process, (output, _) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output.decode()[-2000:]
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        versions = await conn.fetch("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    assert len(versions) == 1
