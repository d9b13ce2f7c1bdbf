"""The `autogen` command: root options, the command groups, and error handling in one place."""

from typing import Annotated, Any

import httpx
import typer
from typer.core import TyperGroup

from autogen_cli import auth, commands, devices, output, releases, rollouts, tokens
from autogen_cli.client import ApiError, UnreachableError
from autogen_cli.context import DEFAULT_BASE_URL, Exit, Options

EPILOG = """\
Environment: AUTOGEN_API_BASE_URL (default http://127.0.0.1:8080/api/v1), AUTOGEN_TOKEN
(a session token from `autogen login --print-token` or an agk_ API token), AUTOGEN_CONFIG_DIR
(where `autogen login` keeps its session).

Exit codes: 0 done; 1 the API refused (its problem title and detail are shown); 2 bad usage;
3 the API could not be reached or did not answer as the API; 4 what was awaited ended badly
(command failed or expired, rollout cleared or with failed devices); 5 still not finished when
the wait ended; 130 interrupted (what was started goes on).
"""


class Cli(TyperGroup):
    """The root group: expected errors become a clear message and an exit code, no traceback."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click Context (private module)
        """Run the subcommand; map API and connection errors to messages and exit codes."""
        try:
            return super().invoke(ctx)
        except ApiError as error:
            output.show_api_error(error)
            raise typer.Exit(Exit.API_ERROR) from None
        except UnreachableError as error:
            output.show_error(str(error))
            raise typer.Exit(Exit.UNREACHABLE) from None


app = typer.Typer(
    name="autogen",
    cls=Cli,
    help="Operate an AutoGen Fleet through its public API: devices, commands, firmware "
    "releases, rollouts and API tokens.",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _check_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise typer.BadParameter("must start with http:// or https:// (e.g. " + DEFAULT_BASE_URL)
    return value.rstrip("/")


@app.callback()
def root(
    ctx: typer.Context,
    base_url: Annotated[
        str,
        typer.Option(
            "--base-url",
            envvar="AUTOGEN_API_BASE_URL",
            callback=_check_url,
            help="The API's base URL, ending in /api/v1.",
        ),
    ] = DEFAULT_BASE_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="AUTOGEN_TOKEN",
            show_default=False,
            help="Bearer token (session or agk_ API token); default: the saved login.",
        ),
    ] = None,
    timeout_s: Annotated[
        float, typer.Option("--http-timeout", min=1, help="Seconds to wait for one API answer.")
    ] = 15.0,
) -> None:
    """Operate an AutoGen Fleet through its public API."""
    # Tests invoke the app with an httpx transport as the context object; users never do.
    transport = ctx.obj if isinstance(ctx.obj, httpx.BaseTransport) else None
    ctx.obj = Options(base_url, token or None, timeout_s, transport=transport)


app.command("login")(auth.login)
app.command("logout")(auth.logout)
app.command("whoami")(auth.whoami)
app.add_typer(devices.app, name="devices")
app.add_typer(commands.app, name="commands")
app.add_typer(releases.app, name="releases")
app.add_typer(rollouts.app, name="rollouts")
app.add_typer(tokens.app, name="tokens")


def main() -> None:
    """Console script entry point."""
    app()
