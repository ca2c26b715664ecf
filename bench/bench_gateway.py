"""Model-gateway overhead and client-visible time to first token, each against its baseline in
the same run.

1. Per call: raw httpx to a local OpenAI-compatible server against the same call through the
   gateway (OpenAIChat behind Gateway: routing, breaker, retry bookkeeping, parsing into our
   types), non-streamed and streamed. Windows alternate (ABBA) so drift hits both sides.
2. Through the real mesh: the provider's own time to first token (request in -> first chunk
   out, on the server) against the time to first token a following client sees (the same
   request in -> first ``live.token`` delta at the client), per task.

    python bench/bench_gateway.py [--calls 400] [--tasks 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from mesh_llm import Message, ModelRequest
from mesh_llm.gateway import Gateway
from mesh_llm.openai import OpenAIChat
from mesh_testing.fake_llm import FakeLLMServer
from mesh_testing.llm_servers import fake_llm_servers
from meshctl import local
from meshctl.client import TenantClient

MODEL = "gpt-4o-mini-2024-07-18"
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
# One answer step without tools: the worker's first streamed call is the one that produces text,
# so the provider's and the client's first token belong to the same call.
TTFT_GOAL = "PLAN: " + json.dumps(
    {"steps": [{"step_id": "s1", "kind": "answer", "tools": [], "instruction": "Write the final answer to: "
                "JetStream keeps every message in a stream, replays it to consumers and deduplicates by id."}]}
)  # fmt: skip
PROMPT = "Write the final answer to: how does NATS JetStream store messages durably and replay them?"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def per_call(calls: int) -> None:
    async with FakeLLMServer() as srv, httpx.AsyncClient(timeout=30) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 256}
        gw = Gateway({"default": [OpenAIChat(MODEL, base_url=srv.openai_base, client=http)]})
        request = ModelRequest((Message("user", PROMPT),), max_tokens=256)

        async def raw() -> None:
            r = await http.post(srv.openai_base + "/chat/completions", json=body)
            r.raise_for_status()
            assert r.json()["choices"][0]["message"]["content"]

        async def raw_stream() -> None:
            async with http.stream("POST", srv.openai_base + "/chat/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        return
                    if line.startswith("data: "):
                        json.loads(line[6:])

        async def via_gateway() -> None:
            assert (await gw.complete(request)).content

        async def via_gateway_stream() -> None:
            async def sink(_t: str) -> None:
                return None

            assert (await gw.complete(request, on_token=sink)).content

        for label, a, b in (("non-streamed", raw, via_gateway), ("streamed", raw_stream, via_gateway_stream)):
            times: dict[str, list[float]] = {"raw": [], "gw": []}
            for _ in range(20):  # warm-up: connections, encodings
                await a()
                await b()
            window = max(10, calls // 8)
            for w in range(8):
                order = (("raw", a), ("gw", b)) if w % 4 in (0, 3) else (("gw", b), ("raw", a))
                for name, fn in order:
                    for _ in range(window):
                        t0 = time.perf_counter()
                        await fn()
                        times[name].append(time.perf_counter() - t0)
            r50, g50 = statistics.median(times["raw"]), statistics.median(times["gw"])
            print(
                f"gateway per call, {label} ({len(times['gw'])} calls each): raw httpx p50 {r50 * 1000:.3f} ms, "
                f"gateway p50 {g50 * 1000:.3f} ms -> overhead {(g50 - r50) * 1e6:.0f} us/call, ratio {g50 / r50:.2f}x"
            )


async def ttft_through_mesh(tasks: int) -> None:
    with fake_llm_servers() as st:
        srv = st.serve(first_token_delay_s=0.05, token_delay_s=0.005)
        home = Path(tempfile.mkdtemp(prefix="agentmesh-bench-gw-"))
        cfg = home / "models.json"
        cfg.write_text(
            json.dumps(
                {
                    "providers": {"local": {"kind": "openai", "base_url": srv.openai_base}},
                    "models": {"m": {"provider": "local", "id": MODEL}},
                    "routes": {"default": ["m"]},
                }
            )
        )
        os.environ["MESH_MODEL_CONFIG"] = str(cfg)  # `local.up` hands MESH_MODEL* to the services
        state = await local.up(home, tenants=["bench"], nats_port=0, http_port=0, redis_port=0)
        ids = local.Identities(home)
        provider, client, overhead = [], [], []
        offset = time.time() - time.monotonic()
        try:
            async with TenantClient.of(ids, state.nats_url, "bench") as c:
                await c.submit(GOAL, timeout=60)  # warm-up
                for _ in range(tasks):
                    before = len(srv.requests)
                    seen = await c.submit(TTFT_GOAL, timeout=60)
                    assert seen.outcome is not None and seen.first_token_at, seen.outcome
                    first = min((r for r in srv.requests[before:] if r.stream), key=lambda r: r.received_at)
                    p_ttft = first.first_chunk_at - first.received_at
                    c_ttft = (seen.first_token_at - offset) - first.received_at
                    provider.append(p_ttft)
                    client.append(c_ttft)
                    overhead.append(c_ttft - p_ttft)
        finally:
            local.down(home)
            os.environ.pop("MESH_MODEL_CONFIG", None)
    p50, c50, o50 = statistics.median(provider), statistics.median(client), statistics.median(overhead)
    print(
        f"time to first token through the mesh ({tasks} tasks): provider p50 {p50 * 1000:.2f} ms, "
        f"client p50 {c50 * 1000:.2f} ms -> overhead p50 {o50 * 1000:.2f} ms, p90 {pct(overhead, 0.9) * 1000:.2f} ms, "
        f"ratio {c50 / p50:.2f}x"
    )


async def main(calls: int, tasks: int) -> None:
    await per_call(calls)
    await ttft_through_mesh(tasks)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--tasks", type=int, default=15)
    a = ap.parse_args()
    asyncio.run(main(a.calls, a.tasks))
