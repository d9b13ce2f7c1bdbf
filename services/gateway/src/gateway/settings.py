"""Settings of the gateway service (environment prefix `GATEWAY_`)."""

from typing import ClassVar

from pydantic import SecretStr

from common.settings import DatabaseSettings, service_config


class GatewaySettings(DatabaseSettings):
    """Everything the gateway service reads from its environment."""

    model_config = service_config("GATEWAY_")
    service_name: ClassVar[str] = "gateway"

    http_port: int = 8105

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://gateway:gateway-dev@127.0.0.1:55432/gateway"
    )
