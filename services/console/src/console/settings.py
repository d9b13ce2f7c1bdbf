"""Settings of the console service (environment prefix `CONSOLE_`)."""

from typing import ClassVar, Literal

from pydantic import Field, SecretStr

from common.settings import ServiceSettings, service_config


class ConsoleSettings(ServiceSettings):
    """Everything the console service reads from its environment."""

    model_config = service_config("CONSOLE_")
    service_name: ClassVar[str] = "console"

    http_port: int = 8106
    # The public API, reached like any client does: through the API gateway.
    api_base_url: str = "http://127.0.0.1:8080/api/v1"
    api_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # Signs the per-session CSRF tokens; refused outside development while it holds "-dev".
    secret_key: SecretStr = SecretStr("console-dev-secret-key")
    # Leaflet tile URL template (`https://tile.example/{z}/{x}/{y}.png`); empty: no tiles, the
    # map still shows its markers on a blank background.
    tile_url: str = ""
    tile_attribution: str = ""
    # "auto": Secure cookies when the request reached us over https (X-Forwarded-Proto).
    secure_cookies: Literal["auto", "always", "never"] = "auto"
    # How often live parts of the pages poll the console (seconds).
    poll_interval_s: int = Field(default=3, ge=1, le=60)
