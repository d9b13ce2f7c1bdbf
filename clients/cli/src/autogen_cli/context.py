"""Where the CLI calls (base URL, token), the saved login session, and the exit codes."""

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from typing import Any

import httpx
import typer

from autogen_cli.client import Client

DEFAULT_BASE_URL = "http://127.0.0.1:8080/api/v1"


class Exit(IntEnum):
    """The exit codes every command uses (documented in `autogen --help`)."""

    OK = 0
    API_ERROR = 1  # the API refused the call (problem+json shown)
    USAGE = 2  # bad options or arguments
    UNREACHABLE = 3  # no usable answer from the API
    OUTCOME = 4  # the awaited thing ended badly (command failed/expired, rollout cleared/failed)
    TIMEOUT = 5  # still not finished when the wait ended
    INTERRUPTED = 130  # Ctrl-C while waiting; what was started goes on


@dataclass(frozen=True)
class Options:
    """The root options, shared by every subcommand through the Typer context."""

    base_url: str
    token: str | None
    timeout_s: float
    transport: httpx.BaseTransport | None = None  # tests: an httpx.MockTransport

    def client(self, *, authenticated: bool = True) -> Client:
        """An API client; a usage error when a token is needed and none is known."""
        token = (self.token or saved_token(self.base_url)) if authenticated else None
        if authenticated and not token:
            raise typer.BadParameter(
                "no token: pass --token, set AUTOGEN_TOKEN, or run `autogen login` first",
                param_hint="--token",
            )
        return Client(self.base_url, token, timeout_s=self.timeout_s, transport=self.transport)


def options(ctx: typer.Context) -> Options:
    """The root options of this invocation."""
    found = ctx.find_object(Options)
    if found is None:  # a subcommand invoked without the root callback (never from the CLI)
        found = Options(DEFAULT_BASE_URL, os.environ.get("AUTOGEN_TOKEN"), 15.0)
    return found


# ---------------------------------------------------------------------- saved session


def config_dir() -> Path:
    """`$AUTOGEN_CONFIG_DIR`, else `$XDG_CONFIG_HOME/autogen`, else `~/.config/autogen`."""
    if explicit := os.environ.get("AUTOGEN_CONFIG_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "autogen"


def _sessions_file() -> Path:
    return config_dir() / "session.json"


def _load_sessions() -> dict[str, Any]:
    try:
        loaded = json.loads(_sessions_file().read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def save_session(base_url: str, email: str, token: str, expires_in_s: int) -> Path:
    """Remember a login token for `base_url` (file readable by the user only)."""
    sessions = _load_sessions()
    expires_at = datetime.now(UTC) + timedelta(seconds=expires_in_s)
    sessions[base_url.rstrip("/")] = {
        "email": email,
        "token": token,
        "expires_at": expires_at.isoformat(),
    }
    path = _sessions_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created private before the secret is written into it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(sessions, handle, indent=2)
    return path


def forget_session(base_url: str) -> bool:
    """Drop the saved login for `base_url`; whether there was one."""
    sessions = _load_sessions()
    if sessions.pop(base_url.rstrip("/"), None) is None:
        return False
    _sessions_file().write_text(json.dumps(sessions, indent=2))
    return True


def saved_token(base_url: str) -> str | None:
    """The saved, unexpired login token for `base_url`, if any."""
    entry = _load_sessions().get(base_url.rstrip("/"))
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        return None
    try:
        expires_at = datetime.fromisoformat(str(entry.get("expires_at")))
    except ValueError:
        return None
    return entry["token"] if expires_at > datetime.now(UTC) else None
