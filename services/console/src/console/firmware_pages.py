"""The three firmware consoles: releases, validation, my_fleet rollouts and their progress."""

from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from common.catalog import CONSOLE_TITLES, MODELS, Console, models_of
from console.api_client import ApiError
from console.session import PostingSessionDep, Session, SessionDep, read_form
from console.views import render

router = APIRouter()

CONSOLES: tuple[Console, ...] = ("xpro", "unified", "ultra")
ROLLOUT_ACTIONS = ("pause", "resume", "clear")
COUNT_KEYS = ("pending", "sent", "updating", "awaiting_return", "confirmed", "failed")
# Validation (and rollout device) states after which nothing changes any more.
FINISHED_DEVICE_STATES = frozenset({"confirmed", "failed", "cancelled", "skipped"})
MAX_RELEASES_SHOWN = 20


def console_spec(console: Console) -> dict[str, Any]:
    """What a console's variant form asks for, from the product catalog."""
    models = models_of(console)
    engines = sorted({e for m in models for e in MODELS[m].engines})
    transports = sorted({t for m in models for t in MODELS[m].transports})
    return {
        "id": console,
        "title": CONSOLE_TITLES[console],
        "models": models,
        "engines": engines,
        # Unified and Ultra releases are per variant: the dealer must choose it, deliberately.
        "engine_required": console == "unified",
        "transports": transports,
        "transport_required": console in ("unified", "ultra"),
    }


def chosen_variant(request: Request, spec: dict[str, Any]) -> tuple[dict[str, str], bool]:
    """The variant in the query string, and whether everything required has been chosen."""
    q = request.query_params
    variant = {
        "model": q.get("model", "") if q.get("model") in spec["models"] else "",
        "engine": q.get("engine", "") if q.get("engine") in spec["engines"] else "",
        "transport": q.get("transport", "") if q.get("transport") in spec["transports"] else "",
    }
    complete = (not spec["engine_required"] or bool(variant["engine"])) and (
        not spec["transport_required"] or bool(variant["transport"])
    )
    return variant, complete


def fits(device: dict[str, Any], release: dict[str, Any]) -> bool:
    """Whether a release is meant for a device's model and variant."""
    models = release.get("models") or []
    if models and device.get("model") not in models:
        return False
    for key in ("engine", "transport"):
        if release.get(key) and device.get(key) != release.get(key):
            return False
    return True


async def test_devices(session: Session, console: Console) -> tuple[list[dict[str, Any]], str]:
    """The caller's test devices of this console's models."""
    found: list[dict[str, Any]] = []
    try:
        for model in models_of(console):
            page = await session.api.page("devices", model=model, limit=500)
            found.extend(d for d in page.items if d.get("test_device"))
    except ApiError as exc:
        return [], exc.detail
    return found, ""


def release_console(rollout: dict[str, Any]) -> str | None:
    """The console of a rollout's release, when the API says it."""
    release = rollout.get("release")
    if isinstance(release, dict):
        value = release.get("console")
        return str(value) if value else None
    return None


async def validations_of(session: Session, release_id: str) -> tuple[list[Any], str]:
    """The caller's validations of a release (its test devices' progress), or why not."""
    try:
        page = await session.api.page(f"firmware/releases/{quote(release_id, safe='')}/validations")
    except ApiError as exc:
        return [], exc.detail
    return page.items, ""


def validations_context(release_id: str, items: list[Any], error: str) -> dict[str, Any]:
    """What `_validations.html` shows; it keeps polling while a validation is under way."""
    running = any(v.get("state") not in FINISHED_DEVICE_STATES for v in items)
    return {"release_id": release_id, "validations": items, "validations_error": error,
            "running": running}  # fmt: skip


@router.get("/firmware/releases/{release_id}/validations")
async def validations_fragment(
    request: Request, session: SessionDep, release_id: str
) -> HTMLResponse:
    """A release's validations (polled while one is under way)."""
    items, error = await validations_of(session, release_id)
    return render(
        request, "_validations.html", session, **validations_context(release_id, items, error)
    )


@router.get("/firmware")
async def firmware_index() -> RedirectResponse:
    """The X Pro console comes first in the menu."""
    return RedirectResponse("/firmware/xpro", status_code=303)


@router.get("/firmware/{console}")
async def firmware_console(request: Request, session: SessionDep, console: str) -> HTMLResponse:
    """One firmware console: variant choice, releases, validation, deploy, rollouts."""
    if console not in CONSOLES:
        raise ApiError(404, "Not found", f"There is no firmware console {console!r}.")
    spec = console_spec(console)
    variant, complete = chosen_variant(request, spec)
    releases: list[Any] = []
    errors: list[str] = []
    devices: list[dict[str, Any]] = []
    if complete:
        try:
            page = await session.api.page(
                "firmware/releases", console=console, limit=MAX_RELEASES_SHOWN, **variant
            )
            releases = page.items
        except ApiError as exc:
            errors.append(exc.detail)
        devices, device_error = await test_devices(session, console)
        if device_error:
            errors.append(device_error)
    rollouts: list[Any] = []
    try:
        rollouts = [
            r
            for r in (await session.api.page("rollouts", limit=100)).items
            if release_console(r) in (None, console)
        ]
    except ApiError as exc:
        errors.append(exc.detail)
    candidates = {str(r.get("id")): [d for d in devices if fits(d, r)] for r in releases}
    validations = {}
    for r in releases:
        items, error = await validations_of(session, str(r.get("id")))
        validations[str(r.get("id"))] = validations_context(str(r.get("id")), items, error)
    q = request.query_params
    return render(
        request, "firmware.html", session, spec=spec, variant=variant, complete=complete,
        releases=releases, candidates=candidates, rollouts=rollouts, errors=errors,
        validations=validations,
        consoles=[console_spec(c) for c in CONSOLES], count_keys=COUNT_KEYS,
        notice=q.get("notice", "")[:500], error=q.get("error", "")[:500],
        back=f"/firmware/{console}?{urlencode(variant)}",
    )  # fmt: skip


def back_to(form_back: str, **message: str) -> RedirectResponse:
    """Back to the console page the form came from, with a notice or an error."""
    target = form_back if form_back.startswith("/firmware/") else "/firmware"
    joiner = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{joiner}{urlencode(message)}", status_code=303)


@router.post("/firmware/releases/{release_id}/validate")
async def validate(request: Request, session: PostingSessionDep, release_id: str) -> Response:
    """OTA the release to one test device."""
    form = await read_form(request)
    device_id = form.get("device_id")
    if not device_id:
        return back_to(form.get("back"), error="Choose the test device to validate on.")
    try:
        await session.api.post(
            f"firmware/releases/{quote(release_id, safe='')}/validations",
            {"device_id": device_id},
        )
    except ApiError as exc:
        return back_to(form.get("back"), error=exc.detail)
    return back_to(
        form.get("back"),
        notice=f"Validation started on {device_id}: the release counts as validated once "
        "the device is live again and reports the new version.",
    )


def int_field(raw: str, default: int, low: int, high: int) -> int:
    """A bounded integer form field (bad input falls back to the default)."""
    try:
        value = int(raw)
    except ValueError:
        return default
    return min(max(value, low), high)


@router.post("/firmware/releases/{release_id}/deploy")
async def deploy(request: Request, session: PostingSessionDep, release_id: str) -> Response:
    """Start a rollout of the release (my_fleet; global and override for admins only)."""
    form = await read_form(request)
    scope = form.get("scope") or "my_fleet"
    if scope != "my_fleet" and not session.is_admin:
        return back_to(form.get("back"), error="Dealers deploy to my_fleet only.")
    body: dict[str, Any] = {
        "release_id": release_id,
        "scope": scope,
        "target": {
            "models": form.all("models") or None,
            "engine": form.get("engine") or None,
            "transport": form.get("transport") or None,
            "device_ids": None,
        },
        "strategy": {
            "batch_size": int_field(form.get("batch_size"), 10, 1, 1000),
            "max_per_minute": int_field(form.get("max_per_minute"), 60, 1, 10000),
            "failure_threshold_pct": int_field(form.get("failure_threshold_pct"), 20, 0, 100),
        },
    }
    if session.is_admin and form.get("override") == "yes":
        body["override"] = True
    try:
        rollout = await session.api.post("rollouts", body)
    except ApiError as exc:
        return back_to(form.get("back"), error=exc.detail)
    rollout_id = rollout.get("id") if isinstance(rollout, dict) else None
    if not rollout_id:
        return back_to(form.get("back"), error="The API did not say which rollout it started.")
    return RedirectResponse(f"/rollouts/{quote(str(rollout_id), safe='')}", status_code=303)


async def rollout_context(session: Session, rollout_id: str) -> dict[str, Any]:
    """A rollout, its per-device states, or why they cannot be shown."""
    path = f"rollouts/{quote(rollout_id, safe='')}"
    rollout = await session.api.get(path)
    devices: list[Any] = []
    devices_error = ""
    try:
        devices = (await session.api.page(f"{path}/devices", limit=500)).items
    except ApiError as exc:
        devices_error = exc.detail
    return {
        "rollout": rollout, "devices": devices, "devices_error": devices_error,
        "count_keys": COUNT_KEYS,
    }  # fmt: skip


@router.get("/rollouts/{rollout_id}")
async def rollout_page(request: Request, session: SessionDep, rollout_id: str) -> HTMLResponse:
    """Rollout progress: counts, per-device table, pause, resume, clear."""
    context = await rollout_context(session, rollout_id)
    error = request.query_params.get("error", "")[:500]
    return render(request, "rollout.html", session, error=error, **context)


@router.get("/rollouts/{rollout_id}/progress")
async def rollout_progress(request: Request, session: SessionDep, rollout_id: str) -> HTMLResponse:
    """The rollout's live part (polled until it ends)."""
    context = await rollout_context(session, rollout_id)
    return render(request, "_rollout_progress.html", session, **context)


@router.post("/rollouts/{rollout_id}/{action}")
async def rollout_action(session: PostingSessionDep, rollout_id: str, action: str) -> Response:
    """Pause, resume or clear a rollout."""
    base = f"/rollouts/{quote(rollout_id, safe='')}"
    if action not in ROLLOUT_ACTIONS:
        return RedirectResponse(f"{base}?{urlencode({'error': 'Unknown action.'})}", 303)
    try:
        await session.api.post(f"rollouts/{quote(rollout_id, safe='')}/{action}")
    except ApiError as exc:
        return RedirectResponse(f"{base}?{urlencode({'error': exc.detail})}", 303)
    return RedirectResponse(base, status_code=303)
