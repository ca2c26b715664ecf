"""Reservations (Redis, atomic) and settled usage (JetStream KV, compare-and-set)."""

from __future__ import annotations

import time

from pydantic import BaseModel

from mesh_contracts.v1 import TokenUsage

# Atomic check-and-reserve for one task. Expired reservations are dropped; a repeated
# request for the same call id is answered with the reservation it already holds.
RESERVE_LUA = """
local key, now, limit, spent, want, id, ttl = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]),
  tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local held, mine = 0, nil
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local tokens, expires = string.match(all[i + 1], '(%d+):(%d+%.?%d*)')
  if tonumber(expires) < now then
    redis.call('HDEL', key, all[i])
  elseif all[i] == id then
    mine = tonumber(tokens)
  else
    held = held + tonumber(tokens)
  end
end
if mine then return {1, limit - spent - held - mine} end
if spent + held + want > limit then return {0, limit - spent - held} end
redis.call('HSET', key, id, want .. ':' .. (now + ttl))
redis.call('EXPIRE', key, math.ceil(ttl) + 60)
return {1, limit - spent - held - want}
"""


class TaskUsage(BaseModel):
    """``budget`` bucket, key ``usage.<tenant>.<task>``: spend per agent, deduplicated by call id."""

    tenant: str
    task_id: str
    total: TokenUsage = TokenUsage()
    by_agent: dict[str, TokenUsage] = {}
    call_ids: list[str] = []
    updated_at: float = 0.0

    @staticmethod
    def key(tenant: str, task_id: str) -> str:
        return f"usage.{tenant}.{task_id}"


class DayUsage(BaseModel):
    """``budget`` bucket, key ``tenant.<tenant>.<yyyymmdd>``."""

    tenant: str
    day: str
    total: TokenUsage = TokenUsage()

    @staticmethod
    def key(tenant: str, day: str) -> str:
        return f"tenant.{tenant}.{day}"


def today() -> str:
    return time.strftime("%Y%m%d", time.gmtime())


class Reservations:
    """Outstanding reservations per task. Redis when configured (shared by replicas)."""

    def __init__(self, redis_url: str, ttl_s: float = 120.0) -> None:
        self.ttl_s = ttl_s
        self._redis = None
        self._mem: dict[str, dict[str, tuple[int, float]]] = {}
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(redis_url)
            self._script = self._redis.register_script(RESERVE_LUA)

    @staticmethod
    def _key(tenant: str, task_id: str) -> str:
        return f"budget:res:{tenant}:{task_id}"

    async def reserve(
        self, tenant: str, task_id: str, call_id: str, tokens: int, limit: int, spent: int
    ) -> tuple[bool, int]:
        now = time.time()
        if self._redis is not None:
            ok, remaining = await self._script(
                keys=[self._key(tenant, task_id)], args=[now, limit, spent, tokens, call_id, self.ttl_s]
            )
            return bool(ok), int(remaining)
        held = {k: v for k, v in self._mem.setdefault(self._key(tenant, task_id), {}).items() if v[1] >= now}
        self._mem[self._key(tenant, task_id)] = held
        others = sum(t for k, (t, _) in held.items() if k != call_id)
        if call_id in held:
            return True, limit - spent - others - held[call_id][0]
        if spent + others + tokens > limit:
            return False, limit - spent - others
        held[call_id] = (tokens, now + self.ttl_s)
        return True, limit - spent - others - tokens

    async def settle(self, tenant: str, task_id: str, call_id: str) -> None:
        if self._redis is not None:
            await self._redis.hdel(self._key(tenant, task_id), call_id)
        else:
            self._mem.get(self._key(tenant, task_id), {}).pop(call_id, None)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
