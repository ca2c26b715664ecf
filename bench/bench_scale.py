"""Scale-out: does adding worker replicas add throughput? (``make bench``)

The sample task through a local mesh whose model takes ``--latency-ms`` per call (a scripted
provider with ``latency_ms``: a remote model's wait, without one), with 1 and then ``--replicas``
worker processes, each taking one message at a time (``MESH_MAX_WORKERS=1`` for the workers
only). A task makes five worker model calls, so one replica holds a task for about one second
of waiting: the workers are the bottleneck, and the ratio shows how well replicas share the
load through their shared durable consumers. It also prints how many of the machine's cores
the mesh kept busy: where that nears all of them, the cores and not the workers set the pace
(on two cores at 200 ms, four replicas get there; ``--latency-ms 500`` shows the workers' own
scaling).

    python bench/bench_scale.py [--replicas 4] [--latency-ms 200] [--in-flight 16] [--window-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench_task import cpu_s, processes

from mesh_contracts.v1 import TaskCompleted
from meshctl import local
from meshctl.client import TenantClient

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
TARGET = 3.5  # the bar for 1 -> 4 replicas


def model_config(path: Path, latency_ms: float) -> Path:
    path.write_text(
        json.dumps(
            {
                "providers": {"remote": {"kind": "scripted", "latency_ms": latency_ms}},
                "models": {"m": {"provider": "remote", "id": "scripted-1"}},
                "routes": {"default": ["m"]},
            }
        )
    )
    return path


async def run(replicas: int, latency_ms: float, in_flight: int, window_s: float) -> dict:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-scale-"))
    config = model_config(home.parent / f"{home.name}-models.json", latency_ms)
    env = {"MESH_MODEL_CONFIG": str(config)}
    others = tuple(s for s in local.SERVICES if s != "worker")
    try:
        state = await local.up(
            home, tenants=["bench"], nats_port=0, http_port=0, redis_port=0, services=others, service_env_extra=env
        )
        ids = local.Identities(home)
        workers = {
            f"worker-{i}": local.start_service(
                ids, state.nats_url, "worker", name=f"worker-{i}", extra_env=env | {"MESH_MAX_WORKERS": "1"}
            )
            for i in range(1, replicas + 1)
        }
        state.services |= workers
        state.save()
        await local.wait_ready(workers)
        async with TenantClient.of(ids, state.nats_url, "bench") as c:
            await c.submit(GOAL, timeout=120)  # warm-up
            # Closed loop: ``in_flight`` tasks at all times (each finished one is replaced), and
            # completions counted over ``window_s`` once as many tasks as are in flight have
            # finished (the first ones all start together and the pipeline takes every task's
            # first step before any second step, so a one-off batch mostly measures its own
            # ramp and drain).
            finished: list[float] = []
            failed = 0
            end = float("inf")

            async def loop() -> None:
                nonlocal failed
                while time.perf_counter() < end:
                    seen = await c.submit(GOAL, timeout=600)
                    if isinstance(seen.outcome, TaskCompleted):
                        finished.append(time.perf_counter())
                    else:
                        failed += 1

            pids = list(processes(state).values())
            t0 = time.perf_counter()
            loops = [asyncio.create_task(loop()) for _ in range(in_flight)]
            while len(finished) < in_flight:
                await asyncio.sleep(0.05)
            begin = time.perf_counter()
            # Completions still come in waves: the window spans at least two of them.
            window_s = max(window_s, 2 * (begin - t0))
            end = begin + window_s
            cpu0 = sum(map(cpu_s, pids)) + time.process_time()
            await asyncio.sleep(window_s)
            busy = (sum(map(cpu_s, pids)) + time.process_time() - cpu0) / window_s
            await asyncio.gather(*loops)
        counted = sum(begin <= t < end for t in finished)
        return {"replicas": replicas, "per_s": counted / window_s, "counted": counted, "failed": failed,
                "cores": busy, "window_s": window_s}  # fmt: skip
    finally:
        local.down(home)
        shutil.rmtree(home, ignore_errors=True)
        config.unlink(missing_ok=True)


async def main(replicas: int, latency_ms: float, in_flight: int, window_s: float) -> None:
    one = await run(1, latency_ms, in_flight, window_s)
    many = await run(replicas, latency_ms, in_flight, window_s)
    print(f"worker scale-out: model latency {latency_ms:g} ms per call, one message at a time per worker, "
          f"{in_flight} tasks kept in flight, completions counted once {in_flight} had finished, over {window_s:g} s or two waves")  # fmt: skip
    for r in (one, many):
        print(f"  {r['replicas']} worker(s): {r['per_s']:.2f} tasks/s ({r['counted']} completed in {r['window_s']:.0f} s, "
              f"{r['failed']} failed), {r['cores']:.2f} of {os.cpu_count()} cores busy")  # fmt: skip
    ratio = many["per_s"] / one["per_s"]
    met = "met" if ratio >= TARGET * replicas / 4 else "not met"
    print(f"  throughput {replicas} / 1 replicas: {ratio:.2f}x (target >= {TARGET * replicas / 4:g}x: {met})")
    if many["cores"] > 0.8 * (os.cpu_count() or 1):
        print("  (the machine's cores, not the workers, limited the larger run: a longer --latency-ms shows the "
              "workers' own scaling)")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--window-s", type=float, default=20.0)
    a = ap.parse_args()
    if a.replicas < 2 or a.in_flight < 1 or a.latency_ms < 0 or a.window_s <= 0:
        ap.error(
            "--replicas must be at least 2, --in-flight at least 1, --latency-ms not negative, --window-s positive"
        )
    asyncio.run(main(a.replicas, a.latency_ms, a.in_flight, a.window_s))
