"""`python -m tokens serve|migrate`."""

import sys

from common.runner import run_cli
from tokens.settings import TokensSettings


def main() -> int:
    """Entry point of the service's command line."""
    return run_cli(
        package="tokens", settings_factory=TokensSettings, app_factory="tokens.app:create_app"
    )


if __name__ == "__main__":
    sys.exit(main())
