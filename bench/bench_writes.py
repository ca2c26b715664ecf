"""Stored writes per sample task, by stream and bucket: where a task's fsync'd writes go.

Starts a local mesh, runs one warm-up task, then ``--tasks`` sample tasks one after another, and
prints each stream's growth in sequence numbers per task (a KV bucket is the stream
``KV_<bucket>``; every put, create, update or delete is one stored write).

    python bench/bench_writes.py [--tasks 10]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import nats
from bench_task import GOAL

from meshctl import local
from meshctl.client import TenantClient


async def last_seqs(js: Any) -> dict[str, int]:
    return {si.config.name: si.state.last_seq for si in await js.streams_info()}


async def main(tasks: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-writes-"))
    state = await local.up(home, tenants=["bench"], nats_port=0, http_port=0, redis_port=0)
    ids = local.Identities(home)
    try:
        nc = await nats.connect(state.nats_url, **ids.connect_options("admin"))
        js = nc.jetstream()
        async with TenantClient.of(ids, state.nats_url, "bench") as c:
            await c.submit(GOAL, timeout=60)
            await asyncio.sleep(1.0)  # the warm-up's trailing writes (usage accounting) land
            before = await last_seqs(js)
            for _ in range(tasks):
                await c.submit(GOAL, timeout=60)
            await asyncio.sleep(2.0)
            after = await last_seqs(js)
        await nc.close()
    finally:
        local.down(home)
    per = {k: (after[k] - before.get(k, 0)) / tasks for k in after}
    print(f"stored writes per sample task ({tasks} tasks, one after another):")
    for name, n in sorted(per.items(), key=lambda kv: -kv[1]):
        if n:
            print(f"  {name:<20} {n:6.1f}")
    print(f"  {'total':<20} {sum(per.values()):6.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10)
    a = ap.parse_args()
    if a.tasks < 1:
        ap.error("--tasks must be at least 1")
    asyncio.run(main(a.tasks))
