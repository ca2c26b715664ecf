"""Per-tenant tool rate limits, shared by every tool-executor replica through Redis.

A sliding one-minute window per (tenant, tool) kept as a Redis sorted set of call times,
trimmed and counted atomically in one Lua script, so N replicas enforce one limit and a
burst at a window's edge cannot pass twice the rate (a fixed window would let it). Without
Redis (in-memory tests) the same window lives in the process.

While Redis is unreachable the limiter degrades instead of failing tool calls: each replica
keeps the window in its own process (so N replicas admit up to N times the limit for as long
as the outage lasts), the service stays ready and says it is degraded, and
``mesh.tool.rate_limit.local`` counts the decisions taken that way.

A refused call is not an error of the executor: the agent is told when to try again.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from mesh_durable import redis
from mesh_durable.redis import redis_client, redis_errors
from mesh_host.deps import Dependency

WINDOW_S = 60.0

# KEYS[1] the window; ARGV: now, window, limit, member. Returns 0 when taken, else the seconds
# until the oldest call in the window leaves it.
_TAKE = """
local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
  return '0'
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""


class RateLimiter:
    def __init__(
        self, redis_url: str = "", prefix: str = "tool-executor:rate", on_local: Callable[[], None] | None = None
    ) -> None:
        self.prefix = prefix
        self._redis: Any = None
        self._script: Any = None
        self._url = redis_url
        self._local: dict[str, deque[float]] = defaultdict(deque)
        self.dependency: Dependency | None = None
        """Redis, once a client exists: optional (see the module's note on an outage)."""
        self.local_decisions = 0
        self.on_local = on_local
        """Decisions taken in the process while Redis was configured but down."""

    def connect(self) -> Dependency | None:
        """Make the Redis client (when one is configured); its dependency, for the service to track."""
        self._client()
        return self.dependency

    def _client(self) -> Any:
        if self._redis is None and self._url:
            self._redis = redis_client(self._url)
            self._script = self._redis.register_script(_TAKE)
            self.dependency = redis.dependency(
                self._redis, required=False, purpose="tool rate limits kept per replica until it is back"
            )
        return self._redis

    async def take(self, tenant: str, tool: str, per_min: int) -> float:
        """Take one call from the tenant's allowance for ``tool``; 0.0 when taken, otherwise the
        seconds to wait. ``per_min`` <= 0 means unlimited."""
        if per_min <= 0:
            return 0.0
        now = time.time()
        key = f"{self.prefix}:{tool}:{tenant}"
        if self._client() is not None and (self.dependency is None or self.dependency.up):
            try:
                wait = await self._script(keys=[key], args=[now, WINDOW_S, per_min, f"{now}:{uuid.uuid4().hex[:8]}"])
            except redis_errors() as exc:
                if self.dependency is not None:
                    self.dependency.down(exc)
            else:
                return max(0.0, float(wait))
        if self._redis is not None:
            self.local_decisions += 1
            if self.on_local is not None:
                self.on_local()
        window = self._local[key]
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        if len(window) < per_min:
            window.append(now)
            return 0.0
        return window[0] + WINDOW_S - now

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
