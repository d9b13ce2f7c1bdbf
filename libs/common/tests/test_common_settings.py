"""`common.settings`: where a value comes from, and refusing development defaults in production."""

import os

import pytest
from pydantic import SecretStr, ValidationError

from common.settings import (
    DatabaseSettings,
    Environment,
    InsecureSettingsError,
    ServiceSettings,
    service_config,
)

REAL_DB_URL = "postgresql+asyncpg://fleet:Zq8-real-s3cret@db.internal:5432/fleet"
REAL_REDIS_URL = "redis://:Zq8-real-s3cret@redis.internal:6379/0"


class FleetSettings(DatabaseSettings):
    """A database service, configured like the real fleet service."""

    model_config = service_config("FLEET_")
    service_name = "fleet"


class PlainSettings(ServiceSettings):
    """A service without a database."""

    model_config = service_config("PLAIN_")
    service_name = "plain"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variable of the developer's shell or the stack plugin may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith(("AUTOGEN_", "FLEET_", "PLAIN_")):
            monkeypatch.delenv(name)


def test_default_applies_without_any_variable() -> None:
    settings = FleetSettings()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.env is Environment.DEVELOPMENT


def test_shared_autogen_variable_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGEN_KAFKA_BOOTSTRAP_SERVERS", "shared-kafka:9092")
    assert FleetSettings().kafka_bootstrap_servers == "shared-kafka:9092"


def test_service_variable_wins_over_the_shared_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGEN_KAFKA_BOOTSTRAP_SERVERS", "shared-kafka:9092")
    monkeypatch.setenv("FLEET_KAFKA_BOOTSTRAP_SERVERS", "fleet-kafka:9092")
    assert FleetSettings().kafka_bootstrap_servers == "fleet-kafka:9092"
    # Another service's variable is not ours: it still sees the shared value.
    assert PlainSettings().kafka_bootstrap_servers == "shared-kafka:9092"


def test_shared_prefix_fills_fields_the_service_variables_leave_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUTOGEN_KAFKA_TOPIC_PREFIX", "shared.")
    monkeypatch.setenv("FLEET_HTTP_PORT", "8123")
    settings = FleetSettings()
    assert settings.kafka_topic_prefix == "shared."
    assert settings.http_port == 8123


def test_explicit_argument_wins_over_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGEN_KAFKA_BOOTSTRAP_SERVERS", "shared-kafka:9092")
    monkeypatch.setenv("FLEET_KAFKA_BOOTSTRAP_SERVERS", "fleet-kafka:9092")
    assert FleetSettings(kafka_bootstrap_servers="arg:9092").kafka_bootstrap_servers == "arg:9092"


def test_production_refuses_the_development_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEET_ENV", "production")
    with pytest.raises(InsecureSettingsError, match="database_url") as caught:
        FleetSettings()
    # The secret itself is not echoed.
    assert "service-dev" not in str(caught.value)


def test_production_refusal_raises_insecure_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEET_ENV", "production")
    with pytest.raises(InsecureSettingsError, match="database_url"):
        FleetSettings()


@pytest.mark.parametrize(
    "marked_url",
    [
        "postgresql+asyncpg://fleet:fleet-dev@db.internal/fleet",
        "postgresql+asyncpg://fleet:CHANGEME@db.internal/fleet",
        "postgresql+asyncpg://fleet:insecure@db.internal/fleet",
    ],
)
def test_production_refuses_every_development_marker(marked_url: str) -> None:
    with pytest.raises(InsecureSettingsError, match="database_url"):
        FleetSettings(env=Environment.PRODUCTION, database_url=SecretStr(marked_url))


def test_production_names_every_offending_field() -> None:
    with pytest.raises(InsecureSettingsError) as caught:
        FleetSettings(
            env=Environment.PRODUCTION,
            redis_url=SecretStr("redis://:changeme@redis.internal/0"),
        )
    assert "database_url, redis_url" in str(caught.value)


@pytest.mark.parametrize("env", ["development", "test"])
def test_development_and_test_accept_the_defaults(
    monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    monkeypatch.setenv("FLEET_ENV", env)
    settings = FleetSettings()
    assert settings.env == env
    assert "-dev" in settings.database_url.get_secret_value()


def test_production_with_real_values_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGEN_ENV", "production")
    monkeypatch.setenv("FLEET_DATABASE_URL", REAL_DB_URL)
    monkeypatch.setenv("AUTOGEN_REDIS_URL", REAL_REDIS_URL)
    settings = FleetSettings()
    assert settings.env is Environment.PRODUCTION
    assert settings.database_url.get_secret_value() == REAL_DB_URL


def test_topic_name_applies_the_topic_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FleetSettings().topic_name("fleet.device.v1") == "fleet.device.v1"
    monkeypatch.setenv("FLEET_KAFKA_TOPIC_PREFIX", "test-abc.")
    assert FleetSettings().topic_name("fleet.device.v1") == "test-abc.fleet.device.v1"


def test_client_id_defaults_to_the_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FleetSettings().client_id == "fleet"
    monkeypatch.setenv("FLEET_KAFKA_CLIENT_ID", "fleet-7")
    assert FleetSettings().client_id == "fleet-7"


def test_out_of_range_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_DATABASE_POOL_SIZE", "0")
    with pytest.raises(ValidationError, match="database_pool_size"):
        FleetSettings()
