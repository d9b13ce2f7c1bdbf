"""HTTP routes of the firmware service (thin: each calls one handler or view)."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from sqlalchemy.ext.asyncio import AsyncEngine

from common.auth import CurrentPrincipal
from common.catalog import CONSOLE_TITLES, MODELS, TRANSPORTS, models_of
from firmware import handlers, views
from firmware.access import access_release, access_rollout
from firmware.schemas import NewRelease, NewRollout, NewValidation, ReleaseChange

Limit = Annotated[int, Query(ge=1, le=500)]
RolloutStatusFilter = Literal["running", "paused", "cleared", "completed"]
DeviceStateFilter = Literal[
    "pending", "sent", "updating", "awaiting_return", "confirmed", "failed", "cancelled"
]


def build_router(engine: AsyncEngine) -> APIRouter:
    """Routes under `/api/v1`."""
    router = APIRouter(prefix="/api/v1")

    @router.get("/firmware/consoles", tags=["firmware"])
    async def consoles(_: CurrentPrincipal) -> dict[str, Any]:
        items = []
        for console, title in CONSOLE_TITLES.items():
            models = models_of(console)
            items.append(
                {
                    "id": console,
                    "title": title,
                    "models": [
                        {
                            "name": name,
                            "engines": list(MODELS[name].engines),
                            "transports": list(MODELS[name].transports),
                        }
                        for name in models
                    ],
                    "engines": sorted({e for name in models for e in MODELS[name].engines}),
                    "transports": list(TRANSPORTS),
                }
            )
        return {"items": items}

    @router.get("/firmware/releases", tags=["firmware"])
    async def releases(  # noqa: PLR0917 - FastAPI query parameters
        principal: CurrentPrincipal,
        console: Literal["xpro", "unified", "ultra"] | None = None,
        model: str | None = None,
        engine_: Annotated[str | None, Query(alias="engine")] = None,
        transport: Literal["gsm", "wifi"] | None = None,
        limit: Limit = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            return await views.list_releases(
                conn,
                principal,
                console=console,
                model=model,
                engine=engine_,
                transport=transport,
                limit=limit,
                cursor=cursor,
            )

    @router.post("/firmware/releases", status_code=201, tags=["firmware"])
    async def create_release(principal: CurrentPrincipal, body: NewRelease) -> dict[str, Any]:
        return await handlers.create_release(engine, principal, body)

    @router.get("/firmware/releases/{release_id}", tags=["firmware"])
    async def release(principal: CurrentPrincipal, release_id: str) -> dict[str, Any]:
        async with engine.connect() as conn:
            row = await access_release(conn, release_id)
            scope = views.validation_scope(principal)
            return views.release_view(row, validated=await views.is_validated(conn, row.id, scope))

    @router.patch("/firmware/releases/{release_id}", tags=["firmware"])
    async def change_release(
        principal: CurrentPrincipal, release_id: str, body: ReleaseChange
    ) -> dict[str, Any]:
        return await handlers.change_release(engine, principal, release_id, body)

    @router.post("/firmware/releases/{release_id}/validations", status_code=201, tags=["firmware"])
    async def validate(
        principal: CurrentPrincipal, release_id: str, body: NewValidation
    ) -> dict[str, Any]:
        return await handlers.create_validation(engine, principal, release_id, body.device_id)

    @router.get("/firmware/releases/{release_id}/validations", tags=["firmware"])
    async def validations(principal: CurrentPrincipal, release_id: str) -> dict[str, Any]:
        async with engine.connect() as conn:
            await access_release(conn, release_id)
            items = await views.validations_of(conn, principal, release_id)
        return {"items": items, "next_cursor": None}

    @router.post("/rollouts", status_code=201, tags=["rollouts"])
    async def create_rollout(principal: CurrentPrincipal, body: NewRollout) -> dict[str, Any]:
        return await handlers.create_rollout(engine, principal, body)

    @router.get("/rollouts", tags=["rollouts"])
    async def rollouts(
        principal: CurrentPrincipal,
        status: RolloutStatusFilter | None = None,
        limit: Limit = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            return await views.list_rollouts(
                conn, principal, status=status, limit=limit, cursor=cursor
            )

    @router.get("/rollouts/{rollout_id}", tags=["rollouts"])
    async def rollout(principal: CurrentPrincipal, rollout_id: str) -> dict[str, Any]:
        async with engine.connect() as conn:
            row = await access_rollout(conn, principal, rollout_id)
            return await views.rollout_detail(conn, row)

    @router.get("/rollouts/{rollout_id}/devices", tags=["rollouts"])
    async def rollout_devices(
        principal: CurrentPrincipal,
        rollout_id: str,
        state: DeviceStateFilter | None = None,
        limit: Limit = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            await access_rollout(conn, principal, rollout_id)
            return await views.list_devices(
                conn, rollout_id, state=state, limit=limit, cursor=cursor
            )

    @router.post("/rollouts/{rollout_id}/pause", tags=["rollouts"])
    async def pause(principal: CurrentPrincipal, rollout_id: str) -> dict[str, Any]:
        return await handlers.act_on_rollout(engine, principal, rollout_id, "pause")

    @router.post("/rollouts/{rollout_id}/resume", tags=["rollouts"])
    async def resume(principal: CurrentPrincipal, rollout_id: str) -> dict[str, Any]:
        return await handlers.act_on_rollout(engine, principal, rollout_id, "resume")

    @router.post("/rollouts/{rollout_id}/clear", tags=["rollouts"])
    async def clear(principal: CurrentPrincipal, rollout_id: str) -> dict[str, Any]:
        return await handlers.act_on_rollout(engine, principal, rollout_id, "clear")

    return router
