"""The signed-in session: an HttpOnly cookie holding the API session token, and CSRF checks."""

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, Request, Response

from console.api_client import ApiClient, SessionExpiredError
from console.settings import ConsoleSettings

SESSION_COOKIE = "agf_session"
# Double-submit token for the login form, which has no session yet to bind a token to.
LOGIN_CSRF_COOKIE = "agf_login_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
MAX_FORM_BYTES = 64 * 1024


class LoginRequiredError(Exception):
    """No session, or the API no longer accepts it: the user signs in (again)."""


class CsrfError(Exception):
    """A state-changing form arrived without this session's CSRF token."""


@dataclass
class Form:
    """A submitted urlencoded form (the console's forms post nothing else)."""

    values: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        """The first value of a field, stripped."""
        found = self.values.get(name)
        return found[0].strip() if found else default

    def all(self, name: str) -> list[str]:
        """Every non-empty value of a repeated field."""
        return [v.strip() for v in self.values.get(name, []) if v.strip()]


async def read_form(request: Request) -> Form:
    """The request's urlencoded body (bounded), parsed once and cached on the request."""
    cached = getattr(request.state, "form", None)
    if isinstance(cached, Form):
        return cached
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise CsrfError("form too large")
    form = Form(parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True))
    request.state.form = form
    return form


def csrf_token(settings: ConsoleSettings, session_token: str) -> str:
    """This session's CSRF token: bound to the session, nothing stored."""
    key = settings.secret_key.get_secret_value().encode()
    return hmac.new(key, session_token.encode(), hashlib.sha256).hexdigest()


@dataclass
class Session:
    """Who is signed in, and the API as they see it."""

    api: ApiClient
    me: dict[str, Any]
    csrf: str

    @property
    def role(self) -> str:
        """admin, dealer or customer."""
        return str(self.me.get("role", ""))

    @property
    def is_admin(self) -> bool:
        """Admin-only sections are rendered for admins only."""
        return self.role == "admin"


def settings_of(request: Request) -> ConsoleSettings:
    """The app's settings."""
    settings: ConsoleSettings = request.app.state.settings
    return settings


def api_for(request: Request, token: str | None) -> ApiClient:
    """An API client acting with `token`."""
    return ApiClient(request.app.state.http, token)


async def current_session(request: Request) -> Session:
    """The signed-in session, or `LoginRequiredError`."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise LoginRequiredError
    api = api_for(request, token)
    try:
        me = await api.get("me")
    except SessionExpiredError as exc:
        raise LoginRequiredError from exc
    if not isinstance(me, dict):
        raise LoginRequiredError
    return Session(api=api, me=me, csrf=csrf_token(settings_of(request), token))


async def posting_session(request: Request) -> Session:
    """The signed-in session of a state-changing request whose CSRF token checks out."""
    session = await current_session(request)
    sent = request.headers.get(CSRF_HEADER) or (await read_form(request)).get(CSRF_FIELD)
    if not sent or not hmac.compare_digest(sent, session.csrf):
        raise CsrfError("missing or wrong CSRF token")
    return session


SessionDep = Annotated[Session, Depends(current_session)]
PostingSessionDep = Annotated[Session, Depends(posting_session)]


def secure_cookies(request: Request) -> bool:
    """Whether cookies get the Secure flag (https, as the proxy tells us)."""
    mode = settings_of(request).secure_cookies
    if mode == "auto":
        return request.url.scheme == "https"
    return mode == "always"


def set_session_cookie(request: Request, response: Response, token: str, max_age: int) -> None:
    """Keep the session token where scripts cannot read it and other sites cannot send it."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request),
    )


def clear_session_cookie(response: Response) -> None:
    """Sign out in this browser."""
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


def new_login_csrf() -> str:
    """A fresh random token for the login form's double submit."""
    return secrets.token_urlsafe(24)
