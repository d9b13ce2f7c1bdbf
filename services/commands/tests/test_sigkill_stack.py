"""Stopping the real commands process: SIGKILL between accept and dispatch loses nothing;
SIGTERM answers waiting GETs at once and stops.

The service runs as `python -m commands serve` in a subprocess. For the SIGKILL, the test holds
the outbox relay's advisory lock, so the relay cannot publish. With the dispatch left to the
relay (`COMMANDS_OUTBOX_EAGER=false`) the process is killed with the accepted commands' dispatch
events still in the outbox; with the dispatch sent at the commit (the default), they were sent
and marked published before the kill. Either way, after a restart every accepted command is
dispatched exactly once and completes. (A dispatch its process never sent goes out in a relay
round after the grace: `libs/common/tests/test_common_outbox.py`.)
"""

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest

from commands import store
from commands.testing import ADMIN, DEALER_1, Bus, eventually, new_id
from common.testing.auth import TestIssuer
from common.testing.plugin import Migrate
from common.testing.stack import StackAddresses, free_port

pytestmark = pytest.mark.stack

COMMANDS = 12


def process_env(
    stack: StackAddresses, url: str, topic_prefix: str, port: int, jwks_url: str
) -> dict[str, str]:
    """The environment of a `python -m commands serve` on this stack, its own database and
    port, trusting the test issuer's keys."""
    return {
        **os.environ,
        "COMMANDS_DATABASE_URL": url,
        "COMMANDS_KAFKA_BOOTSTRAP_SERVERS": stack.kafka_bootstrap_servers,
        "COMMANDS_REDIS_URL": stack.redis_url,
        "COMMANDS_KAFKA_TOPIC_PREFIX": topic_prefix,
        "COMMANDS_HTTP_PORT": str(port),
        "COMMANDS_JWKS_URL": jwks_url,
        "COMMANDS_LOG_LEVEL": "WARNING",
    }


@asynccontextmanager
async def commands_process(
    env: dict[str, str], port: int
) -> AsyncIterator[subprocess.Popen[bytes]]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child process the test kills on purpose
        [sys.executable, "-m", "commands", "serve"], env=env, stdout=log, stderr=log
    )
    try:
        async with httpx.AsyncClient() as client:

            async def ready() -> bool:
                if proc.poll() is not None:
                    log.seek(0)
                    raise AssertionError(log.read().decode(errors="replace")[-3000:])
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/readyz")
                except httpx.TransportError:
                    return False
                return r.status_code == 200

            await eventually(ready, deadline_s=60, interval=0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


@pytest.mark.parametrize("eager", [False, True], ids=["relay", "eager"])
async def test_sigkill_between_accept_and_dispatch_loses_nothing(
    *,
    stack: StackAddresses,
    fresh_database: Migrate,
    topics: list[str],
    topic_prefix: str,
    issuer: TestIssuer,
    eager: bool,
) -> None:
    url = await fresh_database("commands")
    port = free_port()
    bus = Bus(stack.kafka_bootstrap_servers, topic_prefix)
    await bus.start()
    device_id = new_id()
    await bus.device_registered(device_id)
    lock_key = zlib.crc32(f"outbox-relay:{store.outbox.fullname}".encode())
    plain_url = url.replace("postgresql+asyncpg://", "postgresql://")
    holder = await asyncpg.connect(plain_url)
    try:
        with issuer.serve_jwks() as jwks_url:
            env = process_env(stack, url, topic_prefix, port, jwks_url)
            env["COMMANDS_OUTBOX_POLL_INTERVAL_S"] = "0.05"
            env["COMMANDS_OUTBOX_EAGER"] = str(eager).lower()
            base = f"http://127.0.0.1:{port}/api/v1"
            accepted: list[str] = []
            async with commands_process(env, port) as proc, httpx.AsyncClient() as client:

                async def known() -> bool:
                    r = await client.get(
                        f"{base}/devices/{device_id}/commands", headers=issuer.headers(ADMIN)
                    )
                    return r.status_code == 200

                await eventually(known, deadline_s=30)
                # From here on the relay cannot publish: it never gets its lock.
                await holder.execute("SELECT pg_advisory_lock($1)", lock_key)
                for _ in range(COMMANDS):
                    r = await client.post(
                        f"{base}/devices/{device_id}/commands",
                        json={"action": "reboot"},
                        headers=issuer.headers(DEALER_1),
                    )
                    assert r.status_code == 202, r.text
                    accepted.append(r.json()["id"])
                if eager:  # sent at the commit, then marked published: nothing for a round

                    async def sent_and_marked() -> bool:
                        return all(bus.dispatches_of(c) for c in accepted) and (
                            await _unpublished_dispatches(holder) == 0
                        )

                    await eventually(sent_and_marked, deadline_s=30)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)

            if not eager:
                pending = await _unpublished_dispatches(holder)
                assert pending == COMMANDS, "the kill did not land between accept and dispatch"
                assert not [d for d in bus.dispatches if d["device_id"] == device_id]
            # The queued statuses wait for the relay either way.
            assert (
                await holder.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                >= COMMANDS
            )
            await holder.execute("SELECT pg_advisory_unlock($1)", lock_key)

            await _restart_and_complete(
                env=env, bus=bus, issuer=issuer, db=holder, device_id=device_id, accepted=accepted
            )
    finally:
        await holder.close()
        await bus.stop()


async def _restart_and_complete(
    *,
    env: dict[str, str],
    bus: Bus,
    issuer: TestIssuer,
    db: asyncpg.Connection,
    device_id: str,
    accepted: list[str],
) -> None:
    """Start the service again: once its outbox is empty, every accepted command was
    dispatched exactly once, and completes when its device answers."""
    port = free_port()
    env["COMMANDS_HTTP_PORT"] = str(port)
    base = f"http://127.0.0.1:{port}/api/v1"
    async with commands_process(env, port), httpx.AsyncClient() as client:

        async def all_out() -> bool:
            published = not await db.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )
            return published and all(bus.dispatches_of(c) for c in accepted)

        await eventually(all_out, deadline_s=30)
        await asyncio.sleep(0.5)  # a duplicate dispatch would be on the bus by now
        for command_id in accepted:
            assert len(bus.dispatches_of(command_id)) == 1
            cmd = {"id": command_id, "device_id": device_id, "action": "reboot"}
            await bus.gateway_status(cmd, "sent")
            await bus.ack(cmd, "accepted")
            await bus.ack(cmd, "succeeded")

        async def all_succeeded() -> bool:
            for command_id in accepted:
                r = await client.get(
                    f"{base}/commands/{command_id}", headers=issuer.headers(DEALER_1)
                )
                if r.json()["status"] != "succeeded":
                    return False
            return True

        await eventually(all_succeeded, deadline_s=30, interval=0.2)
        await asyncio.sleep(0)


async def _unpublished_dispatches(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND topic = $1",
            "command.dispatch.v1",
        )
    )


async def test_sigterm_answers_waiting_gets_at_once_and_stops(
    stack: StackAddresses,
    fresh_database: Migrate,
    topics: list[str],
    topic_prefix: str,
    issuer: TestIssuer,
) -> None:
    url = await fresh_database("commands")
    port = free_port()
    bus = Bus(stack.kafka_bootstrap_servers, topic_prefix)
    await bus.start()
    device_id = new_id()
    await bus.device_registered(device_id)
    try:
        with issuer.serve_jwks() as jwks_url:
            env = process_env(stack, url, topic_prefix, port, jwks_url)
            base = f"http://127.0.0.1:{port}/api/v1"
            async with (
                commands_process(env, port) as proc,
                httpx.AsyncClient(timeout=40) as client,
            ):

                async def known() -> bool:
                    r = await client.get(
                        f"{base}/devices/{device_id}/commands", headers=issuer.headers(ADMIN)
                    )
                    return r.status_code == 200

                await eventually(known, deadline_s=30)
                r = await client.post(
                    f"{base}/devices/{device_id}/commands",
                    json={"action": "reboot"},
                    headers=issuer.headers(DEALER_1),
                )
                # No gateway here: the command stays queued, the GET waits its 30 s.
                headers = {**issuer.headers(DEALER_1), "Prefer": "wait=30"}
                waiting_get = asyncio.create_task(
                    client.get(f"{base}/commands/{r.json()['id']}", headers=headers)
                )
                await asyncio.sleep(1)
                assert not waiting_get.done()
                proc.send_signal(signal.SIGTERM)
                # Answered with what the command is, rather than held until the server's
                # graceful-shutdown limit (10 s) cuts the connection.
                answer = await asyncio.wait_for(waiting_get, 25)
                assert answer.status_code == 200
                assert answer.json()["status"] in {"queued", "sent"}
                # Stopped (uvicorn raises the signal again after its graceful shutdown).
                assert proc.wait(timeout=15) in {0, -signal.SIGTERM}
    finally:
        await bus.stop()
