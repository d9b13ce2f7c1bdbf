"""Settings of the firmware service (environment prefix `FIRMWARE_`)."""

from typing import ClassVar

from pydantic import SecretStr

from common.settings import DatabaseSettings, service_config


class FirmwareSettings(DatabaseSettings):
    """Everything the firmware service reads from its environment."""

    model_config = service_config("FIRMWARE_")
    service_name: ClassVar[str] = "firmware"

    http_port: int = 8104

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://firmware:firmware-dev@127.0.0.1:55432/firmware"
    )
