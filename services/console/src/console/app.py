"""Wires the console service together: settings, API client, pages, static files, telemetry."""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlencode

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from opentelemetry.sdk.trace import SpanProcessor

from common.health import health_router
from common.http import install_http_conventions
from common.telemetry import FASTAPI_NATIVE_TELEMETRY_OFF, instrument_app, setup_tracing
from console import auth_pages, firmware_pages, fleet_pages, token_pages
from console.api_client import ApiError, http_client
from console.session import CsrfError, LoginRequiredError, clear_session_cookie
from console.settings import ConsoleSettings
from console.views import STATIC_DIR, build_templates, is_htmx, render

SECURITY_HEADERS = {
    # Scripts and styles come from this origin only (vendored htmx and Leaflet); map tiles
    # may come from the configured tile server.
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def content_security_policy(settings: ConsoleSettings) -> str:
    """Everything from this origin; images also from the tile server when one is set."""
    img = "'self' data:"
    if settings.tile_url:
        img += " " + httpx.URL(settings.tile_url.replace("{", "").replace("}", "")).scheme + ":"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        f"img-src {img}; connect-src 'self'; frame-ancestors 'none'; form-action 'self'"
    )


def install_error_pages(app: FastAPI) -> None:
    """Sign-in redirects, CSRF refusals and API errors as pages (or htmx redirects)."""

    @app.exception_handler(LoginRequiredError)
    async def _login(request: Request, _: LoginRequiredError) -> Response:
        target = "/login"
        if request.method == "GET" and not is_htmx(request) and request.url.path != "/":
            target += "?" + urlencode({"next": request.url.path + (
                "?" + request.url.query if request.url.query else "")})  # fmt: skip
        response: Response
        if is_htmx(request):
            response = Response(status_code=204, headers={"HX-Redirect": target})
        else:
            response = RedirectResponse(target, status_code=303)
        clear_session_cookie(response)
        return response

    @app.exception_handler(CsrfError)
    async def _csrf(request: Request, _: CsrfError) -> Response:
        return render(
            request, "error.html", status_code=403, title="Form expired",
            detail="This form is stale or came from elsewhere. Go back, reload and try again.",
        )  # fmt: skip

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> Response:
        return render(request, "error.html", status_code=exc.status, title=exc.title,
                      detail=exc.detail)  # fmt: skip


def create_app(
    settings: ConsoleSettings | None = None,
    *,
    span_processors: tuple[SpanProcessor, ...] = (),
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The ASGI app; settings come from the environment unless given (`transport`: tests)."""
    settings = settings or ConsoleSettings()
    provider = setup_tracing(
        "console",
        exporter=settings.otel_exporter,
        endpoint=settings.otel_endpoint,
        extra_processors=span_processors,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with http_client(settings.api_base_url, settings.api_timeout_s, transport) as http:
            app.state.http = http
            yield

    app = FastAPI(
        telemetry=FASTAPI_NATIVE_TELEMETRY_OFF,
        title="AutoGen Fleet dealer console", version="1", lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url=None,
    )  # fmt: skip
    app.state.settings = settings
    app.state.templates = build_templates()
    install_http_conventions(app)
    install_error_pages(app)
    csp = content_security_policy(settings)

    @app.middleware("http")
    async def _security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Content-Security-Policy", csp)
        return response

    # The console keeps no state and calls only the public API: it is ready when it runs.
    app.include_router(health_router({}))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (auth_pages, fleet_pages, firmware_pages, token_pages):
        app.include_router(module.router)
    instrument_app(app, provider)
    return app
