"""Wires the tokens service together: settings, infrastructure, keys, routes, consumers."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from opentelemetry.sdk.trace import SpanProcessor

from common.auth import InternalTokenVerifier
from common.health import health_router
from common.http import install_http_conventions
from common.infra import Infra
from common.telemetry import FASTAPI_NATIVE_TELEMETRY_OFF, instrument_app
from tokens import api, consumers, handlers, store
from tokens.cache import VerifyCache
from tokens.handlers import Context
from tokens.keys import KeyPolicy, KeyRing
from tokens.settings import TokensSettings
from tokens.verify import ASGIApp, Verifier, VerifyEndpoint

logger = logging.getLogger(__name__)


def key_policy(settings: TokensSettings) -> KeyPolicy:
    """Key lifetimes from the settings."""
    return KeyPolicy(
        rotation=timedelta(days=settings.key_rotation_days),
        publish_lead=timedelta(seconds=settings.key_publish_lead_s),
        max_token_ttl=timedelta(seconds=max(settings.session_ttl_s, settings.internal_token_ttl_s)),
    )


async def maintain_keys(ctx: Context, app: FastAPI, *, force: bool = False) -> None:
    """Rotate when due, reload the published keys, and trust them for this app's own routes."""
    assert ctx.sessions is not None  # noqa: S101
    async with ctx.sessions() as session, session.begin():
        conn = await session.connection()
        await ctx.keys.ensure(conn, key_policy(ctx.settings), force=force)
    if not app.state.fixed_verifier:
        app.state.verifier = InternalTokenVerifier(jwks=ctx.keys.jwks())


async def _sleep(seconds: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def create_app(
    settings: TokensSettings | None = None,
    *,
    span_processors: tuple[SpanProcessor, ...] = (),
    internal_verifier: InternalTokenVerifier | None = None,
) -> FastAPI:
    """The ASGI app; settings come from the environment unless given."""
    settings = settings or TokensSettings()
    infra = Infra.build(settings, outbox=store.outbox, span_processors=span_processors)
    assert infra.sessions is not None  # noqa: S101 - tokens owns a database
    ctx = Context(
        settings=settings,
        sessions=infra.sessions,
        redis=infra.redis,
        keys=KeyRing(settings.key_encryption_secret.get_secret_value()),
        cache=VerifyCache(
            infra.redis, ttl_s=settings.verify_cache_ttl_s, local_ttl_s=settings.local_cache_ttl_s
        ),
    )
    verifier = Verifier(ctx)
    consumer_stats = consumers.register(infra.broker, ctx)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with infra.running():
            await maintain_keys(ctx, app)
            await handlers.ensure_user(
                ctx, email=settings.admin_email, name="Platform admin", role="admin",
                password=settings.admin_password.get_secret_value(), dealer_id=None,
            )  # fmt: skip
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(_keys_loop(ctx, app, stop), name="signing-keys"),
                asyncio.create_task(verifier.run_last_used(stop), name="last-used"),
            ]
            try:
                yield
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                await verifier.drain()

    app = FastAPI(
        telemetry=FASTAPI_NATIVE_TELEMETRY_OFF,
        title="AutoGen Fleet tokens service",
        version="1",
        lifespan=lifespan,
    )
    app.state.infra = infra
    app.state.ctx = ctx
    app.state.verify = verifier
    app.state.device_consumer = consumer_stats
    app.state.fixed_verifier = internal_verifier is not None
    if internal_verifier is not None:
        app.state.verifier = internal_verifier  # else set from the key ring in the lifespan
    install_http_conventions(app)
    app.include_router(health_router(infra.health_checks()))
    app.include_router(api.jwks_router())
    app.include_router(api.router)
    instrument_app(app, infra.tracer_provider)
    _serve_verify_first(app, verifier)
    return app


def _serve_verify_first(app: FastAPI, verifier: Verifier) -> None:
    """Put `/auth/verify` in front of the whole middleware stack, tracing included.

    It runs once per API request at the gateway, so it skips routing, the request-id
    middleware and a server span (measured: about half the cost of a cached verify); nginx's
    access log keeps the request id of every verify.
    """
    build = app.build_middleware_stack

    def build_with_verify() -> ASGIApp:
        return VerifyEndpoint(build(), lambda: verifier)

    app.build_middleware_stack = build_with_verify  # type: ignore[method-assign]


async def _keys_loop(ctx: Context, app: FastAPI, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await _sleep(ctx.settings.key_check_interval_s, stop)
        if stop.is_set():
            return
        try:
            await maintain_keys(ctx, app)
        except Exception:
            logger.exception("signing key maintenance failed; will retry")
