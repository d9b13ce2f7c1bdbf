"""Settings of the console service (environment prefix `CONSOLE_`)."""

from typing import ClassVar

from common.settings import ServiceSettings, service_config


class ConsoleSettings(ServiceSettings):
    """Everything the console service reads from its environment."""

    model_config = service_config("CONSOLE_")
    service_name: ClassVar[str] = "console"

    http_port: int = 8106
