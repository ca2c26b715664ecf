"""Sample-task latency and throughput through the real mesh, against a raw JetStream baseline.

Everything runs in one process tree on one nats-server (`sync_interval: always`), so the
ratios are meaningful even though absolute times on shared machines are noise:

- baseline: one request -> result hop with raw nats-py (publish to a stream, a pull
  consumer fetches + acks + publishes the result to a stream, the caller sees it);
- mesh: the README's sample task end to end (plan, 3 steps, a tool call, a retrieval, the
  check), sequentially (latency) and with many tasks in flight (throughput).

    python bench/bench_task.py [--tasks 30] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from mesh_contracts import topology as topo
from mesh_contracts.v1 import TaskCompleted
from mesh_planner.settings import PlannerSettings
from meshctl import local
from meshctl.client import TenantClient

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes(state: local.MeshState) -> dict[str, int]:
    """name -> pid of every process of the mesh (services, nats-server, redis-server)."""
    out = {name: p.pid for name, p in state.services.items()}
    out |= {("nats-server" if len(state.nats) == 1 else f"nats-server-{i}"): p.pid for i, p in enumerate(state.nats)}
    if state.redis is not None:
        out["redis-server"] = state.redis.pid
    return out


def cpu_table(before: dict[str, float], after: dict[str, float], tasks: int) -> str:
    """CPU milliseconds per task per process over a run, busiest first, and their sum."""
    per = {k: (after[k] - before[k]) * 1000 / tasks for k in after}
    mesh = sum(v for k, v in per.items() if k != "client")
    rows = [f"    {k:<14} {v:6.1f} ms" for k, v in sorted(per.items(), key=lambda kv: -kv[1])]
    return "\n".join([*rows, f"    {'mesh total':<14} {mesh:6.1f} ms (all processes but the client)"])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def baseline_hop(url: str, opts: dict, n: int) -> list[float]:
    nc = await nats.connect(url, **opts)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"], storage=StorageType.FILE))
    await js.add_consumer(
        "BENCH", ConsumerConfig(durable_name="bench-w", filter_subject="bench.req", ack_policy=AckPolicy.EXPLICIT)
    )
    sub = await js.pull_subscribe_bind("bench-w", "BENCH")
    got: asyncio.Queue[float] = asyncio.Queue()

    async def on_result(_msg: object) -> None:
        got.put_nowait(time.perf_counter())

    await nc.subscribe("bench.res", cb=on_result)

    async def worker() -> None:
        while True:
            try:
                msgs = await sub.fetch(1, timeout=5)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
                await js.publish("bench.res", m.data)

    task = asyncio.create_task(worker())
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await js.publish("bench.req", str(i).encode())
        out.append(await got.get() - t0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # before the connection closes under its fetch
    await js.delete_stream("BENCH")
    await nc.close()
    return out


async def messages_per_task(url: str, opts: dict, tenant: str, task_id: str) -> int:
    nc = await nats.connect(url, **opts)
    js = nc.jetstream()
    total = 0
    for stream in topo.STREAMS.values():
        info = await js.stream_info(stream, subjects_filter=f"*.*.{tenant}.{task_id}.*")
        total += sum((info.state.subjects or {}).values())
    await nc.close()
    return total


async def measure(
    tasks: int, concurrency: int, *, baseline: bool = True, home: Path | None = None, progress: bool = True
) -> dict:
    """Run the benchmark on a fresh local mesh and return its numbers (``main`` prints them).

    ``baseline=False`` skips the raw JetStream hop (bench/bench_peers.py needs only the task's
    numbers); ``home`` is the mesh's home directory (a new temporary one by default).
    ``progress=False``: the throughput run's clients wait for the outcome alone, as a peer's
    client does (then there is no separate outcome-only run).
    """
    home = home or Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))
    t0 = time.perf_counter()
    state = await local.up(home, tenants=["bench"], nats_port=0, http_port=0, redis_port=0)
    up_s = time.perf_counter() - t0
    ids = local.Identities(home)
    admin = ids.connect_options("admin")
    try:
        hop = await baseline_hop(state.nats_url, admin, 300) if baseline else []
        async with TenantClient.of(ids, state.nats_url, "bench") as c:
            await c.submit(GOAL, timeout=60)  # warm-up
            seq = []
            for _ in range(tasks):
                seen = await c.submit(GOAL, timeout=60)
                assert isinstance(seen.outcome, TaskCompleted), seen.outcome
                seq.append(seen.latency_s)
            per_task = await messages_per_task(state.nats_url, admin, "bench", seen.task_id)
            pids = processes(state)
            cpu0 = {k: cpu_s(pid) for k, pid in pids.items()} | {"client": time.process_time()}
            t1 = time.perf_counter()
            runs = await asyncio.gather(
                *(c.submit(GOAL, timeout=120, progress=progress) for _ in range(concurrency * 2))
            )
            wall = time.perf_counter() - t1
            cpu1 = {k: cpu_s(pid) for k, pid in pids.items()} | {"client": time.process_time()}
            ok = sum(isinstance(r.outcome, TaskCompleted) for r in runs)
            # The same again with a client that waits for the outcome alone (progress=False):
            # what a program that needs only the result spends (the peer's client does that).
            if progress:
                c0 = time.process_time()
                quiet = await asyncio.gather(
                    *(c.submit(GOAL, timeout=120, progress=False) for _ in range(concurrency * 2))
                )
                outcome_only_ms = (time.process_time() - c0) * 1000 / len(quiet)
                assert all(isinstance(q.outcome, TaskCompleted) for q in quiet), "an outcome-only task did not complete"
            else:
                outcome_only_ms = (cpu1["client"] - cpu0["client"]) * 1000 / len(runs)
    finally:
        local.down(home)
    return {
        "system": "mesh",
        "up_s": up_s,
        "hop_s": hop,
        "seq_s": seq,
        "p50_ms": statistics.median(seq) * 1000,
        "p99_ms": pct(seq, 0.99) * 1000,
        "messages_per_task": per_task,
        "tasks": tasks,
        "in_flight": len(runs),
        "completed": ok,
        "wall_s": wall,
        "tasks_per_s": ok / wall,
        "cpu_before": cpu0,
        "cpu_after": cpu1,
        "cpu_ms_per_task": {k: (cpu1[k] - cpu0[k]) * 1000 / len(runs) for k in cpu1},
        "client_outcome_only_ms": outcome_only_ms,
    }


async def main(tasks: int, concurrency: int) -> None:
    r = await measure(tasks, concurrency)
    hop, seq, per_task, ok, wall = r["hop_s"], r["seq_s"], r["messages_per_task"], r["completed"], r["wall_s"]
    hop50, task50 = statistics.median(hop), statistics.median(seq)
    print(f"mesh up (nats + redis + provision + 6 services ready): {r['up_s']:.2f}s")
    print(f"baseline raw JetStream request->result hop: p50 {hop50 * 1000:.2f} ms, p99 {pct(hop, 0.99) * 1000:.2f} ms")
    print(
        f"sample task end to end ({tasks} sequential): p50 {task50 * 1000:.1f} ms, p99 {pct(seq, 0.99) * 1000:.1f} ms"
    )
    print(f"  messages stored per task: {per_task} (+ 6 reservation request/replies on core NATS)")
    print(
        f"  ratio task p50 / raw hop p50: {task50 / hop50:.1f}x  "
        f"(per stored message: {task50 / per_task / hop50:.2f} raw hops)"
    )
    print(
        f"throughput, {r['in_flight']} tasks in flight: {ok}/{r['in_flight']} completed, {ok / wall:.1f} tasks/s "
        f"({ok * per_task / wall:.0f} stored msgs/s)"
    )
    print(f"  CPU per task over those {r['in_flight']} tasks (user + system; the client is this process):")
    print(cpu_table(r["cpu_before"], r["cpu_after"], r["in_flight"]))
    print(
        f"  client CPU per task when it waits for the outcome alone (progress=False): "
        f"{r['client_outcome_only_ms']:.1f} ms"
    )
    print(targets_table(r))


TENANT_IN_FLIGHT: int = PlannerSettings.model_fields["admission_max_in_flight"].default
"""The planner's default admission limit (MESH_ADMISSION_MAX_IN_FLIGHT): the bench's one tenant
has twice ``--concurrency`` tasks in flight, and more than this are refused, not measured."""


def targets(r: dict) -> list[tuple[str, float, str, bool]]:
    """Issue 17's targets this benchmark measures: (what, measured, target, met)."""
    cpu = r["cpu_ms_per_task"]
    mesh = sum(v for k, v in cpu.items() if k != "client")
    p50 = statistics.median(r["seq_s"]) * 1000
    return [
        ("CPU per task, every mesh process (ms)", mesh, "<= 80", mesh <= 80),
        ("  budget (ms)", cpu.get("budget", 0.0), "<= 15", cpu.get("budget", 0.0) <= 15),
        ("  nats-server (ms)", cpu.get("nats-server", 0.0), "<= 25", cpu.get("nats-server", 0.0) <= 25),
        ("client waiting for the outcome (ms)", r["client_outcome_only_ms"], "<= 5", r["client_outcome_only_ms"] <= 5),
        ("sequential p50 (ms)", p50, "<= 120", p50 <= 120),
    ]


def targets_table(r: dict) -> str:
    rows = [
        f"  {what:<40} {value:7.1f}  {target:<7} {'met' if met else 'NOT met'}"
        for what, value, target, met in targets(r)
    ]
    return "\n".join(["targets (issue 17; throughput against Temporal: make bench-peers):", *rows])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    if a.tasks < 1 or not 1 <= a.concurrency <= TENANT_IN_FLIGHT // 2:
        ap.exit(2, f"bench_task.py: --tasks must be at least 1 and --concurrency 1 to {TENANT_IN_FLIGHT // 2} "
                   f"(twice that many tasks run at once, and the tenant is admitted {TENANT_IN_FLIGHT})\n")  # fmt: skip
    asyncio.run(main(a.tasks, a.concurrency))
