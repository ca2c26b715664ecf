"""The edge (issue 43): what the HTTP gateway costs a task against the same task through the
tenant's own client, in the same run, on the same mesh. Loopback, scripted model.

- one task at a time, ``--tasks`` of them: submit-to-outcome latency, direct (``TenantClient``:
  the door, then the task's subjects) vs through the edge (``POST /v1/tasks`` after opening its
  event stream, then Server-Sent Events until the outcome, every message verified by the edge);
- ``--concurrency`` at once: tasks per second both ways;
- idle event streams: the edge's memory per open stream (RSS growth over ``--streams`` of them).

    python bench/bench_edge.py [--tasks 40] [--concurrency 8] [--streams 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
import psutil

from mesh_testing.chaos import started
from mesh_testing.edge import bearer, follow_and_submit, running_edge, sse
from mesh_testing.infra import running_infra
from meshctl.edge import user_token

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


async def direct(infra, n: int, concurrency: int, tag: str) -> list[float]:
    sem, out = asyncio.Semaphore(concurrency), []
    async with infra.client("acme") as c:

        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                got = await c.submit(GOAL, task_id=f"d-{tag}-{i}", timeout=60)
                assert got.outcome is not None and got.outcome.type == "task.completed", got.outcome
                out.append(time.perf_counter() - t0)

        await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def through_edge(base: str, token: str, n: int, concurrency: int, tag: str) -> list[float]:
    sem, out = asyncio.Semaphore(concurrency), []

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            events = await follow_and_submit(base, token, f"e-{tag}-{i}", GOAL)
            assert events[-1][2]["type"] == "task.completed", events[-1]
            out.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def idle_streams(base: str, token: str, pid: int, count: int) -> float:
    """KB of the edge's RSS per open, idle event stream."""
    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    async with httpx.AsyncClient(base_url=base, timeout=60.0, limits=httpx.Limits(max_connections=count + 10)) as http:
        opened = [asyncio.Event() for _ in range(count)]
        streams = [sse(http, f"/v1/tasks/idle-{i}/events", bearer(token), o) for i, o in enumerate(opened)]
        pending = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 60)
        await asyncio.sleep(1.0)
        after = proc.memory_info().rss
        for p in pending:
            p.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return (after - before) / count / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--streams", type=int, default=200)
    args = ap.parse_args()
    with running_infra(["acme"], name="bench-edge") as infra, started(infra, {"MESH_LOG_LEVEL": "WARNING"}):
        with running_edge(infra) as base:
            token = user_token(infra.ids, "acme", "alice")
            pid = next(
                p.pid for p in psutil.process_iter(["cmdline"]) if "mesh_edge" in " ".join(p.info["cmdline"] or [])
            )

            async def run() -> None:
                await direct(infra, 5, 1, "warm")
                await through_edge(base, token, 5, 1, "warm")
                d1 = await direct(infra, args.tasks, 1, "seq")
                e1 = await through_edge(base, token, args.tasks, 1, "seq")
                t0 = time.perf_counter()
                await direct(infra, args.tasks, args.concurrency, "par")
                dt = args.tasks / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                await through_edge(base, token, args.tasks, args.concurrency, "par")
                et = args.tasks / (time.perf_counter() - t0)
                kb = await idle_streams(base, token, pid, args.streams)
                print(f"edge bench: {args.tasks} tasks one at a time, submit to outcome p50 / p95:")
                print(f"  direct (TenantClient)  {statistics.median(d1) * 1000:7.1f} / {pct(d1, 0.95) * 1000:7.1f} ms")
                print(f"  through the edge (SSE) {statistics.median(e1) * 1000:7.1f} / {pct(e1, 0.95) * 1000:7.1f} ms"
                      f"   ratio {statistics.median(e1) / statistics.median(d1):.2f}x")  # fmt: skip
                print(f"  {args.concurrency} at once: direct {dt:.1f} tasks/s, through the edge {et:.1f} tasks/s"
                      f"   ratio {et / dt:.2f}x")  # fmt: skip
                print(f"  edge memory per idle event stream: {kb:.1f} KB ({args.streams} open)")

            asyncio.run(run())


if __name__ == "__main__":
    main()
