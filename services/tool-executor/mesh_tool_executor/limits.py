"""Per-tenant tool rate limits, shared by every tool-executor replica through Redis.

A sliding one-minute window per (tenant, tool) kept as a Redis sorted set of call times,
trimmed and counted atomically in one Lua script, so N replicas enforce one limit and a
burst at a window's edge cannot pass twice the rate (a fixed window would let it). Without
Redis (in-memory tests) the same window lives in the process.

A refused call is not an error of the executor: the agent is told when to try again.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict, deque
from typing import Any

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
    def __init__(self, redis_url: str = "", prefix: str = "tool-executor:rate") -> None:
        self.prefix = prefix
        self._redis: Any = None
        self._script: Any = None
        self._url = redis_url
        self._local: dict[str, deque[float]] = defaultdict(deque)

    def _client(self) -> Any:
        if self._redis is None and self._url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(self._url)
            self._script = self._redis.register_script(_TAKE)
        return self._redis

    async def take(self, tenant: str, tool: str, per_min: int) -> float:
        """Take one call from the tenant's allowance for ``tool``; 0.0 when taken, otherwise the
        seconds to wait. ``per_min`` <= 0 means unlimited."""
        if per_min <= 0:
            return 0.0
        now = time.time()
        key = f"{self.prefix}:{tool}:{tenant}"
        if self._client() is not None:
            wait = await self._script(keys=[key], args=[now, WINDOW_S, per_min, f"{now}:{uuid.uuid4().hex[:8]}"])
            return max(0.0, float(wait))
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
