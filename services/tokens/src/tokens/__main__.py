"""`python -m tokens serve|migrate|seed|rotate-keys`."""

import sys

from common.runner import run_cli
from tokens.settings import TokensSettings


def _seed(argv: list[str]) -> int:
    from tokens.seed import main  # noqa: PLC0415 - only this command needs it

    return main(argv)


def _rotate(argv: list[str]) -> int:
    from tokens.rotate import main  # noqa: PLC0415

    return main(argv)


def main() -> int:
    """Entry point of the service's command line."""
    return run_cli(
        package="tokens",
        settings_factory=TokensSettings,
        app_factory="tokens.app:create_app",
        extra_commands={
            "seed": ("create the demo accounts and print their logins", _seed),
            "rotate-keys": (
                "publish a new signing key now (it signs after the lead time)",
                _rotate,
            ),
        },
    )


if __name__ == "__main__":
    sys.exit(main())
