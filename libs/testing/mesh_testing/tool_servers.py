"""Replicas of the example remote MCP server (``mesh_tool_executor.mcp_servers.orders``) as real
processes on loopback ports, for the scenario tests and the benchmark of tenants' tool servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    """One process of the orders server (``env``: its ``MESH_ORDERS_*`` settings)."""

    def __init__(self, name: str, port: int, env: dict[str, str]) -> None:
        self.name, self.port, self.env = name, port, env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self, timeout: float = 60.0) -> None:
        """Started and accepting connections (a restart reuses the port)."""
        cmd = [sys.executable, "-m", "mesh_tool_executor.mcp_servers.orders", "--port", str(self.port),
               "--replica", self.name]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"orders replica {self.name} exited ({self.proc.returncode})")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise RuntimeError(f"orders replica {self.name} did not listen on {self.port}")

    def kill(self) -> None:
        """SIGKILL, and reaped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def orders_state(path: Path) -> dict[str, Any]:
    """The replicas' shared state (orders, refunds, calls in progress); {} before the first write."""
    return json.loads(path.read_text()) if path.exists() else {}


async def kv_get(infra: Any, key: str) -> dict[str, Any] | None:
    """A record of KV ``toolservers`` (``<tenant>.server|state.<name>``, ``<tenant>.catalogue``), read as admin."""
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value("toolservers")
        try:
            entry = await kv.get(key)
        except Exception:  # noqa: BLE001 - not there (yet): None
            return None
        return json.loads(entry.value) if entry.value else None
    finally:
        await nc.close()


async def until(infra: Any, key: str, ok: Any, timeout: float = 60.0) -> dict[str, Any]:
    """The record at ``key`` once ``ok(record)`` holds (AssertionError with the last one if never)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await kv_get(infra, key)
        if value is not None and ok(value):
            return value
        await asyncio.sleep(0.25)
    raise AssertionError(f"{key} never became as expected; last: {value}")


def tools_of(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A server state's tools by name."""
    return {t["name"]: t for t in state.get("tools", [])}
