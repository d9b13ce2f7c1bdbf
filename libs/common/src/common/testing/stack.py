"""Finding (or starting) the servers tests run against, and per-session resources on them."""

import contextlib
import os
import shlex
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

STACK_ENV = Path(".local") / "stack.env"


@dataclass(frozen=True)
class StackAddresses:
    """Where the servers listen."""

    kafka_bootstrap_servers: str
    pg_admin_url: str
    redis_url: str
    mqtt_host: str | None = None
    mqtt_port: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "StackAddresses | None":
        """Read `AUTOGEN_*` variables; None when the essential ones are missing."""
        kafka = env.get("AUTOGEN_KAFKA_BOOTSTRAP_SERVERS")
        pg = env.get("AUTOGEN_PG_ADMIN_URL")
        redis = env.get("AUTOGEN_REDIS_URL")
        if not (kafka and pg and redis):
            return None
        port = env.get("AUTOGEN_MQTT_PORT")
        return cls(
            kafka_bootstrap_servers=kafka,
            pg_admin_url=pg,
            redis_url=redis,
            mqtt_host=env.get("AUTOGEN_MQTT_HOST"),
            mqtt_port=int(port) if port else None,
        )


def load_stack_env(start: Path) -> None:
    """Export `.local/stack.env` from the nearest enclosing repo, for unset variables only."""
    for folder in (start, *start.parents):
        candidate = folder / STACK_ENV
        if candidate.is_file():
            for line in candidate.read_text().splitlines():
                words = shlex.split(line, comments=True)
                if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                    key, _, value = words[1].partition("=")
                    os.environ.setdefault(key, value)
            return


@contextlib.contextmanager
def start_containers() -> Iterator[StackAddresses | None]:
    """Start Kafka, PostgreSQL and Redis with testcontainers; yields None without Docker."""
    try:
        from testcontainers.community.kafka import KafkaContainer  # noqa: PLC0415
        from testcontainers.community.postgres import PostgresContainer  # noqa: PLC0415
        from testcontainers.community.redis import RedisContainer  # noqa: PLC0415

        kafka = KafkaContainer("apache/kafka:4.1.1").with_kraft()
        postgres = PostgresContainer("postgres:15", driver=None)
        redis = RedisContainer("redis:7")
        kafka.start()
    except Exception:  # noqa: BLE001 - no Docker engine (or no image): the caller explains
        yield None
        return
    try:
        postgres.start()
        redis.start()
        yield StackAddresses(
            kafka_bootstrap_servers=kafka.get_bootstrap_server(),
            pg_admin_url=postgres.get_connection_url(),
            redis_url=f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0",
        )
    finally:
        for container in (redis, postgres, kafka):
            with contextlib.suppress(Exception):
                container.stop()


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _plain(url: str) -> str:
    """asyncpg wants `postgresql://`, SQLAlchemy URLs name the driver."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def create_database(admin_url: str, name: str) -> str:
    """Create database `name`; returns its SQLAlchemy (asyncpg) URL for the admin role."""
    conn = await asyncpg.connect(_plain(admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_database(_plain(admin_url), name).replace(
        "postgresql://", "postgresql+asyncpg://", 1
    )


async def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name`, ending sessions still connected to it."""
    conn = await asyncpg.connect(_plain(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def delete_topics_with_prefix(bootstrap: str, prefix: str) -> int:
    """Delete every topic whose name starts with `prefix`; returns how many went."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="autogen-tests")
    await admin.start()
    try:
        doomed = [name for name in await admin.list_topics() if name.startswith(prefix)]
        if doomed:
            await admin.delete_topics(doomed)
        return len(doomed)
    finally:
        await admin.close()


async def create_topics(bootstrap: str, names: list[str], *, partitions: int = 3) -> None:
    """Create topics (replication factor 1, the local stack's single broker); existing are kept."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="autogen-tests")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name=name, num_partitions=partitions, replication_factor=1)
            for name in names
            if name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


def free_port() -> int:
    """A TCP port free on loopback right now (for a server a test or benchmark starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
