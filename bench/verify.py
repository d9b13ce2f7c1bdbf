"""Bench: `/auth/verify` through nginx `auth_request` with a cached token, against an nginx
`return 200` location, in one run and one nginx.

A private nginx (1 worker, like the local stack's) renders the real gateway template on a free
port and adds a bench server whose `/verified` runs the template's own `/_auth/verify`
subrequest to the running tokens service (127.0.0.1:8101), and whose `/baseline` is
`return 200`. `wrk` (Debian package) loads each for a bounded time on loopback. Needs the local
stack and the tokens service (`deploy/local/services start tokens`). Prints readable lines,
then one JSON line per metric. Not a test: nothing here asserts a time.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common.testing.stack import load_stack_env

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "nginx" / "api-gateway.conf.template"
TOKENS = "http://127.0.0.1:8101"
UPSTREAMS = {"TOKENS": 8101, "FLEET": 8102, "COMMANDS": 8103, "FIRMWARE": 8104,
             "GATEWAY": 8105, "CONSOLE": 8106}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def verify_block(template: str) -> str:
    """The template's `location = /_auth/verify { ... }`, so the bench runs the real one."""
    match = re.search(r"  location = /_auth/verify \{.*?\n  \}\n", template, re.S)
    if match is None:
        raise SystemExit("the gateway template has no `location = /_auth/verify` block")
    return match.group(0)


def render(workdir: Path, gateway_port: int, bench_port: int) -> Path:
    template = TEMPLATE.read_text()
    values = {f"{name}_UPSTREAM": f"127.0.0.1:{port}" for name, port in UPSTREAMS.items()}
    values |= {"NGINX_LISTEN": f"127.0.0.1:{gateway_port}", "NGINX_ACCESS_LOG": "off"}
    # The bench measures verification, not the rate limiter.
    values |= {"RATE_LIMIT_PER_ADDR": "1000000r/s", "RATE_LIMIT_PER_TOKEN": "1000000r/s"}
    gateway = re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], template)
    gateway = gateway.replace("access_log off autogen_json;", "access_log off;")
    bench_server = f"""
server {{
  listen 127.0.0.1:{bench_port};
  access_log off;
  proxy_http_version 1.1;
{verify_block(template)}
  location = /verified {{
    auth_request /_auth/verify;
    auth_request_set $bench_token $upstream_http_x_internal_token;
    root {workdir};
    try_files /ok.txt =500;
  }}
  location = /baseline {{
    return 200 'ok';
  }}
}}
"""
    (workdir / "ok.txt").write_text("ok")
    (workdir / "gateway.conf").write_text(gateway + bench_server)
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n  default_type application/octet-stream;\n  keepalive_timeout 65;\n"
        f"  keepalive_requests 1000000;\n"
        + "".join(
            f"  {kind}_temp_path {workdir}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"  include {workdir}/gateway.conf;\n}}\n"
    )
    return conf


def wrk(url: str, headers: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """Requests/s, p50/p99 latency (ms) and non-2xx count reported by wrk."""
    command = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s",
               "--latency", "--timeout", "5s"]  # fmt: skip
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": rps,
        "p50_ms": _latency(out, "50%"),
        "p99_ms": _latency(out, "99%"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


def _latency(out: str, label: str) -> float:
    match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
    if match is None:
        raise SystemExit(f"wrk printed no {label} latency:\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
    return float(match.group(1)) * scale


def make_token(client: httpx.Client) -> tuple[str, str, str]:
    """A read token for the admin account (session, token id, secret)."""
    email = os.environ.get("AUTOGEN_ADMIN_EMAIL", "admin@autogen.local")
    password = os.environ.get("AUTOGEN_ADMIN_PASSWORD", "admin-dev-password")
    login = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    login.raise_for_status()
    session = login.json()["access_token"]
    verified = client.get("/auth/verify", headers={"Authorization": f"Bearer {session}"})
    internal = {"X-Internal-Token": verified.headers["x-internal-token"]}
    me = client.get("/api/v1/me", headers=internal).json()
    body = {"name": "bench verify", "user_id": me["user_id"], "access": "read",
            "expires_in_days": 1}  # fmt: skip
    created = client.post("/api/v1/tokens", json=body, headers=internal)
    created.raise_for_status()
    return verified.headers["x-internal-token"], created.json()["id"], created.json()["token"]


def wait_port(port: int, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nginx did not listen on {port}")


def metric(name: str, value: float, unit: str, baseline: float) -> dict[str, Any]:
    return {"bench": "verify", "metric": name, "value": round(value, 2), "unit": unit,
            "baseline": round(baseline, 2), "baseline_name": "nginx return 200 location",
            "ratio": round(value / baseline, 3) if baseline else None}  # fmt: skip


def main() -> int:
    args = parse_args()
    load_stack_env(REPO)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    with httpx.Client(base_url=TOKENS, timeout=10) as client:
        if client.get("/readyz").status_code != 200:
            raise SystemExit("tokens is not ready: deploy/local/services start tokens")
        internal, token_id, secret = make_token(client)
        with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
            workdir = Path(tmp)
            bench_port = free_port()
            conf = render(workdir, free_port(), bench_port)
            proc = subprocess.Popen([nginx, "-p", str(workdir), "-c", str(conf), "-e",
                                     str(workdir / "error.log")])  # fmt: skip
            try:
                wait_port(bench_port)
                base = f"http://127.0.0.1:{bench_port}"
                auth = {"Authorization": f"Bearer {secret}"}
                check = httpx.get(f"{base}/verified", headers=auth)
                if check.status_code != 200:
                    raise SystemExit(f"verify through nginx answered {check.status_code}")
                print(f"tokens /auth/verify through nginx auth_request, {args.connections} "
                      f"connections, {args.duration} s each (wrk, loopback)")  # fmt: skip
                baseline = wrk(f"{base}/baseline", {}, args)
                verified = wrk(f"{base}/verified", auth, args)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
        client.delete(f"/api/v1/tokens/{token_id}", headers={"X-Internal-Token": internal})
    for label, result in (("nginx return 200", baseline), ("auth_request verify", verified)):
        print(f"  {label:<22} {result['rps']:>9.0f} req/s   p50 {result['p50_ms']:.2f} ms   "
              f"p99 {result['p99_ms']:.2f} ms   non-2xx {result['errors']:.0f}")  # fmt: skip
    print("  target: >= 3000 verifies/s and p99 <= 10 ms")
    print(json.dumps(metric("verifies_per_s", verified["rps"], "req/s", baseline["rps"])))
    print(json.dumps(metric("verify_p99_ms", verified["p99_ms"], "ms", baseline["p99_ms"])))
    return 0 if verified["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
