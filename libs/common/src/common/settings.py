"""Settings base for every service.

A service subclasses `ServiceSettings` with its own env prefix (`FLEET_`, `TOKENS_`, ...).
Infrastructure addresses shared by all services may also come from the `AUTOGEN_` prefix, so
one environment file serves the whole local stack while a service-specific variable still wins.
Settings are never built at import time: `app.py` builds them inside the app factory.
"""

from enum import StrEnum
from typing import Any, ClassVar, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SHARED_ENV_PREFIX = "AUTOGEN_"
# Development defaults that must never reach a real deployment.
INSECURE_MARKERS = ("-dev", "changeme", "insecure")


class Environment(StrEnum):
    """Where the process runs; only `development` and `test` accept the local defaults."""

    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class OtelExporter(StrEnum):
    """Where traces go."""

    NONE = "none"
    CONSOLE = "console"
    OTLP = "otlp"


class InsecureSettingsError(Exception):
    """A development default was left in place outside development.

    Not a ValueError on purpose: pydantic would wrap that in a ValidationError, and a process
    that refuses to start should say exactly why.
    """


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set `model_config = service_config("FLEET_")`."""

    service_name: ClassVar[str] = "service"

    env: Environment = Environment.DEVELOPMENT
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # Worker processes for the HTTP server; each runs the whole app (consumers split by group).
    http_workers: int = Field(default=1, ge=1, le=32)
    # Proxies whose X-Forwarded-* headers are trusted (the API gateway); "*" inside a network
    # where only the gateway can reach the service.
    forwarded_allow_ips: str = "127.0.0.1"
    log_level: str = "INFO"
    log_json: bool = True

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_client_id: str | None = None
    kafka_linger_ms: int = Field(default=5, ge=0, le=1000)
    # Prepended to every topic name: test sessions isolate themselves with a unique prefix.
    kafka_topic_prefix: str = ""
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:56379/0")

    otel_exporter: OtelExporter = OtelExporter.NONE
    otel_endpoint: str | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Service prefix first, then the shared `AUTOGEN_` prefix, then secrets files."""
        shared = EnvSettingsSource(settings_cls, env_prefix=SHARED_ENV_PREFIX)
        return init_settings, env_settings, shared, dotenv_settings, file_secret_settings

    @model_validator(mode="after")
    def _refuse_insecure_defaults(self) -> Self:
        if self.env in (Environment.DEVELOPMENT, Environment.TEST):
            return self
        offending = [name for name, value in self._secret_values() if _looks_insecure(value)]
        if offending:
            raise InsecureSettingsError(
                f"{', '.join(sorted(offending))} still hold development defaults; "
                f"set real values for env={self.env.value}"
            )
        return self

    def _secret_values(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for name in type(self).model_fields:
            value: Any = getattr(self, name)
            if isinstance(value, SecretStr):
                found.append((name, value.get_secret_value()))
        return found

    def topic_name(self, name: str) -> str:
        """The real Kafka topic for a contract's topic name."""
        return self.kafka_topic_prefix + name

    @property
    def client_id(self) -> str:
        """Kafka client id: explicit, or the service name."""
        return self.kafka_client_id or type(self).service_name


def _looks_insecure(value: str) -> bool:
    lowered = value.lower()
    return any(marker in lowered for marker in INSECURE_MARKERS)


def service_config(prefix: str) -> SettingsConfigDict:
    """The `model_config` a service's settings class uses."""
    return SettingsConfigDict(env_prefix=prefix, extra="ignore", secrets_dir=None)


class DatabaseSettings(ServiceSettings):
    """A service that owns a PostgreSQL database."""

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://service:service-dev@127.0.0.1:55432/service"
    )
    database_pool_size: int = Field(default=10, ge=1, le=100)
    outbox_batch_size: int = Field(default=1000, ge=1, le=10000)
    outbox_poll_interval_s: float = Field(default=0.1, gt=0, le=10)
    # Send the outbox's eager topics right after their commit (`common.outbox`); false leaves
    # every event to the relay's rounds (one relay at a time: the order across replicas).
    outbox_eager: bool = True
