"""`python -m commands serve|migrate`."""

import sys

from commands.settings import CommandsSettings
from common.runner import run_cli


def main() -> int:
    """Entry point of the service's command line."""
    return run_cli(
        package="commands", settings_factory=CommandsSettings, app_factory="commands.app:create_app"
    )


if __name__ == "__main__":
    sys.exit(main())
