"""Settings of the fleet service (environment prefix `FLEET_`)."""

from typing import ClassVar

from pydantic import SecretStr

from common.settings import DatabaseSettings, service_config


class FleetSettings(DatabaseSettings):
    """Everything the fleet service reads from its environment."""

    model_config = service_config("FLEET_")
    service_name: ClassVar[str] = "fleet"

    http_port: int = 8102

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://fleet:fleet-dev@127.0.0.1:55432/fleet"
    )
