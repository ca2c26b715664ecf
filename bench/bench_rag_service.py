"""Retrieval latency through the RAG service's own search path, with and without the Redis cache,
beside a raw Redis GET round trip from the same run.

The service's search (``Rag.search``) reads the tenant's manifest from the durable index, then
either answers from Redis (same index version, same query) or loads the index if it changed,
embeds the query, runs hybrid BM25 + vector search and scores every hit for injection. Here the
index lives in a real nats-server's ``rag`` KV bucket and the cache in a real redis-server, both
started by this script; the corpus is bench/data/retrieval.

- baseline: a Redis GET of a cached answer's size (what a cache hit cannot beat);
- cold: every query new to the cache (the cache is flushed before each round);
- warm: the same queries again, answered from Redis;
- ingest: documents per second and chunks per second through ``Rag.ingest`` (extract, chunk,
  embed, store in KV, switch the manifest).

    python bench/bench_rag_service.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import redis.asyncio as aioredis
from nats.js.api import KeyValueConfig, StorageType

from mesh_rag.embed import Embedder
from mesh_rag.extract import SUPPORTED, media_type_for
from mesh_rag.service import Rag
from mesh_rag.store import Store
from meshctl.local import find_binary, free_port

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "bench" / "data" / "retrieval"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def line(name: str, ms: list[float], base: float) -> dict[str, Any]:
    p50, p99 = statistics.median(ms), pct(ms, 0.99)
    print(f"  {name:<34} p50 {p50:8.3f} ms  p99 {p99:8.3f} ms  ({p50 / base:6.1f}x raw GET)")
    return {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "x_raw": round(p50 / base, 1)}


class _Mesh(SimpleNamespace):
    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


def servers(work: Path, nport: int, rport: int) -> list[subprocess.Popen]:
    """A throwaway nats-server (JetStream) and redis-server on loopback, nothing persisted beyond ``work``."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    nats_argv = [find_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(nport), "-sd", str(work)]
    redis_argv = [find_binary("redis-server"), "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no"]  # fmt: skip
    return [subprocess.Popen(nats_argv, **quiet), subprocess.Popen(redis_argv, **quiet)]


async def main(rounds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-rag-"))
    nport, rport = free_port(), free_port()
    procs = servers(work, nport, rport)
    try:
        await asyncio.sleep(0.5)
        nc = await nats.connect(f"nats://127.0.0.1:{nport}")
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket="rag", history=1, storage=StorageType.FILE))
        redis = aioredis.from_url(f"redis://127.0.0.1:{rport}")
        mesh = _Mesh(counters={}, settings=None)
        rag = Rag(mesh, embedder=Embedder.load())  # type: ignore[arg-type]
        rag.store, rag._redis = Store(kv), redis

        files = sorted(p for p in CORPUS.iterdir() if p.suffix.lower() in SUPPORTED)
        started, chunks = time.perf_counter(), 0
        for f in files:
            out = await rag.ingest("bench", f.name, f.read_bytes(), media_type_for(f.name))
            chunks += out["chunks"]
        took = time.perf_counter() - started
        print(f"ingest: {len(files)} documents, {chunks} chunks in {took:.2f}s: "
              f"{len(files) / took:.1f} docs/s, {chunks / took:.1f} chunks/s (extract + chunk + embed + KV)")  # fmt: skip

        queries = [json.loads(x)["query"] for x in (CORPUS / "queries.jsonl").read_text().splitlines() if x.strip()]
        payload = json.dumps([{"text": "x" * 600}] * 5)
        await redis.set("probe", payload)
        raw = []
        for _ in range(rounds * len(queries)):
            t = time.perf_counter()
            await redis.get("probe")
            raw.append((time.perf_counter() - t) * 1000)
        base = statistics.median(raw)
        cold, warm = [], []
        await rag.search("bench", "warm up", 5)
        for _ in range(rounds):
            await redis.flushdb()
            rag._query_vectors.clear()  # cold means the query embedding is computed too
            for q in queries:
                t = time.perf_counter()
                _, _, cached = await rag.search("bench", q, 5)
                cold.append((time.perf_counter() - t) * 1000)
                assert not cached
            for q in queries:
                t = time.perf_counter()
                _, _, cached = await rag.search("bench", q, 5)
                warm.append((time.perf_counter() - t) * 1000)
                assert cached
        print(f"retrieval, {len(queries)} queries x {rounds} rounds, top 5, hybrid:")
        result = {
            "raw_redis_get": line("raw Redis GET (baseline)", raw, base),
            "search_uncached": line("search, cache miss (embed + hybrid)", cold, base),
            "search_cached": line("search, cache hit (same index)", warm, base),
            "ingest_chunks_per_s": round(chunks / took, 1),
            "ingest_docs_per_s": round(len(files) / took, 2),
        }
        print(f"  cache speed-up: {statistics.median(cold) / statistics.median(warm):.1f}x at p50")
        await redis.aclose()
        await nc.close()
        return result
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="repetitions of the query set (default 5)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.exit(2, "bench_rag_service: --rounds must be at least 1\n")
    out = asyncio.run(main(args.rounds))
    Path(".bench").mkdir(exist_ok=True)
    Path(".bench/rag_service.json").write_text(json.dumps(out, indent=2))
    sys.exit(0)
