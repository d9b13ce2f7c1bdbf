"""`python -m console serve|migrate`."""

import sys

from common.runner import run_cli
from console.settings import ConsoleSettings


def main() -> int:
    """Entry point of the service's command line."""
    return run_cli(
        package="console", settings_factory=ConsoleSettings, app_factory="console.app:create_app"
    )


if __name__ == "__main__":
    sys.exit(main())
