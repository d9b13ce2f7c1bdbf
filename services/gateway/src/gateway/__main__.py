"""`python -m gateway serve|migrate`."""

import sys

from common.runner import run_cli
from gateway.settings import GatewaySettings


def main() -> int:
    """Entry point of the service's command line."""
    return run_cli(
        package="gateway", settings_factory=GatewaySettings, app_factory="gateway.app:create_app"
    )


if __name__ == "__main__":
    sys.exit(main())
