"""A tenant-scoped response cache in Redis, keyed by everything that determines the answer.

Opt-in per call (``ModelRequest.cache``). Entries live under
``{namespace}:{tenant}:{sha256}``: the tenant is a key segment of its own (validated, so it
cannot smuggle in another tenant's segment), which keeps one tenant from ever reading
another's answers and lets an operator drop one tenant's entries with a single pattern.

What is cached: answers that finished normally (``finish_reason`` ``stop`` or
``tool_calls``). Not cached: answers cut off at ``max_tokens`` (``length``: usually a failure
the caller will want to retry, and a cache would pin it), filtered or otherwise unusual
finishes, and errors (an exception never reaches ``put``).

The cache never fails a model call: a Redis error, a timeout or an unreadable entry is a miss
(counted in ``errors``, logged once per outage rather than once per call).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from mesh_llm.errors import LlmError
from mesh_llm.model import ModelRequest, ModelResponse, ToolCall

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

# Mirrors mesh_contracts' ID_PATTERN (mesh_llm does not depend on the contracts package):
# no ':' and no glob characters, so a tenant is exactly one key segment.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CACHEABLE_FINISH = frozenset({"stop", "tool_calls"})
# What a broken or unreachable Redis raises (redis-py wraps most in RedisError; a timeout of
# ours is TimeoutError; a socket error can surface raw).
_REDIS_FAILURES = (RedisError, OSError, TimeoutError)
# Bumped whenever the key derivation or the stored format changes: old entries just expire.
FORMAT = 1


class _InvalidTenant(ValueError, LlmError):
    """A caller bug, not a cache failure: raised, never swallowed as a miss."""


class ResponseCache:
    """Redis-backed response cache, scoped by tenant, opt-in per request.

    ``hits`` and ``misses`` count lookups since construction; ``errors`` counts lookups and
    stores that did not work (Redis down or slow, an unreadable entry; a failed lookup is also
    a miss). ``on_lookup(hit)`` is called once per lookup so a caller can feed OpenTelemetry
    counters. ``timeout_s`` bounds each Redis command, and after a Redis failure the cache is
    skipped for ``backoff_s``: a broken cache must not slow every model call down. Give it a
    client with a short connect timeout and few retries (redis-py retries with backoff by
    default, which ``timeout_s`` then cuts short).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        ttl_s: float = 3600,
        namespace: str = "mesh:llmcache",
        on_lookup: Callable[[bool], None] | None = None,
        timeout_s: float | None = 1.0,
        backoff_s: float = 5.0,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if not namespace or any(c.isspace() or c in "*?[]" for c in namespace):
            raise ValueError(f"invalid cache namespace {namespace!r}")
        self.redis = redis
        self.ttl_s = ttl_s
        self.namespace = namespace
        self.on_lookup = on_lookup
        self.timeout_s = timeout_s
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.backoff_s = backoff_s
        self._failing = False
        self._down_until = 0.0

    def key(self, tenant: str, provider: str, model: str, request: ModelRequest) -> str:
        """``{namespace}:{tenant}:{sha256 of the canonical JSON of provider, model, request}``.

        Raises ``ValueError`` for a tenant that is not a plain identifier (it must not be able
        to add ':'-separated segments of its own).
        """
        if not TENANT_PATTERN.match(tenant):
            raise _InvalidTenant(f"invalid tenant {tenant!r} for a cache key (expected {TENANT_PATTERN.pattern})")
        canonical = json.dumps(
            {"v": FORMAT, "provider": provider, "model": model, "request": request.fingerprint()},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
        return f"{self.namespace}:{tenant}:{hashlib.sha256(canonical.encode()).hexdigest()}"

    async def get(self, tenant: str, provider: str, model: str, request: ModelRequest) -> ModelResponse | None:
        """The cached answer to ``request``, or None (a miss, or ``request.cache`` is off)."""
        if not request.cache:
            return None
        response: ModelResponse | None = None
        key = self._key_or_none(tenant, provider, model, request)
        if key is not None and self._available():
            try:
                raw = await self._call(self.redis.get(key))
            except _REDIS_FAILURES as e:
                self._outage("get", e)
            else:
                self._recovered()
                if raw is not None:
                    try:
                        response = _decode(raw)
                    except (ValueError, KeyError, TypeError) as e:
                        # Corrupt, or written in another format: a miss, and the put after the
                        # call overwrites it.
                        self.errors += 1
                        log.warning("unreadable response cache entry %s (%s: %s)", key, type(e).__name__, e)
        if response is None:
            self.misses += 1
        else:
            self.hits += 1
        self._report(response is not None)
        return response

    async def put(self, tenant: str, provider: str, model: str, request: ModelRequest, response: ModelResponse) -> bool:
        """Store ``response`` for ``request`` with the TTL; returns whether it was stored (not
        when ``request.cache`` is off, the answer is not cacheable, or Redis failed)."""
        if not request.cache or response.finish_reason not in CACHEABLE_FINISH:
            return False
        key = self._key_or_none(tenant, provider, model, request)
        if key is None or not self._available():
            return False
        try:
            value = _encode(response)
        except (ValueError, TypeError) as e:
            # Tool-call arguments that are not JSON: the answer is fine, it just is not cached.
            self.errors += 1
            log.warning("response not cacheable (%s: %s)", type(e).__name__, e)
            return False
        try:
            await self._call(self.redis.set(key, value, px=max(1, round(self.ttl_s * 1000))))
        except _REDIS_FAILURES as e:
            self._outage("put", e)
            return False
        self._recovered()
        return True

    def _key_or_none(self, tenant: str, provider: str, model: str, request: ModelRequest) -> str | None:
        """The key; None (counted, logged) for a request that is not JSON, e.g. a NaN
        temperature. An invalid tenant raises: that is a caller bug, not a cache failure."""
        try:
            return self.key(tenant, provider, model, request)
        except _InvalidTenant:
            raise
        except (ValueError, TypeError) as e:
            self.errors += 1
            log.warning("request not cacheable (%s: %s)", type(e).__name__, e)
            return None

    def _available(self) -> bool:
        """False while backing off after an outage (each call would otherwise wait for the
        client's own retries and our timeout before giving up); counted as an error."""
        if time.monotonic() < self._down_until:
            self.errors += 1
            return False
        return True

    async def _call(self, op: Any) -> Any:
        if self.timeout_s is None:
            return await op
        return await asyncio.wait_for(op, self.timeout_s)

    def _outage(self, what: str, e: BaseException) -> None:
        self.errors += 1
        self._down_until = time.monotonic() + self.backoff_s
        if not self._failing:
            # Once per outage: a down Redis would otherwise log on every model call.
            log.warning(
                "response cache %s failed (%s: %s); treating lookups as misses until it recovers",
                what,
                type(e).__name__,
                e,
            )
            self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("response cache recovered")
            self._failing = False

    def _report(self, hit: bool) -> None:
        if self.on_lookup is None:
            return
        try:
            self.on_lookup(hit)
        except Exception:
            # Telemetry must not fail the model call either.
            log.exception("response cache on_lookup callback failed")


def _encode(r: ModelResponse) -> str:
    return json.dumps(
        {
            "v": FORMAT,
            "content": r.content,
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in r.tool_calls],
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "provider": r.provider,
            "model": r.model,
            "finish_reason": r.finish_reason,
            "cached_input_tokens": r.cached_input_tokens,
        },
        ensure_ascii=False,
        allow_nan=False,
    )


def _decode(raw: bytes | str) -> ModelResponse:
    d = json.loads(raw)
    if d.get("v") != FORMAT:
        raise ValueError(f"cache entry format {d.get('v')!r}, expected {FORMAT}")
    return ModelResponse(
        content=d["content"],
        tool_calls=tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in d["tool_calls"]),
        input_tokens=d["input_tokens"],
        output_tokens=d["output_tokens"],
        provider=d["provider"],
        model=d["model"],
        finish_reason=d["finish_reason"],
        cached_input_tokens=d["cached_input_tokens"],
    )
