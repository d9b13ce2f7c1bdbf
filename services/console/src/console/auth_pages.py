"""Login and logout."""

import hmac
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from console.api_client import ApiError
from console.session import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    PostingSessionDep,
    api_for,
    clear_session_cookie,
    new_login_csrf,
    read_form,
    secure_cookies,
    set_session_cookie,
)
from console.views import render

router = APIRouter()


def safe_next(target: str) -> str:
    """Only a local path may be the place to go after login (no open redirect)."""
    parts = urlsplit(target)
    if not target.startswith("/") or target.startswith("//") or parts.scheme or parts.netloc:
        return "/fleet"
    if "\\" in target:
        return "/fleet"
    return target


def login_page(
    request: Request, *, error: str = "", email: str = "", next_url: str = "/fleet",
    status_code: int = 200,
) -> HTMLResponse:  # fmt: skip
    """The login form with a fresh double-submit CSRF token."""
    token = new_login_csrf()
    response = render(
        request, "login.html", status_code=status_code,
        error=error, email=email, next_url=safe_next(next_url), login_csrf=token,
    )  # fmt: skip
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, max_age=3600, path="/login", httponly=True,
        samesite="strict", secure=secure_cookies(request),
    )  # fmt: skip
    return response


@router.get("/login")
async def login_form(request: Request, next: str = "/fleet") -> HTMLResponse:
    """The sign-in page."""
    return login_page(request, next_url=next)


@router.post("/login", response_model=None)
async def login(request: Request) -> Response:
    """Check the credentials with the tokens service and keep the session token."""
    form = await read_form(request)
    email, password = form.get("email"), form.values.get("password", [""])[0]
    next_url = safe_next(form.get("next", "/fleet"))
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected, form.get(CSRF_FIELD)):
        return login_page(
            request, error="The form expired; please sign in again.", email=email,
            next_url=next_url, status_code=400,
        )  # fmt: skip
    if not email or not password:
        return login_page(
            request, error="Enter your email and password.", email=email,
            next_url=next_url, status_code=422,
        )  # fmt: skip
    try:
        token, expires_in = await api_for(request, None).login(email, password)
    except ApiError as exc:
        message = "Wrong email or password." if exc.status == 401 else exc.detail
        return login_page(
            request, error=message, email=email, next_url=next_url, status_code=exc.status,
        )  # fmt: skip
    response = RedirectResponse(next_url, status_code=303)
    set_session_cookie(request, response, token, expires_in)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.post("/logout")
async def logout(_: PostingSessionDep) -> RedirectResponse:
    """Forget the session in this browser."""
    response = RedirectResponse("/login", status_code=303)
    clear_session_cookie(response)
    return response
