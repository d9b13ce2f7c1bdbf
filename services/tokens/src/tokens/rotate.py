"""`python -m tokens rotate-keys`: start a key rotation now (e.g. after a suspected leak)."""

import argparse
import asyncio
import sys

from common.db import make_engine
from tokens.app import key_policy
from tokens.keys import KeyRing
from tokens.settings import TokensSettings


async def rotate(settings: TokensSettings) -> str:
    """Create the next key; returns its kid."""
    engine = make_engine(settings.database_url.get_secret_value(), pool_size=1)
    ring = KeyRing(settings.key_encryption_secret.get_secret_value())
    try:
        async with engine.begin() as conn:
            await ring.ensure(conn, key_policy(settings), force=True)
    finally:
        await engine.dispose()
    return ring.keys[0].kid


def main(argv: list[str]) -> int:
    """Entry point of `python -m tokens rotate-keys`."""
    argparse.ArgumentParser(prog="python -m tokens rotate-keys").parse_args(argv)
    settings = TokensSettings()
    kid = asyncio.run(rotate(settings))
    sys.stdout.write(
        f"new signing key {kid}: published now, signs after {settings.key_publish_lead_s} s\n"
    )
    return 0
