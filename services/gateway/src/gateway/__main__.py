"""`python -m gateway serve|migrate|release-session`."""

import sys

from common.runner import run_cli
from gateway import release
from gateway.settings import GatewaySettings


def main() -> int:
    """Entry point of the service's command line."""
    return run_cli(
        package="gateway",
        settings_factory=GatewaySettings,
        app_factory="gateway.app:create_app",
        extra_commands={
            "release-session": (
                "end a gone replica's broker session, forwarding what it holds",
                release.main,
            )
        },
    )


if __name__ == "__main__":
    sys.exit(main())
