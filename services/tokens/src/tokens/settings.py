"""Settings of the tokens service (environment prefix `TOKENS_`)."""

from typing import ClassVar

from pydantic import SecretStr

from common.settings import DatabaseSettings, service_config


class TokensSettings(DatabaseSettings):
    """Everything the tokens service reads from its environment."""

    model_config = service_config("TOKENS_")
    service_name: ClassVar[str] = "tokens"

    http_port: int = 8101

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://tokens:tokens-dev@127.0.0.1:55432/tokens"
    )
