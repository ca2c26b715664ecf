"""Backup, restore and erasure against a real mesh that ran real tasks (issue 42).

The mesh (one nats-server, file store, synced, every service) runs ``--tasks`` sample tasks for
two tenants. Then, in the same process tree:

- ``meshctl backup`` (library call, as the admin) against a baseline: copying the broker's store
  directory with ``cp -a`` (what a file-level backup of a stopped broker would cost);
- ``meshctl restore --replace`` into the running mesh (every stream replaced);
- ``meshctl tenant erase`` of one tenant (its auditor key, every place, Redis).

Prints seconds, sizes and the ratio of the backup to the copy (1.00: as fast as copying files).

    python bench/bench_backup.py [--tasks 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from mesh_contracts.v1 import TaskCompleted
from mesh_identity import Signer
from mesh_testing.chaos import started
from mesh_testing.infra import Infra, running_infra
from meshctl import backup, erase
from meshctl.rotation import publish_bundle

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23, and email the answer to ops@acme.test."


async def load(infra: Infra, tasks: int, concurrency: int) -> int:
    done = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal done
        tenant = ("acme", "globex")[i % 2]
        async with gate, infra.client(tenant) as c:
            run = await c.submit(GOAL, task_id=f"bb-{i}", timeout=300)
        done += isinstance(run.outcome, TaskCompleted)

    await asyncio.gather(*(one(i) for i in range(tasks)))
    return done


def main(args: argparse.Namespace) -> None:
    with (
        running_infra(["acme", "globex"], mode="binaries", name="bench-backup") as infra,
        started(infra, {"MESH_LOG_LEVEL": "WARNING"}),
    ):
        asyncio.run(measure(infra, args))


async def measure(infra: Infra, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    ok = await load(infra, args.tasks, args.concurrency)
    print(f"{ok} of {args.tasks} tasks completed in {time.perf_counter() - t0:.1f} s")
    await asyncio.sleep(2.0)
    out = Path(tempfile.mkdtemp()) / "mesh.tar"
    copy = out.parent / "store-copy"
    store = infra.home / "nats" / "jetstream"
    t0 = time.perf_counter()
    await asyncio.to_thread(subprocess.run, ["cp", "-a", str(store), str(copy)], check=True)
    copy_s = time.perf_counter() - t0
    store_mb = sum(p.stat().st_size for p in copy.rglob("*") if p.is_file()) / 1e6
    nc = await infra.admin()
    try:
        t0 = time.perf_counter()
        made = await backup.backup(nc, out)
        backup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        restored = await backup.restore(nc, out, replace=True,
                                        signer=Signer.from_file("admin", infra.ids.signing_key("admin")))  # fmt: skip
        restore_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = await erase.erase(
            nc, infra.ids, "acme", redis=(infra.ids.secrets / "redis" / "admin.url").read_text().strip(),
            even_running=True, publish=lambda b: publish_bundle(infra.ids, b, infra.nats_url),
        )  # fmt: skip
        erase_s = time.perf_counter() - t0
    finally:
        await nc.close()
    msgs = sum(s["messages"] for s in made.streams.values())
    size = out.stat().st_size / 1e6
    print(f"store: {store_mb:.1f} MB on disk; {msgs} messages and records in {len(made.streams)} streams")
    print(f"cp -a of the store (baseline): {copy_s:.2f} s")
    print(f"meshctl backup: {backup_s:.2f} s, {size:.1f} MB ({size / max(backup_s, 1e-9):.0f} MB/s); "
          f"ratio to cp -a: {backup_s / max(copy_s, 1e-9):.2f}")  # fmt: skip
    print(f"meshctl restore --replace (services running): {restore_s:.2f} s for "
          f"{sum(int(s.get('messages', 0)) for s in restored.values())} messages")  # fmt: skip
    slowest = sorted(restored.items(), key=lambda kv: -kv[1].get("seconds", 0))[:5]
    print("  slowest to restore: " + ", ".join(f"{n} {r['seconds']:.2f} s ({r.get('messages', 0)} msgs)"
                                               for n, r in slowest))  # fmt: skip
    print(f"meshctl tenant erase acme: {erase_s:.2f} s, {report.purged} removed from "
          f"{sum(1 for p in report.places if p['purged'])} places, {report.redis_keys} Redis keys")  # fmt: skip
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    main(p.parse_args())
