"""Rendering: the Jinja2 environment, formatting filters and the page helper."""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from console.session import Session, settings_of

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

# Command states after which nothing changes any more (polling stops there).
TERMINAL_COMMAND_STATES = frozenset({"succeeded", "failed", "expired"})
TERMINAL_ROLLOUT_STATES = frozenset({"cleared", "completed"})


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 timestamp from the API, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def fmt_time(value: object) -> str:
    """`2025-01-31 14:02:05 UTC`, or an em dash when unknown."""
    parsed = parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if parsed else "—"


def ago(value: object, now: datetime | None = None) -> str:
    """`42 s ago`, `5 min ago`, `3 h ago`, `2 d ago`, or `never`."""
    parsed = parse_time(value)
    if parsed is None:
        return "never"
    seconds = max(0, int(((now or datetime.now(UTC)) - parsed).total_seconds()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def build_templates() -> Jinja2Templates:
    """The template set with the console's filters (autoescaping on)."""
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.filters["fmt_time"] = fmt_time
    templates.env.filters["ago"] = ago
    templates.env.globals["TERMINAL_COMMAND_STATES"] = TERMINAL_COMMAND_STATES
    templates.env.globals["TERMINAL_ROLLOUT_STATES"] = TERMINAL_ROLLOUT_STATES
    return templates


def render(
    request: Request,
    template: str,
    session: Session | None = None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page or fragment, with the session, settings and CSRF token in its context."""
    templates: Jinja2Templates = request.app.state.templates
    context.update(
        session=session,
        me=session.me if session else None,
        csrf=session.csrf if session else "",
        settings=settings_of(request),
        path=request.url.path,
    )
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    # Pages show live data and secrets (a new token): never from a cache.
    response.headers["Cache-Control"] = "no-store"
    return response


def is_htmx(request: Request) -> bool:
    """The request came from htmx (a fragment is wanted, not a page)."""
    return request.headers.get("HX-Request") == "true"
