"""Fixtures for the commands service's tests against the real stack."""

from collections.abc import AsyncIterator

import httpx
import pytest

from commands.app import create_app
from commands.testing import TOPICS, Api, Bus, new_id, settings_for
from common.testing.auth import TestIssuer
from common.testing.plugin import KafkaTopics, Migrate
from common.testing.stack import StackAddresses


@pytest.fixture(scope="session")
def issuer() -> TestIssuer:
    return TestIssuer()


@pytest.fixture(scope="session")
async def topics(kafka_topics: KafkaTopics) -> list[str]:
    return await kafka_topics.create(*(t.name for t in TOPICS))


@pytest.fixture(scope="session")
async def commands_db(fresh_database: Migrate) -> str:
    return await fresh_database("commands")


@pytest.fixture
async def api(
    stack: StackAddresses,
    commands_db: str,
    topics: list[str],
    topic_prefix: str,
    issuer: TestIssuer,
) -> AsyncIterator[Api]:
    app = create_app(settings_for(stack, commands_db, topic_prefix), verifier=issuer.verifier())
    bus = Bus(stack.kafka_bootstrap_servers, topic_prefix)
    await bus.start()
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://commands") as client:
                yield Api(client, issuer, bus, app)
    finally:
        await bus.stop()


@pytest.fixture
async def device_id(api: Api) -> str:
    """A D100 of dealer-1 that the service's projection knows."""
    found = new_id()
    await api.bus.device_registered(found, dealer_id="dealer-1", model="D100")
    await api.known(found)
    return found
