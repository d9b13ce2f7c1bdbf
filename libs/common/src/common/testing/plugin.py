"""Pytest fixtures for tests against the real servers.

Addresses come from the environment that `deploy/local/stack` writes (`.local/stack.env`, read
here when the variables are not already set). Where they are unset and a Docker engine works,
the same fixtures start Kafka, PostgreSQL and Redis with testcontainers. Each test session gets
fresh databases (dropped at the end) and a unique Kafka topic prefix.
"""

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.testing.stack import (
    StackAddresses,
    create_database,
    create_topics,
    delete_topics_with_prefix,
    drop_database,
    load_stack_env,
    start_containers,
)

Migrate = Callable[[str], Awaitable[str]]


@pytest.fixture(scope="session")
def stack() -> Iterator[StackAddresses]:
    """Addresses of Kafka, PostgreSQL, Redis and Mosquitto for this test session."""
    load_stack_env(Path.cwd())
    addresses = StackAddresses.from_env(os.environ)
    if addresses is not None:
        yield addresses
        return
    with start_containers() as started:
        if started is None:
            pytest.fail(
                "no servers to test against: start the local stack (`deploy/local/stack start`, "
                "which writes .local/stack.env) or provide a Docker engine for testcontainers"
            )
        yield started


@pytest.fixture(scope="session")
def topic_prefix() -> Iterator[str]:
    """A prefix no other test session uses, so old records never leak into these tests.

    The session's topics are deleted at the end: left behind, thousands of them slow the
    local broker down for everyone (metadata, log segments, controller work).
    """
    prefix = f"test-{uuid.uuid4().hex[:10]}."
    yield prefix
    addresses = StackAddresses.from_env(os.environ)
    if addresses is not None:
        with contextlib.suppress(Exception):  # cleanup must never fail a green session
            asyncio.run(delete_topics_with_prefix(addresses.kafka_bootstrap_servers, prefix))


@dataclass
class KafkaTopics:
    """Creates prefixed topics for this session on demand."""

    bootstrap: str
    prefix: str

    async def create(self, *names: str, partitions: int = 3) -> list[str]:
        """Create `prefix + name` for each name; returns the real topic names."""
        real = [self.prefix + name for name in names]
        await create_topics(self.bootstrap, real, partitions=partitions)
        return real


@pytest.fixture(scope="session")
def kafka_topics(stack: StackAddresses, topic_prefix: str) -> KafkaTopics:
    """Topic factory bound to this session's prefix."""
    return KafkaTopics(bootstrap=stack.kafka_bootstrap_servers, prefix=topic_prefix)


@pytest.fixture(scope="session")
async def fresh_database(stack: StackAddresses) -> AsyncIterator[Migrate]:
    """`await fresh_database("fleet")`: a new database migrated by that service's migrations.

    Pass a package with migrations to migrate, or any name for an empty database.
    Every database made this way is dropped when the session ends.
    """
    made: list[str] = []

    async def make(package: str) -> str:
        name = f"test_{package}_{uuid.uuid4().hex[:10]}"
        url = await create_database(stack.pg_admin_url, name)
        made.append(name)
        if _has_migrations(package):
            from common.migrations import upgrade  # noqa: PLC0415 - alembic only when needed

            await asyncio.to_thread(upgrade, url, package)
        return url

    yield make
    for name in made:
        await drop_database(stack.pg_admin_url, name)


def _has_migrations(package: str) -> bool:
    from importlib import resources  # noqa: PLC0415
    from importlib.util import find_spec  # noqa: PLC0415

    if find_spec(package) is None:
        return False
    return (resources.files(package) / "migrations" / "env.py").is_file()
