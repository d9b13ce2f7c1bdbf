"""The API gateway's own answers: rate limits, oversized bodies, the tokens service down.

Each case runs a private nginx rendered from the real template (deploy/nginx/) with the limits
and upstreams the case needs, so it can throttle or break things without touching the shared
local stack.
"""

import asyncio
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from common.testing.stack import StackAddresses

pytestmark = pytest.mark.stack

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "api-gateway.conf.template"
DEFAULT_PORTS = {
    "TOKENS": 8101,
    "FLEET": 8102,
    "COMMANDS": 8103,
    "FIRMWARE": 8104,
    "GATEWAY": 8105,
    "CONSOLE": 8106,
}
PORTS = {name: int(os.environ.get(f"{name}_HTTP_PORT", p)) for name, p in DEFAULT_PORTS.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    return free_port()


Gateway = Callable[..., str]


@pytest.fixture
def private_gateway(tmp_path: Path, stack: StackAddresses) -> Iterator[Gateway]:
    """`private_gateway(per_addr=..., per_token=..., tokens_port=...)` → its base URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    started: list[subprocess.Popen[bytes]] = []

    def start(
        *,
        per_addr: str = "10000r/s",
        per_token: str = "10000r/s",  # noqa: S107 - a rate, not a secret
        tokens_port: int | None = None,
    ) -> str:
        port = free_port()
        values = {f"{name}_UPSTREAM": f"127.0.0.1:{p}" for name, p in PORTS.items()}
        if tokens_port is not None:
            values["TOKENS_UPSTREAM"] = f"127.0.0.1:{tokens_port}"
        values |= {
            "NGINX_LISTEN": f"127.0.0.1:{port}",
            "NGINX_ACCESS_LOG": str(tmp_path / "access.log"),
            "RATE_LIMIT_PER_ADDR": per_addr,
            "RATE_LIMIT_PER_TOKEN": per_token,
        }
        rendered = re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], TEMPLATE.read_text())
        (tmp_path / "gateway.conf").write_text(rendered)
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temp_paths = "".join(
            f"  {kind}_temp_path {tmp_path}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = tmp_path / "nginx.conf"
        conf.write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
            f"error_log {tmp_path}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n  default_type application/octet-stream;\n{temp_paths}"
            f"  include {tmp_path}/gateway.conf;\n}}\n"
        )
        process = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf)])
        started.append(process)
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return f"http://127.0.0.1:{port}"
            if process.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        raise AssertionError((tmp_path / "error.log").read_text())

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


async def burst(url: str, count: int, headers: dict[str, str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=50)) as client:
        return await asyncio.gather(*(client.get(url, headers=headers) for _ in range(count)))


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers.get("x-request-id")
    body: dict[str, object] = response.json()
    assert body["status"] == status
    return body


async def test_a_token_over_its_rate_gets_429_problems(private_gateway: Gateway) -> None:
    base = private_gateway(per_token="5r/s")
    responses = await burst(f"{base}/api/v1/me", 300, {"Authorization": "Bearer agk_flood"})
    limited = [r for r in responses if r.status_code == 429]
    assert limited, "no request was rate limited"
    assert_problem(limited[0], 429)
    assert limited[0].headers["retry-after"] == "1"
    # The rest were let through to authentication (and refused there: the token is bogus).
    assert {r.status_code for r in responses} <= {401, 429}
    # Another token is not punished for the first one's flood.
    other = await burst(f"{base}/api/v1/me", 5, {"Authorization": "Bearer agk_calm"})
    assert all(r.status_code == 401 for r in other)


async def test_an_address_over_its_rate_gets_429_problems(private_gateway: Gateway) -> None:
    base = private_gateway(per_addr="5r/s")
    # Anonymous requests count against the address (and are refused by authentication).
    responses = await burst(f"{base}/api/v1/me", 400, {})
    statuses = {r.status_code for r in responses}
    assert statuses == {401, 429}, statuses
    assert_problem(next(r for r in responses if r.status_code == 429), 429)


async def test_an_oversized_body_gets_413_problem(private_gateway: Gateway) -> None:
    base = private_gateway()
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{base}/api/v1/auth/login", content=b"x" * (2 * 1024 * 1024))
    assert_problem(response, 413)


async def test_tokens_service_down_gets_503_with_retry_after(private_gateway: Gateway) -> None:
    base = private_gateway(tokens_port=closed_port())
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"{base}/api/v1/devices", headers={"Authorization": "Bearer agk_anything"}
        )
    body = assert_problem(response, 503)
    assert response.headers["retry-after"] == "5"
    assert "verified" in str(body["detail"])
