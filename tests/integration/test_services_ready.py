"""Every service starts against the real servers, migrates its database and reports ready."""

import asyncio
import importlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from pydantic import SecretStr

from common.settings import DatabaseSettings, ServiceSettings
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("declared_topics")]

SERVICES = ["tokens", "fleet", "commands", "firmware", "gateway", "console"]
DB_SERVICES = ["tokens", "fleet", "commands", "firmware", "gateway"]


DECLARED = Path(__file__).resolve().parents[2] / "deploy" / "topics.yaml"


@pytest.fixture(scope="module")
async def declared_topics(kafka_topics: KafkaTopics) -> None:
    """This session's copies of every declared topic (services read some at start)."""
    names = [topic["name"] for topic in yaml.safe_load(DECLARED.read_text())["topics"]]
    await kafka_topics.create(*names)


async def build(
    service: str,
    stack: StackAddresses,
    fresh_database: Migrate,
    topic_prefix: str,
    **overrides: Any,
) -> FastAPI:
    settings_module = importlib.import_module(f"{service}.settings")
    settings_cls: type[ServiceSettings] = getattr(
        settings_module, f"{service.capitalize()}Settings"
    )
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": stack.kafka_bootstrap_servers,
        "redis_url": SecretStr(stack.redis_url),
        # Never join the running platform's consumer groups on the real topics.
        "kafka_topic_prefix": topic_prefix,
    }
    if issubclass(settings_cls, DatabaseSettings):
        values["database_url"] = SecretStr(await fresh_database(service))
    values.update(overrides)
    app_module = importlib.import_module(f"{service}.app")
    app: FastAPI = app_module.create_app(settings_cls(**values))
    return app


async def probe(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        return await client.get(path)


async def ready_within(app: FastAPI, *, seconds: float) -> httpx.Response:
    """Poll /readyz like an orchestrator: connections (MQTT, Kafka) come up after start."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        ready = await probe(app, "/readyz")
        if ready.status_code == 200 or loop.time() > deadline:
            return ready
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("service", SERVICES)
async def test_service_is_ready_against_the_real_stack(
    service: str, stack: StackAddresses, fresh_database: Migrate, topic_prefix: str
) -> None:
    app = await build(service, stack, fresh_database, topic_prefix)
    async with app.router.lifespan_context(app):
        live = await probe(app, "/healthz")
        ready = await ready_within(app, seconds=30)
    assert live.status_code == 200
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    if service == "console":
        assert checks == {}
    else:
        assert set(checks) >= {"kafka", "redis"}
        assert all(check["ok"] for check in checks.values())
    if service in DB_SERVICES:
        assert checks["database"]["ok"]


@pytest.mark.parametrize("service", ["fleet", "gateway"])
async def test_service_reports_unready_when_a_dependency_is_down(
    service: str, stack: StackAddresses, fresh_database: Migrate, topic_prefix: str
) -> None:
    # Nothing listens on port 9 (discard) of the loopback: Redis is "down" for this app.
    app = await build(
        service, stack, fresh_database, topic_prefix, redis_url=SecretStr("redis://127.0.0.1:9/0")
    )
    async with app.router.lifespan_context(app):
        ready = await probe(app, "/readyz")
    assert ready.status_code == 503
    assert ready.headers["content-type"].startswith("application/problem+json")
    body = ready.json()
    assert "redis" in body["detail"]
    assert body["checks"]["redis"]["ok"] is False
    assert body["checks"]["kafka"]["ok"] is True
