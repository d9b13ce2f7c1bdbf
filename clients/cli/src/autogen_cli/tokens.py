"""`autogen tokens`: scoped API tokens for integrations (the secret is shown once)."""

from enum import StrEnum
from typing import Annotated

import typer
from rich.text import Text

from autogen_cli import output
from autogen_cli.context import options
from autogen_cli.output import AllOption, Column, Format, LimitOption, OutputOption

app = typer.Typer(help="List, create and revoke API tokens.", no_args_is_help=True)


class Access(StrEnum):
    """What a token may do."""

    read = "read"
    control = "control"


COLUMNS: list[Column] = [
    ("id", lambda t: t.get("id")),
    ("name", lambda t: t.get("name")),
    ("user", lambda t: t.get("user_id")),
    ("access", lambda t: t.get("access")),
    ("devices", lambda t: t.get("device_ids") or "all in scope"),
    ("expires", lambda t: t.get("expires_at")),
    ("last used", lambda t: t.get("last_used_at")),
    ("revoked", lambda t: t.get("revoked_at")),
]


@app.command("list")
def list_tokens(
    ctx: typer.Context,
    *,
    limit: LimitOption = 50,
    every: AllOption = False,
    fmt: OutputOption = Format.table,
) -> None:
    """List the API tokens in your scope, without their secrets (GET /tokens)."""
    with options(ctx).client() as api:
        found = api.tokens(limit=None if every else limit)
    output.listing(found, fmt, COLUMNS, what="tokens")


@app.command("create")
def create(
    ctx: typer.Context,
    *,
    name: Annotated[str, typer.Option("--name", help="What the token is for.")],
    access: Annotated[
        Access, typer.Option("--access", help="read, or control (may send commands).")
    ] = Access.read,
    user_id: Annotated[
        str | None,
        typer.Option("--user", help="Account the token acts as (default: yourself)."),
    ] = None,
    device_ids: Annotated[
        list[str] | None,
        typer.Option(
            "--device", "-d", metavar="DEVICE_ID", help="Restrict to these devices (repeatable)."
        ),
    ] = None,
    expires_in_days: Annotated[
        int, typer.Option("--expires-in-days", min=1, help="Lifetime in days.")
    ] = 90,
    fmt: OutputOption = Format.table,
) -> None:
    """Create an API token (POST /tokens) and print its secret: it is shown only this once.

    With -o json the whole answer (including `token`, the secret) goes to stdout.
    """
    with options(ctx).client() as api:
        owner = user_id or str(api.me()["user_id"])
        created = api.create_token(
            name=name,
            user_id=owner,
            access=access.value,
            device_ids=device_ids or None,
            expires_in_days=expires_in_days,
        )
    if fmt is Format.json:
        output.print_json(created)
        return
    output.details(
        [(label, created.get(key)) for label, key in _FIELDS], title=f"Token {created.get('id')}"
    )
    output.stdout().print(Text.assemble(("secret: ", "bold"), str(created.get("token"))))
    output.note("Copy the secret now: it cannot be shown again.")


_FIELDS = [
    ("name", "name"),
    ("user", "user_id"),
    ("access", "access"),
    ("devices", "device_ids"),
    ("expires", "expires_at"),
    ("created", "created_at"),
]


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    *,
    token_id: Annotated[
        str, typer.Argument(metavar="TOKEN_ID", help="Token id (from tokens list).")
    ],
) -> None:
    """Revoke an API token (DELETE /tokens/{id}); it stops working within a second."""
    with options(ctx).client() as api:
        api.revoke_token(token_id)
    output.note(f"Token {token_id} revoked.")
