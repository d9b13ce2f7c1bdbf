"""API Tokens page, and the admin-only Dealers page."""

import base64
import binascii
import json
import re
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from console.api_client import ApiError
from console.session import (
    PostingSessionDep,
    Session,
    SessionDep,
    read_form,
    secure_cookies,
)
from console.views import render

router = APIRouter()

DEVICE_SPLIT = re.compile(r"[\s,;]+")
DEFAULT_EXPIRY_DAYS = 90
# The new token's secret travels to the one page view that shows it (Post/Redirect/Get, so a
# reload neither re-creates the token nor shows the secret again).
NEW_TOKEN_COOKIE = "agf_new_token"  # noqa: S105 - a cookie name
NEW_TOKEN_MAX_AGE_S = 120


async def tokens_context(session: Session) -> dict[str, Any]:
    """Tokens, accounts and devices in the caller's scope, and any API errors."""
    errors: list[str] = []
    tokens: list[Any] = []
    users: list[Any] = []
    devices: list[Any] = []
    try:
        tokens = (await session.api.page("tokens", limit=500)).items
    except ApiError as exc:
        errors.append(exc.detail)
    try:
        users = (await session.api.page("users", limit=500)).items
    except ApiError as exc:
        errors.append(exc.detail)
    try:
        devices = (await session.api.page("devices", limit=500)).items
    except ApiError as exc:
        errors.append(exc.detail)
    names = {str(u.get("id")): u.get("email") for u in users}
    return {"tokens": tokens, "users": users, "devices": devices, "errors": errors,
            "user_emails": names}  # fmt: skip


@router.get("/tokens")
async def tokens_page(request: Request, session: SessionDep) -> HTMLResponse:
    """List, create and revoke API tokens (a just-created token's secret shows once)."""
    context = await tokens_context(session)
    created = _read_new_token(request.cookies.get(NEW_TOKEN_COOKIE))
    response = render(
        request, "tokens.html", session, form={}, error=request.query_params.get("error", "")[:500],
        default_expiry=DEFAULT_EXPIRY_DAYS, created=created, **context,
    )  # fmt: skip
    if NEW_TOKEN_COOKIE in request.cookies:
        response.delete_cookie(NEW_TOKEN_COOKIE, path="/tokens", httponly=True, samesite="strict")
    return response


def _read_new_token(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(raw.encode()))
    except (binascii.Error, ValueError):
        return None
    return value if isinstance(value, dict) else None


@router.post("/tokens", response_model=None)
async def create_token(request: Request, session: PostingSessionDep) -> Response:
    """Create a token, then show its secret once on the page this redirects to."""
    form = await read_form(request)
    values = {
        "name": form.get("name"),
        "user_id": form.get("user_id"),
        "access": form.get("access"),
        "device_ids": form.get("device_ids"),
        "expires_in_days": form.get("expires_in_days"),
    }
    problem = ""
    if not values["name"]:
        problem = "Give the token a name that says where it will be used."
    elif not values["user_id"]:
        problem = "Choose the account the token acts for."
    elif values["access"] not in ("read", "control"):
        problem = "Decide deliberately: read-only or control-enabled."
    days = 0
    try:
        days = int(values["expires_in_days"] or "0")
    except ValueError:
        problem = problem or "Expiry: a whole number of days."
    if not problem and not 1 <= days <= 365:
        problem = "Expiry: between 1 and 365 days."
    if not problem:
        device_ids = [d for d in DEVICE_SPLIT.split(values["device_ids"]) if d]
        try:
            created = await session.api.post("tokens", {
                "name": values["name"], "user_id": values["user_id"], "access": values["access"],
                "device_ids": device_ids or None, "expires_in_days": days,
            })  # fmt: skip
        except ApiError as exc:
            problem = exc.detail
        else:
            redirect = RedirectResponse("/tokens", status_code=303)
            redirect.set_cookie(
                NEW_TOKEN_COOKIE,
                base64.urlsafe_b64encode(json.dumps(created).encode()).decode(),
                max_age=NEW_TOKEN_MAX_AGE_S,
                path="/tokens",
                httponly=True,
                samesite="strict",
                secure=secure_cookies(request),
            )
            return redirect
    context = await tokens_context(session)
    return render(
        request, "tokens.html", session, form=values, error=problem,
        default_expiry=DEFAULT_EXPIRY_DAYS, status_code=422, **context,
    )  # fmt: skip


@router.post("/tokens/{token_id}/revoke")
async def revoke_token(session: PostingSessionDep, token_id: str) -> Response:
    """Revoke a token (it stops working within a second)."""
    try:
        await session.api.delete(f"tokens/{quote(token_id, safe='')}")
    except ApiError as exc:
        return RedirectResponse(f"/tokens?{urlencode({'error': exc.detail})}", status_code=303)
    return RedirectResponse("/tokens", status_code=303)


@router.get("/dealers")
async def dealers_page(request: Request, session: SessionDep) -> HTMLResponse:
    """Admin only: the dealers (the API refuses anyone else anyway)."""
    if not session.is_admin:
        raise ApiError(404, "Not found", "There is no such page.")
    dealers: list[Any] = []
    error = request.query_params.get("error", "")[:500]
    try:
        dealers = (await session.api.page("dealers", limit=500)).items
    except ApiError as exc:
        error = error or exc.detail
    return render(request, "dealers.html", session, dealers=dealers, error=error)


@router.post("/dealers")
async def create_dealer(request: Request, session: PostingSessionDep) -> Response:
    """Admin only: add a dealer."""
    if not session.is_admin:
        raise ApiError(404, "Not found", "There is no such page.")
    name = (await read_form(request)).get("name")
    if not name:
        return RedirectResponse(f"/dealers?{urlencode({'error': 'Name the dealer.'})}", 303)
    try:
        await session.api.post("dealers", {"name": name})
    except ApiError as exc:
        return RedirectResponse(f"/dealers?{urlencode({'error': exc.detail})}", 303)
    return RedirectResponse("/dealers", status_code=303)
