"""`/metrics`: what operators scrape from every service."""

import httpx
from fastapi import FastAPI

from common.health import health_router
from common.http import ProblemError, install_http_conventions


def app_with_routes() -> FastAPI:
    app = FastAPI()
    install_http_conventions(app)
    app.include_router(health_router({}))

    @app.get("/api/v1/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        if thing_id == "missing":
            raise ProblemError(404, "Not found", "no such thing")
        return {"id": thing_id}

    return app


async def test_requests_are_counted_by_route_template_not_raw_path() -> None:
    transport = httpx.ASGITransport(app=app_with_routes())
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        for thing_id in ("a-1", "b-2", "missing"):
            await client.get(f"/api/v1/things/{thing_id}")
        await client.get("/readyz")
        scraped = await client.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    ok = 'autogen_http_requests_total{method="GET",route="/api/v1/things/{thing_id}",status="200"}'
    missing = (
        'autogen_http_requests_total{method="GET",route="/api/v1/things/{thing_id}",status="404"}'
    )
    assert ok in text
    assert missing in text
    assert "a-1" not in text  # raw ids would make one series per device
    assert 'route="/readyz"' not in text  # probes are not traffic
    assert "autogen_http_request_duration_seconds_bucket" in text
    assert "autogen_outbox_pending" in text
