"""Wires the gateway service together: settings, infrastructure, MQTT bridge, routes, consumers."""

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

from fastapi import FastAPI
from opentelemetry.sdk.trace import SpanProcessor

from common.auth import InternalTokenVerifier
from common.health import health_router
from common.http import install_http_conventions
from common.infra import Infra
from common.telemetry import FASTAPI_NATIVE_TELEMETRY_OFF, instrument_app
from gateway import consumers, store
from gateway.api import internal_router
from gateway.bridge import Bridge, make_producer
from gateway.dynsec import DynsecAdmin
from gateway.settings import GatewaySettings


def create_app(
    settings: GatewaySettings | None = None,
    *,
    verifier: InternalTokenVerifier | None = None,
    span_processors: tuple[SpanProcessor, ...] = (),
) -> FastAPI:
    """The ASGI app; settings come from the environment unless given."""
    settings = settings or GatewaySettings()
    infra = Infra.build(settings, outbox=store.outbox, span_processors=span_processors)
    assert infra.sessions is not None  # noqa: S101 - the gateway has a database
    bridge = Bridge(settings, functools.partial(make_producer, settings))
    # The app's own provider, not the global one: several apps may share a process (tests).
    bridge.traces.use(infra.tracer_provider)
    admin = DynsecAdmin(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        username=settings.mqtt_admin_username,
        password=settings.mqtt_admin_password.get_secret_value(),
        client_id=f"{settings.mqtt_client_id}-admin",
    )
    dispatch_stats = consumers.register(
        infra.broker, settings, sessions=infra.sessions, bridge=bridge
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        async with infra.running():
            await bridge.start_producer()
            tasks = [
                asyncio.create_task(bridge.run(stop), name="mqtt-bridge"),
                asyncio.create_task(admin.run(stop), name="dynsec-admin"),
            ]
            try:
                yield
            finally:
                stop.set()
                await asyncio.wait(tasks, timeout=10)
                for task in tasks:
                    task.cancel()
                await bridge.stop_producer()

    async def mqtt_ready() -> None:
        if not bridge.connected.is_set():
            raise ConnectionError("MQTT session is down")
        if not admin.ready.is_set():
            raise ConnectionError("MQTT admin session is down")

    app = FastAPI(
        telemetry=FASTAPI_NATIVE_TELEMETRY_OFF,
        title="AutoGen Fleet device gateway",
        version="1",
        lifespan=lifespan,
    )
    app.state.infra = infra
    app.state.bridge = bridge
    app.state.admin = admin
    app.state.dispatch_stats = dispatch_stats
    app.state.verifier = verifier or InternalTokenVerifier(jwks_url=settings.jwks_url)
    install_http_conventions(app)
    app.include_router(health_router({**infra.health_checks(), "mqtt": mqtt_ready}))
    app.include_router(internal_router())
    instrument_app(app, infra.tracer_provider)
    return app
