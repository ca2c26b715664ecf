"""Tenants at scale (issue 47): provision thousands of tenants into a running mesh, then have
some of them run the sample task. Loopback only, bounded. (``make bench`` runs a small size;
the issue's numbers come from ``--tenants 10000 --active 1000``.)

What it prints, each measured in this run against a baseline from the same run:

- add-tenant latency, p50 and p99 (``meshctl tenant add``'s work, in-process: credentials,
  keys, a signed record in KV ``tenants``, a link of the tenant's audit chain);
- a tenant's first task right after it was added (no restart anywhere) against the single
  tenant's task latency;
- memory per idle tenant per service (RSS growth over the provisioning / tenants) and per tenant
  met (after the active tenants ran), and nats-server's;
- every service's start until ready with no tenant registered, and with all of them;
- the sample task's latency p50/p99 over the active tenants against the single tenant's.

    python bench/bench_tenants.py [--tenants 10000] [--active 1000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_soak import rss_mb
from bench_task import processes

from mesh_contracts.v1 import TaskCompleted
from meshctl import local
from meshctl.client import TenantClient
from meshctl.registry import Registry

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
ENV = {"MESH_RAG_SEED_TENANTS": "", "MESH_LOG_LEVEL": "WARNING"}  # no tenant has documents: the same work for all


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


async def run_task(ids: local.Identities, url: str, tenant: str, task_id: str) -> float:
    t0 = time.perf_counter()
    async with TenantClient.of(ids, url, tenant) as c:
        seen = await c.submit(GOAL, task_id=task_id, timeout=120)
    if not isinstance(seen.outcome, TaskCompleted):
        raise RuntimeError(f"{tenant}/{task_id}: {seen.outcome}")
    return time.perf_counter() - t0


async def tasks(ids: local.Identities, url: str, tenants: list[str], concurrency: int, tag: str) -> list[float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, t: str) -> float:
        async with gate:
            return await run_task(ids, url, t, f"{tag}-{i}")

    return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(tenants))))


async def up(home: Path) -> tuple[local.MeshState, float]:
    t0 = time.perf_counter()
    state = await local.up(home, tenants=["solo"], nats_port=0, http_port=0, redis_port=0, service_env_extra=ENV)
    return state, time.perf_counter() - t0


def memory(state: local.MeshState) -> dict[str, int]:
    return {name: int(rss_mb(pid) * 1024) for name, pid in processes(state).items()}


async def provision(ids: local.Identities, url: str, names: list[str]) -> list[float]:
    import nats

    nc = await nats.connect(url, **ids.connect_options("admin"))
    try:
        reg = await Registry.open(nc, ids)
        took = []
        for i, t in enumerate(names):
            took.append((await reg.add(t)).seconds)
            if (i + 1) % 1000 == 0:
                print(f"  provisioned {i + 1}/{len(names)} (p99 so far {pct(took, 0.99) * 1000:.1f} ms)", flush=True)
        return took
    finally:
        await nc.close()


async def main(n: int, active: int, concurrency: int) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-tenants-"))
    out: dict[str, object] = {"tenants": n, "active": active, "concurrency": concurrency}
    try:
        state, out["up_s_empty"] = await up(home)
        ids, url = local.Identities(home), state.nats_url
        solo = [await run_task(ids, url, "solo", f"solo-{i}") for i in range(12)][2:]  # two warm-ups
        mem0 = memory(state)
        names = [f"t{i:05d}" for i in range(n)]
        t0 = time.perf_counter()
        took = await provision(ids, url, names)
        out["provision_s"] = time.perf_counter() - t0
        await asyncio.sleep(2.0)
        mem1 = memory(state)
        fresh = [f"fresh{i}" for i in range(10)]  # added, then their first task at once
        first = []
        for t in fresh:
            add = (await provision(ids, url, [t]))[0]
            first.append(add + await run_task(ids, url, t, "first"))
        # The same load from one tenant first: what the tasks themselves leave in memory (caches of
        # tokens, records, the allocator's high water) is then there before the many tenants run.
        solo_many = await tasks(ids, url, ["solo"] * active, concurrency, "solo-many")
        mem_solo = memory(state)
        many = await tasks(ids, url, names[:: max(1, n // active)][:active], concurrency, "many")
        mem2 = memory(state)
        local.down(home)
        state, out["up_s_registered"] = await up(home)
        after_restart = await run_task(ids, url := state.nats_url, names[-1], "after-restart")
        services = [s for s in mem0 if s in local.SERVICES]
        out |= {
            "add_ms_p50": pct(took, 0.5) * 1000, "add_ms_p99": pct(took, 0.99) * 1000,
            "solo_task_s_p50": statistics.median(solo),
            "first_task_after_add_s_p50": statistics.median(first), "first_task_after_add_s_max": max(first),
            "active_task_s_p50": pct(many, 0.5), "active_task_s_p99": pct(many, 0.99),
            "solo_loaded_task_s_p50": pct(solo_many, 0.5), "solo_loaded_task_s_p99": pct(solo_many, 0.99),
            "idle_bytes_per_tenant_per_service": {s: (mem1[s] - mem0[s]) * 1024 / n for s in services},
            "met_bytes_per_tenant_per_service": {s: (mem2[s] - mem_solo[s]) * 1024 / max(1, active) for s in services},
            "nats_server_mib": {"before": mem0["nats-server"] / 1024, "provisioned": mem1["nats-server"] / 1024,
                                "after_solo_tasks": mem_solo["nats-server"] / 1024,
                                "after_tasks": mem2["nats-server"] / 1024},
            "task_after_restart_s": after_restart,
        }  # fmt: skip
        return out
    finally:
        local.down(home)
        shutil.rmtree(home, ignore_errors=True)


def report(r: dict) -> None:  # type: ignore[type-arg]
    idle, met = r["idle_bytes_per_tenant_per_service"], r["met_bytes_per_tenant_per_service"]
    print(f"\ntenants at scale: {r['tenants']} provisioned into a running mesh in {r['provision_s']:.1f} s, "
          f"{r['active']} of them active")  # fmt: skip
    print(
        f"  add a tenant          p50 {r['add_ms_p50']:7.1f} ms   p99 {r['add_ms_p99']:7.1f} ms   (target p99 <= 1000)"
    )
    print(f"  first task after add  p50 {r['first_task_after_add_s_p50']:7.3f} s    max {r['first_task_after_add_s_max']:.3f} s"
          f"   (single tenant's task p50 {r['solo_task_s_p50']:.3f} s)")  # fmt: skip
    print(f"  active tenants' task  p50 {r['active_task_s_p50']:7.3f} s    p99 {r['active_task_s_p99']:.3f} s"
          f"   ({r['concurrency']} at once)")  # fmt: skip
    print(f"  one tenant, same load p50 {r['solo_loaded_task_s_p50']:7.3f} s    p99 {r['solo_loaded_task_s_p99']:.3f} s"
          f"   ratio p50 {r['active_task_s_p50'] / r['solo_loaded_task_s_p50']:.2f}, "
          f"p99 {r['active_task_s_p99'] / r['solo_loaded_task_s_p99']:.2f}")  # fmt: skip
    print(f"  services up until ready: no tenant {r['up_s_empty']:.2f} s, {r['tenants']} registered "
          f"{r['up_s_registered']:.2f} s (ratio {r['up_s_registered'] / r['up_s_empty']:.2f}; target <= 10 s)")  # fmt: skip
    print(
        "  memory per tenant per service (bytes; target idle <= 10240; met: beyond what as many tasks of one "
        "tenant left):"
    )
    for s in idle:
        print(f"    {s:<14} idle {idle[s]:8.0f}   met {met[s]:8.0f}")
    m = r["nats_server_mib"]
    print(f"  nats-server RSS: {m['before']:.0f} MiB before, {m['provisioned']:.0f} MiB provisioned, "
          f"{m['after_solo_tasks']:.0f} MiB after one tenant's tasks, {m['after_tasks']:.0f} MiB after the "
          "active tenants' as many")  # fmt: skip
    print(json.dumps({"bench": "tenants", **r}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=500)
    ap.add_argument("--active", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    report(asyncio.run(main(a.tenants, a.active, a.concurrency)))
