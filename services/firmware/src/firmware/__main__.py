"""`python -m firmware serve|migrate`."""

import sys

from common.runner import run_cli
from firmware.settings import FirmwareSettings


def main() -> int:
    """Entry point of the service's command line."""
    return run_cli(
        package="firmware", settings_factory=FirmwareSettings, app_factory="firmware.app:create_app"
    )


if __name__ == "__main__":
    sys.exit(main())
