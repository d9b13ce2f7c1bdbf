"""Fleet Console, Fleet Map and the device Manage page."""

import uuid
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from common.catalog import MODELS
from console.api_client import ApiError
from console.session import PostingSessionDep, Session, SessionDep, read_form
from console.views import TERMINAL_COMMAND_STATES, render

router = APIRouter()

PAGE_SIZE = 25
ACTIONS = {
    "start": "Start",
    "stop": "Stop",
    "reboot": "Reboot",
    "fw_update": "FW Update",
    "force_ota": "Force OTA",
}
# Actions a slip of the finger must not send: they interrupt a remote unit.
CONFIRM_ACTIONS = frozenset({"reboot", "force_ota"})
OTA_ACTIONS = frozenset({"fw_update", "force_ota"})
WHOLE_WORLD = "-180,-90,180,90"  # minLon,minLat,maxLon,maxLat


def fleet_filters(request: Request) -> dict[str, str]:
    """The Fleet Console's search and filters from the query string."""
    q = request.query_params
    return {
        "q": q.get("q", "").strip()[:200],
        "connection": q.get("connection", "") if q.get("connection") in ("live", "offline") else "",
        "model": q.get("model", "") if q.get("model") in MODELS else "",
        "firmware": q.get("firmware", "").strip()[:64],
    }


async def fleet_rows_context(session: Session, request: Request) -> dict[str, Any]:
    """The device rows of one page, or the API's reason for not having them."""
    filters = fleet_filters(request)
    cursor = request.query_params.get("cursor", "")[:200]
    context: dict[str, Any] = {"filters": filters, "cursor": cursor, "devices": [], "error": ""}
    try:
        page = await session.api.page("devices", limit=PAGE_SIZE, cursor=cursor, **filters)
    except ApiError as exc:
        context["error"] = exc.detail
        return context
    context["devices"] = page.items
    context["next_url"] = (
        "/fleet?" + urlencode({**filters, "cursor": page.next_cursor}) if page.next_cursor else ""
    )
    context["first_url"] = "/fleet?" + urlencode(filters) if cursor else ""
    return context


@router.get("/")
async def home() -> RedirectResponse:
    """The Fleet Console is the main daily page."""
    return RedirectResponse("/fleet", status_code=303)


@router.get("/fleet")
async def fleet(request: Request, session: SessionDep) -> HTMLResponse:
    """Fleet Console: search, filters, live/offline badges, Manage per row."""
    context = await fleet_rows_context(session, request)
    return render(request, "fleet.html", session, models=list(MODELS), **context)


@router.get("/fleet/rows")
async def fleet_rows(request: Request, session: SessionDep) -> HTMLResponse:
    """The Fleet Console's table body (search as you type, badge refresh)."""
    context = await fleet_rows_context(session, request)
    return render(request, "_fleet_rows.html", session, **context)


@router.get("/map")
async def fleet_map(request: Request, session: SessionDep) -> HTMLResponse:
    """Fleet Map: GPS units as green and red markers."""
    return render(request, "map.html", session)


@router.get("/map/data")
async def map_data(session: SessionDep, bbox: str = "") -> JSONResponse:
    """The map's GeoJSON, fetched by the page's script (same origin, session cookie)."""
    try:
        features = await session.api.get("map/devices", bbox=bbox[:100] or WHOLE_WORLD)
    except ApiError as exc:
        return JSONResponse({"error": exc.detail}, status_code=exc.status)
    return JSONResponse(features, headers={"Cache-Control": "no-store"})


async def device_or_error(session: Session, device_id: str) -> dict[str, Any]:
    """The device in the caller's scope (its API errors propagate as error pages)."""
    device = await session.api.get(f"devices/{quote(device_id, safe='')}")
    if not isinstance(device, dict):
        raise ApiError(502, "Bad API answer", "The device answer was not an object.")
    return device


async def releases_for(session: Session, device: dict[str, Any]) -> tuple[list[Any], str]:
    """Releases that fit the device (for FW Update and Force OTA), or why there are none."""
    model = MODELS.get(str(device.get("model")))
    if model is None:
        return [], ""
    try:
        page = await session.api.page(
            "firmware/releases", console=model.console, model=model.name,
            engine=device.get("engine") or "", transport=device.get("transport") or "",
        )  # fmt: skip
    except ApiError as exc:
        return [], exc.detail
    return page.items, ""


async def history(session: Session, device_id: str) -> tuple[list[Any], str]:
    """The device's commands, newest first, or why they cannot be shown."""
    try:
        page = await session.api.page(f"devices/{quote(device_id, safe='')}/commands", limit=20)
    except ApiError as exc:
        return [], exc.detail
    return page.items, ""


@router.get("/devices/{device_id}")
async def manage(
    request: Request, session: SessionDep, device_id: str, command: str = ""
) -> HTMLResponse:
    """The Manage page of one device."""
    device = await device_or_error(session, device_id)
    releases, releases_error = await releases_for(session, device)
    commands, history_error = await history(session, device_id)
    return render(
        request, "manage.html", session, device=device, releases=releases,
        releases_error=releases_error, commands=commands, history_error=history_error,
        actions=ACTIONS, confirm_actions=CONFIRM_ACTIONS, ota_actions=OTA_ACTIONS,
        command_id=command[:64], error=request.query_params.get("error", "")[:500],
        form_key=uuid.uuid4().hex,
    )  # fmt: skip


@router.get("/devices/{device_id}/status")
async def device_status(request: Request, session: SessionDep, device_id: str) -> HTMLResponse:
    """The Manage page's status fields (polled)."""
    device = await device_or_error(session, device_id)
    return render(request, "_device_status.html", session, device=device)


@router.get("/devices/{device_id}/history")
async def device_history(request: Request, session: SessionDep, device_id: str) -> HTMLResponse:
    """The Manage page's command history (polled)."""
    commands, history_error = await history(session, device_id)
    return render(
        request, "_command_history.html", session, commands=commands,
        history_error=history_error, device={"id": device_id},
    )  # fmt: skip


@router.post("/devices/{device_id}/commands", response_model=None)
async def send_command(request: Request, session: PostingSessionDep, device_id: str) -> Response:
    """Send a command; Reboot and Force OTA first ask for confirmation."""
    form = await read_form(request)
    action = form.get("action")
    base = f"/devices/{quote(device_id, safe='')}"
    if action not in ACTIONS:
        return RedirectResponse(f"{base}?{urlencode({'error': 'Unknown action.'})}", 303)
    release_id = form.get("release_id")
    if action in OTA_ACTIONS and not release_id:
        message = f"Choose the release for {ACTIONS[action]}."
        return RedirectResponse(f"{base}?{urlencode({'error': message})}", 303)
    # One key per rendered form and action: a double click or a resubmitted form sends one
    # command, while the next page render (a new key) can send the same action again.
    form_key = form.get("idempotency_key")[:64] or uuid.uuid4().hex
    if action in CONFIRM_ACTIONS and form.get("confirmed") != "yes":
        device = await device_or_error(session, device_id)
        return render(
            request, "confirm_command.html", session, device=device, action=action,
            label=ACTIONS[action], release_id=release_id, idempotency_key=form_key,
        )  # fmt: skip
    body: dict[str, Any] = {"action": action, "params": {}}
    if action in OTA_ACTIONS:
        body["params"] = {"release_id": release_id}
    key = f"{form_key}:{action}:{release_id}"
    try:
        sent = await session.api.post(
            f"devices/{quote(device_id, safe='')}/commands", body,
            headers={"Idempotency-Key": key},
        )  # fmt: skip
    except ApiError as exc:
        return RedirectResponse(f"{base}?{urlencode({'error': exc.detail})}", 303)
    command_id = sent.get("id", "") if isinstance(sent, dict) else ""
    return RedirectResponse(f"{base}?{urlencode({'command': command_id})}#command", 303)


@router.get("/commands/{command_id}/status")
async def command_status(request: Request, session: SessionDep, command_id: str) -> HTMLResponse:
    """One command's status (polled until it ends)."""
    try:
        command = await session.api.get(f"commands/{quote(command_id, safe='')}")
        error = ""
    except ApiError as exc:
        command, error = {"id": command_id}, exc.detail
    done = bool(error) or (
        isinstance(command, dict) and command.get("status") in TERMINAL_COMMAND_STATES
    )
    return render(request, "_command_status.html", session, command=command, error=error, done=done)
