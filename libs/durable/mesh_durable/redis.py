"""Redis as the mesh uses it: a client that gives up in seconds, and what its failures look like.

Redis holds what can be rebuilt (caches, rate windows, the budget's fast counters); its loss is a
``mesh_host.deps.Dependency`` going down, never lost work. Clients made by ``redis_client`` time
out in about a second: behind a NetworkPolicy that drops packets a default client would hang in
``connect`` for minutes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mesh_host.deps import Dependency

CONNECT_TIMEOUT_S = 1.0
CALL_TIMEOUT_S = 2.0


def redis_client(url: str, *, call_timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """An asyncio Redis client that gives up in seconds, not minutes, when Redis is unreachable."""
    import redis.asyncio as aioredis

    return aioredis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=call_timeout_s, retry_on_timeout=False
    )


def dependency(client: Any, *, required: bool, purpose: str) -> Dependency:
    """Redis as a backing service of this process (``Mesh.depend``): pinged in the background, and
    down when a ping has not answered within a client's connect and call timeouts."""
    return Dependency(
        "redis", client.ping, required=required, purpose=purpose, timeout_s=CONNECT_TIMEOUT_S + CALL_TIMEOUT_S
    )


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis is unreachable, slow or refusing."""
    import redis.exceptions

    return (redis.exceptions.RedisError, OSError, TimeoutError, asyncio.TimeoutError)
