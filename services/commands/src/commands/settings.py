"""Settings of the commands service (environment prefix `COMMANDS_`)."""

from typing import ClassVar

from pydantic import Field, SecretStr

from common.settings import DatabaseSettings, service_config


class CommandsSettings(DatabaseSettings):
    """Everything the commands service reads from its environment."""

    model_config = service_config("COMMANDS_")
    service_name: ClassVar[str] = "commands"

    http_port: int = 8103

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://commands:commands-dev@127.0.0.1:55432/commands"
    )
    jwks_url: str = "http://127.0.0.1:8101/.well-known/jwks.json"
    # How often the service expires commands past their TTL and fails unconfirmed Start/Stop.
    sweep_interval_s: float = Field(default=1.0, gt=0, le=60)
    # How long after the device says Start/Stop is done its telemetry has to show the new
    # run state before the command counts as failed.
    run_state_window_s: float = Field(default=60.0, gt=0, le=3600)
    # Publish an accepted command's outbox row right after the commit instead of at the
    # relay's next poll (saves up to one poll interval of latency per command).
    relay_kick: bool = True
