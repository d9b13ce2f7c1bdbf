"""`python -m fleet serve|migrate|seed`."""

import sys

from common.runner import run_cli
from fleet import seed
from fleet.settings import FleetSettings


def main() -> int:
    """Entry point of the service's command line."""
    return run_cli(
        package="fleet",
        settings_factory=FleetSettings,
        app_factory="fleet.app:create_app",
        extra_commands={"seed": ("register the demo fleet through the public API", seed.main)},
    )


if __name__ == "__main__":
    sys.exit(main())
