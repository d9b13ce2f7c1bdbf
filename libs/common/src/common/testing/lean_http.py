"""A minimal keep-alive HTTP/1.1 client for benchmarks: write the request, read the status
line, the headers and a `Content-Length` body, nothing on top.

Benchmarks time services with it because httpx costs about 1.2 ms of Python per request on a
small machine (`bench/search.py` prints both clients' `/healthz` floor): more than the service's
own work on a fast route, and on a 2-core machine the client's CPU is taken from the services.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode


class LeanHttp:
    """One keep-alive connection to 127.0.0.1:`port`; one request at a time."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self._port = port
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "LeanHttp":
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self._port)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def get(
        self, path: str, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        target = f"{path}?{urlencode(params)}" if params else path
        return await self.request("GET", target, headers=headers)

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        return await self.request("POST", path, json.dumps(body).encode(), headers)

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """Status and body of one request on this connection."""
        if self._reader is None or self._writer is None:
            raise RuntimeError("LeanHttp is used inside `async with`")
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        if body:
            extra += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        head = f"{method} {target} HTTP/1.1\r\nHost: bench\r\n{self._headers}{extra}\r\n"
        self._writer.write(head.encode() + body)
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if ":" in line)
        }
        length = fields.get("content-length")
        if length is None:
            raise RuntimeError(f"{target}: no Content-Length; this client reads only that")
        return status, await self._reader.readexactly(int(length))


class LeanPool:
    """LeanHttp connections for concurrent requests: a free one is reused, else one is opened
    (so the pool grows to the concurrency the benchmark reaches). One idle for `max_idle_s` is
    closed rather than reused: uvicorn closes a keep-alive connection idle for 5 s."""

    def __init__(self, port: int, headers: dict[str, str], *, max_idle_s: float = 3.0) -> None:
        self._port = port
        self._headers = headers
        self._max_idle_s = max_idle_s
        self._free: list[tuple[float, LeanHttp]] = []
        self._all: list[LeanHttp] = []

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[LeanHttp]:
        """A connection for one request (or a few in a row); dropped if the request failed."""
        loop = asyncio.get_running_loop()
        conn = None
        while self._free and conn is None:
            idle_since, conn = self._free.pop()
            if loop.time() - idle_since > self._max_idle_s:
                await self._drop(conn)
                conn = None
        if conn is None:
            conn = await LeanHttp(self._port, self._headers).__aenter__()
            self._all.append(conn)
        try:
            yield conn
        except BaseException:
            await self._drop(conn)
            raise
        self._free.append((loop.time(), conn))

    async def _drop(self, conn: LeanHttp) -> None:
        self._all.remove(conn)
        await conn.__aexit__()

    async def close(self) -> None:
        """Close every connection."""
        for conn in self._all:
            await conn.__aexit__()
        self._all.clear()
        self._free.clear()
