"""`/healthz` (the process lives) and `/readyz` (its dependencies answer) for every service."""

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from common.http import problem_response
from common.metrics import metrics_router

Check = Callable[[], Awaitable[object]]


def health_router(checks: Mapping[str, Check], *, timeout_s: float = 2.0) -> APIRouter:
    """Probes for load balancers and orchestrators (`checks` name each dependency), and the
    Prometheus `/metrics` endpoint."""
    router = APIRouter(tags=["health"])
    router.include_router(metrics_router())

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        results = await asyncio.gather(*(_run(check, timeout_s) for check in checks.values()))
        report = dict(zip(checks, results, strict=True))
        if all(result["ok"] for result in report.values()):
            return JSONResponse({"status": "ok", "checks": report})
        failing = ", ".join(name for name, result in report.items() if not result["ok"])
        return problem_response(
            503, "Service not ready", f"dependencies not answering: {failing}", checks=report
        )

    return router


async def _run(check: Check, timeout_s: float) -> dict[str, object]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - a probe reports every failure, never raises
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1)}
