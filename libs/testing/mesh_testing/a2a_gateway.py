"""The A2A gateway (``services/a2a``) as its own process beside a test's mesh."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

from mesh_testing.infra import Infra
from meshctl import local
from meshctl.a2a import spawn_a2a


@contextlib.contextmanager
def running_a2a(infra: Infra, env: dict[str, str] | None = None) -> Iterator[str]:
    """The gateway as ``meshctl a2a start`` runs it, against ``infra`` (the home's dev issuer signs
    callers in: ``meshctl.a2a.caller_token``; ``env``: more settings); yields its base URL, stops
    it after."""
    proc = spawn_a2a(infra.ids, infra.nats_url, local.free_port(), env)
    try:
        yield f"http://127.0.0.1:{proc.http_port}"
    finally:
        local.stop([[proc]], 10.0)


def a2a_url(base: str, tenant: str, agent: str) -> str:
    """An agent's A2A base URL (its card under ``/.well-known/agent-card.json`` there)."""
    return f"{base}/a2a/{tenant}/{agent}"


@contextlib.asynccontextmanager
async def another_a2a(infra: Infra, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """``running_a2a`` from a test's event loop: another replica (or a restarted one) of the gateway."""
    proc = await asyncio.to_thread(spawn_a2a, infra.ids, infra.nats_url, local.free_port(), env)
    try:
        yield f"http://127.0.0.1:{proc.http_port}"
    finally:
        await asyncio.to_thread(local.stop, [[proc]], 10.0)
