"""Fixtures for the fleet service's tests: a migrated database, the app, tokens, a fake gateway."""

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from pydantic import SecretStr

from common.auth import Principal
from common.testing.auth import TestIssuer
from common.testing.plugin import Migrate
from common.testing.stack import StackAddresses
from fleet.app import create_app
from fleet.gateway_client import GatewayError, MqttCredentials
from fleet.settings import FleetSettings


@dataclass
class FakeGateway:
    """Issues predictable credentials, or fails while `down` is set."""

    down: bool = False
    issued: dict[str, str] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)

    async def issue(self, device_id: str, *, internal_token: str) -> MqttCredentials:
        self.tokens.append(internal_token)
        if self.down:
            raise GatewayError("gateway unreachable: ConnectError")
        password = f"pw-{uuid.uuid4().hex}"
        self.issued[device_id] = password
        return MqttCredentials(device_id, device_id, device_id, password)

    async def revoke(self, device_id: str, *, internal_token: str) -> None:
        self.issued.pop(device_id, None)


@pytest.fixture(scope="session")
def issuer() -> TestIssuer:
    return TestIssuer()


@pytest.fixture(scope="session")
async def fleet_db(fresh_database: Migrate) -> str:
    return await fresh_database("fleet")


def settings_for(stack: StackAddresses, url: str, prefix: str = "") -> FleetSettings:
    return FleetSettings(
        database_url=SecretStr(url),
        kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
        redis_url=SecretStr(stack.redis_url),
        kafka_topic_prefix=prefix,
        outbox_poll_interval_s=0.05,
        telemetry_batch_timeout_ms=50,
    )


@dataclass
class Api:
    """An HTTP client of the app that signs requests as a given principal."""

    client: httpx.AsyncClient
    issuer: TestIssuer
    gateway: FakeGateway
    settings: FleetSettings

    def as_(self, principal: Principal) -> dict[str, str]:
        return self.issuer.headers(principal)


@pytest.fixture
async def api(stack: StackAddresses, fleet_db: str, issuer: TestIssuer) -> AsyncIterator[Api]:
    settings = settings_for(stack, fleet_db)
    gateway = FakeGateway()
    app = create_app(settings, verifier=issuer.verifier(), issuer=gateway)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
        yield Api(client=client, issuer=issuer, gateway=gateway, settings=settings)
    await app.state.infra.engine.dispose()


class Helpers:
    """Principals and request bodies (a fixture: tests do not import conftest)."""

    @staticmethod
    def admin() -> Principal:
        return Principal(user_id="admin-1", email="admin@autogen.local", role="admin")

    @staticmethod
    def dealer(dealer_id: str, **extra: object) -> Principal:
        return Principal(
            user_id=f"staff-{dealer_id}", email=f"staff@{dealer_id}.test", role="dealer",
            dealer_id=dealer_id, **extra,
        )  # fmt: skip

    @staticmethod
    def customer(dealer_id: str, email: str, **extra: object) -> Principal:
        return Principal(
            user_id=f"cust-{email}", email=email, role="customer", dealer_id=dealer_id,
            **extra,
        )  # fmt: skip

    @staticmethod
    def unique(prefix: str = "T") -> str:
        """A fresh id fragment, so tests sharing one database never see each other's devices."""
        return f"{prefix}{uuid.uuid4().hex[:8].upper()}"

    @staticmethod
    def registration(
        device_id: str, dealer_id: str | None, **overrides: object
    ) -> dict[str, object]:
        body: dict[str, object] = {
            "id": device_id,
            "name": f"Generator {device_id}",
            "model": "D100",
            "engine": "diesel",
            "transport": "gsm",
            "gps": True,
            "dealer_id": dealer_id,
            "customer_email": None,
            "firmware_version": "2.4.1",
        }
        body.update(overrides)
        return body


@pytest.fixture(scope="session")
def h() -> type[Helpers]:
    return Helpers
