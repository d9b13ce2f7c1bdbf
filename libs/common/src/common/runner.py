"""The command line every service shares: `python -m <service> serve|migrate`."""

import argparse
import sys
from collections.abc import Callable, Sequence

import uvicorn

from common.logging import configure_logging
from common.migrations import upgrade
from common.settings import DatabaseSettings, ServiceSettings


def run_cli(
    *,
    package: str,
    settings_factory: Callable[[], ServiceSettings],
    app_factory: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse the command line and run the service's command; returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m {package}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the HTTP API and the service's consumers")
    sub.add_parser("migrate", help="bring the service's database schema up to date")
    args = parser.parse_args(argv)
    settings = settings_factory()
    configure_logging(package, level=settings.log_level, json_output=settings.log_json)

    if args.command == "migrate":
        if not isinstance(settings, DatabaseSettings):
            sys.stdout.write(f"{package}: no database, nothing to migrate\n")
            return 0
        upgrade(settings.database_url.get_secret_value(), package)
        return 0

    uvicorn.run(
        app_factory,
        factory=True,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        timeout_graceful_shutdown=10,
    )
    return 0
