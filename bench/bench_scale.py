"""Scale-out: does adding worker replicas add throughput? (``make bench``)

The sample task through a local mesh whose model takes ``--latency-ms`` per call (a scripted
provider with ``latency_ms``: a remote model's wait, without one), with 1 and then ``--replicas``
worker processes, each taking one message at a time (``MESH_MAX_WORKERS=1`` for the workers
only). A task makes five worker model calls, so one replica holds a task for about one second
of waiting: the workers are the bottleneck, and the ratio shows how well replicas share the
load through their shared durable consumers. The machine's cores are not the limit at these
rates (a few tasks a second), which is the point: the replicas wait, they do not compute.

    python bench/bench_scale.py [--replicas 4] [--latency-ms 200] [--tasks 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

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


async def run(replicas: int, latency_ms: float, tasks: int) -> dict:
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
            t0 = time.perf_counter()
            runs = await asyncio.gather(*(c.submit(GOAL, timeout=300) for _ in range(tasks)))
            wall = time.perf_counter() - t0
        ok = sum(isinstance(r.outcome, TaskCompleted) for r in runs)
        lat = sorted(r.latency_s for r in runs)
        return {"replicas": replicas, "ok": ok, "tasks": tasks, "per_s": ok / wall, "p50": lat[len(lat) // 2]}
    finally:
        local.down(home)
        shutil.rmtree(home, ignore_errors=True)
        config.unlink(missing_ok=True)


async def main(replicas: int, latency_ms: float, tasks: int) -> None:
    one = await run(1, latency_ms, tasks)
    many = await run(replicas, latency_ms, tasks)
    print(f"worker scale-out: model latency {latency_ms:g} ms per call, one message at a time per worker, "
          f"{tasks} tasks in flight")  # fmt: skip
    for r in (one, many):
        print(f"  {r['replicas']} worker(s): {r['ok']}/{r['tasks']} completed, {r['per_s']:.2f} tasks/s, "
              f"task p50 {r['p50']:.2f} s")  # fmt: skip
    ratio = many["per_s"] / one["per_s"]
    met = "met" if ratio >= TARGET * replicas / 4 else "not met"
    print(f"  throughput {replicas} / 1 replicas: {ratio:.2f}x (target >= {TARGET * replicas / 4:g}x: {met})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--tasks", type=int, default=24)
    a = ap.parse_args()
    if a.replicas < 2 or a.tasks < 1 or a.latency_ms < 0:
        ap.error("--replicas must be at least 2, --tasks at least 1, --latency-ms not negative")
    asyncio.run(main(a.replicas, a.latency_ms, a.tasks))
