"""`python -m tokens seed [--out PATH]`: the demo's accounts, idempotent.

Creates the admin (from the environment), two dealers, and for each two staff accounts and
three customer accounts with fixed demo logins; writes them as JSON (mode 0600) and prints them.
Dealers are looked up by name, so their ids stay the same across runs.
"""

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from common.db import make_engine, make_sessionmaker
from common.migrations import upgrade
from common.redis import make_redis
from tokens.cache import VerifyCache
from tokens.handlers import Context, ensure_dealer, ensure_user
from tokens.keys import KeyRing
from tokens.settings import TokensSettings

DEFAULT_OUT = Path(".local") / "demo" / "accounts.json"

DEMO_DEALERS = [
    ("North Power Services", "north"),
    ("Southern Generators", "south"),
]
_NUMBERS = ["One", "Two", "Three"]


def demo_accounts(slug: str, label: str) -> dict[str, list[dict[str, str]]]:
    """The fixed staff and customer logins of one demo dealer."""
    staff = [
        {
            "email": f"staff{n}@{slug}.example",
            "password": f"demo-pass-{n}",
            "name": f"{label} staff {_NUMBERS[n - 1].lower()}",
        }
        for n in (1, 2)
    ]
    customers = [
        {
            "email": f"owner{n}@{slug}-customer.example",
            "password": f"demo-pass-{n}",
            "name": f"{label} customer {_NUMBERS[n - 1].lower()}",
        }
        for n in (1, 2, 3)
    ]
    return {"staff": staff, "customers": customers}


async def seed(settings: TokensSettings) -> dict[str, Any]:
    """Create what is missing; returns the accounts document."""
    engine = make_engine(settings.database_url.get_secret_value(), pool_size=2)
    redis = make_redis(settings.redis_url.get_secret_value())
    ctx = Context(
        settings=settings,
        sessions=make_sessionmaker(engine),
        redis=redis,
        keys=KeyRing(settings.key_encryption_secret.get_secret_value()),
        cache=VerifyCache(redis, ttl_s=1, local_ttl_s=0),
    )
    try:
        admin_password = settings.admin_password.get_secret_value()
        await ensure_user(ctx, email=settings.admin_email, password=admin_password,
                          name="Platform admin", role="admin", dealer_id=None)  # fmt: skip
        dealers = []
        for name, slug in DEMO_DEALERS:
            dealer_id = await ensure_dealer(ctx, name=name)
            accounts = demo_accounts(slug, name.split()[0])
            entry: dict[str, Any] = {"id": dealer_id, "name": name, "staff": [], "customers": []}
            for kind, role in (("staff", "dealer"), ("customers", "customer")):
                for account in accounts[kind]:
                    user_id = await ensure_user(ctx, role=role, dealer_id=dealer_id, **account)  # type: ignore[arg-type]
                    entry[kind].append({**account, "id": user_id})
            dealers.append(entry)
    finally:
        await redis.aclose()
        await engine.dispose()
    return {
        "admin": {"email": settings.admin_email, "password": admin_password},
        "dealers": dealers,
    }


def write_private(path: Path, document: dict[str, Any]) -> None:
    """Write JSON readable by the owner only (it holds passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(document, out, indent=2)
        out.write("\n")
    path.chmod(0o600)


def table(document: dict[str, Any]) -> str:
    """The logins as a readable table."""
    rows = [("admin", "-", document["admin"]["email"], document["admin"]["password"])]
    for dealer in document["dealers"]:
        for kind, label in (("staff", "dealer staff"), ("customers", "customer")):
            rows.extend((label, dealer["name"], a["email"], a["password"]) for a in dealer[kind])
    widths = [
        max(len(r[i]) for r in [("ROLE", "DEALER", "EMAIL", "PASSWORD"), *rows]) for i in range(4)
    ]
    lines = [("ROLE", "DEALER", "EMAIL", "PASSWORD"), *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines
    )


def main(argv: list[str]) -> int:
    """Entry point of `python -m tokens seed`."""
    parser = argparse.ArgumentParser(
        prog="python -m tokens seed", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    settings = TokensSettings()
    upgrade(settings.database_url.get_secret_value(), "tokens")
    document = asyncio.run(seed(settings))
    write_private(args.out, document)
    sys.stdout.write(f"Demo logins (also in {args.out}):\n{table(document)}\n")
    return 0
