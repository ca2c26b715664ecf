"""Minimal HTTP health endpoint for probes: /healthz (alive), /readyz (ready), /status (JSON).

Plain asyncio so a service needs no web framework; Kubernetes probes and ``meshctl status``
read it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

ReadyFn = Callable[[], tuple[bool, str]]
StatusFn = Callable[[], dict[str, Any]]


class HealthServer:
    def __init__(self, host: str, port: int, ready: ReadyFn, status: StatusFn) -> None:
        self.host, self.port = host, port
        self._ready, self._status = ready, status
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            code, body = self._route(path)
            payload = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {code} {'OK' if code == 200 else 'Service Unavailable' if code == 503 else 'Not Found'}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, path: str) -> tuple[int, Any]:
        if path == "/healthz":
            return 200, {"alive": True, "time": time.time()}
        if path == "/readyz":
            ok, why = self._ready()
            return (200 if ok else 503), {"ready": ok, "reason": why}
        if path == "/status":
            ok, why = self._ready()
            return 200, {"ready": ok, "reason": why, **self._status()}
        return 404, {"error": f"no route {path}"}
