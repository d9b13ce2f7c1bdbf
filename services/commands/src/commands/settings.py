"""Settings of the commands service (environment prefix `COMMANDS_`)."""

from typing import ClassVar

from pydantic import SecretStr

from common.settings import DatabaseSettings, service_config


class CommandsSettings(DatabaseSettings):
    """Everything the commands service reads from its environment."""

    model_config = service_config("COMMANDS_")
    service_name: ClassVar[str] = "commands"

    http_port: int = 8103

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://commands:commands-dev@127.0.0.1:55432/commands"
    )
