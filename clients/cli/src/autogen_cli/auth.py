"""`autogen login`, `logout`, `whoami`: who the CLI calls the API as."""

from typing import Annotated

import typer

from autogen_cli import output
from autogen_cli.context import forget_session, options, save_session
from autogen_cli.output import Format, OutputOption


def login(
    ctx: typer.Context,
    email: Annotated[
        str, typer.Option("--email", "-e", prompt=True, envvar="AUTOGEN_EMAIL", help="Account.")
    ],
    password: Annotated[
        str,
        typer.Option(
            "--password",
            prompt=True,
            hide_input=True,
            envvar="AUTOGEN_PASSWORD",
            help="Asked for when not given (prefer the prompt or AUTOGEN_PASSWORD).",
        ),
    ],
    print_token: Annotated[
        bool,
        typer.Option(
            "--print-token",
            help="Print the session token on stdout instead of saving it "
            "(export AUTOGEN_TOKEN=$(autogen login --print-token ...)).",
        ),
    ] = False,
) -> None:
    """Sign in with an account's email and password (POST /auth/login).

    The session token is saved for this base URL in $AUTOGEN_CONFIG_DIR (default
    ~/.config/autogen/session.json, readable by you only) and used when neither --token nor
    AUTOGEN_TOKEN is given, until it expires.
    """
    opts = options(ctx)
    with opts.client(authenticated=False) as api:
        answer = api.login(email, password)
    token = str(answer.get("access_token") or "")
    expires_in = int(answer.get("expires_in") or 3600)
    if print_token:
        typer.echo(token)
        return
    path = save_session(opts.base_url, email, token, expires_in)
    output.note(f"Signed in as {email} for {expires_in // 60} minutes (session saved in {path}).")


def logout(ctx: typer.Context) -> None:
    """Forget the saved login session for this base URL."""
    if forget_session(options(ctx).base_url):
        output.note("Signed out.")
    else:
        output.note("No saved session for this base URL.")


def whoami(ctx: typer.Context, fmt: OutputOption = Format.table) -> None:
    """Show the caller: account, role, dealer, access level and device restriction (GET /me)."""
    with options(ctx).client() as api:
        me = api.me()
    if fmt is Format.json:
        output.print_json(me)
        return
    output.details(
        [
            ("email", me.get("email")),
            ("user id", me.get("user_id")),
            ("role", me.get("role")),
            ("dealer", me.get("dealer_id")),
            ("customer", me.get("customer_id")),
            ("access", me.get("access")),
            ("devices", "all in scope" if me.get("device_ids") is None else me["device_ids"]),
            ("api token", me.get("token_id")),
        ]
    )
