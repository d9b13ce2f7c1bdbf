"""The command line every service shares: `python -m <service> serve|migrate`."""

import argparse
import gc
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence

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
    extra_commands: Mapping[str, tuple[str, Callable[[list[str]], int]]] | None = None,
) -> int:
    """Parse the command line and run the service's command; returns the exit code.

    `extra_commands` maps a command name to (help, function); the function receives the
    remaining arguments and parses them itself (e.g. a service's `seed`).
    """
    extra = dict(extra_commands or {})
    parser = argparse.ArgumentParser(prog=f"python -m {package}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the HTTP API and the service's consumers")
    sub.add_parser("migrate", help="bring the service's database schema up to date")
    for name, (help_text, _) in extra.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    settings = settings_factory()
    configure_logging(package, level=settings.log_level, json_output=settings.log_json)

    if args.command in extra:
        return extra[args.command][1](rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    if args.command == "migrate":
        if not isinstance(settings, DatabaseSettings):
            sys.stdout.write(f"{package}: no database, nothing to migrate\n")
            return 0
        upgrade(settings.database_url.get_secret_value(), package)
        return 0

    freeze_import_heap(app_factory)
    uvicorn.run(
        app_factory,
        factory=True,
        host=settings.http_host,
        port=settings.http_port,
        workers=settings.http_workers,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=10,
    )
    return 0


def freeze_import_heap(app_factory: str) -> None:
    """Import the app's modules and move everything alive then out of the collector's sight.

    A serving process carries ~150,000 objects from its imports (modules, classes, pydantic and
    SQLAlchemy schemas) for its whole life, and every full collection walked all of them: on
    the command path a pause of 125-170 ms, now and then (`bench/commands_roundtrip.py`,
    services/commands/README.md "Benchmark"). Frozen, they are never walked again; they are
    still freed by reference counting. Uvicorn's worker processes (`http_workers` > 1) import
    the app themselves and do not get this.
    """
    importlib.import_module(app_factory.partition(":")[0])
    gc.collect()
    gc.freeze()
