"""Budget-service costs through the real mesh, each beside a raw nats-py baseline from the same run.

Everything runs in one process tree on one nats-server (`sync_interval: always`), so the
ratios are meaningful even though absolute times on shared machines are noise:

- baseline: a raw nats-py core request/reply round trip (a subscriber that replies at once);
- reservation round trip: a signed ``budget.reserve`` request through the budget service
  (task record read, kill-switch check, the atomic Redis reservation, signed verified reply);
- usage accounting: how many ``usage.recorded`` events per second the budget folds into the
  ``budget`` KV, beside how fast raw JetStream can even store the same messages; then again
  with a second budget replica started (the two share the usage durable; measured once the new
  one has replayed its look-back of the watched streams and gone quiet); then
  with both replicas restarted as two partitions (``MESH_BUDGET_PARTITIONS=2``), each following
  one of the two tenants the events are spread over;
- backlog drain, the capacity the two machines' cores allow: ``--backlog`` (6,000) usage events
  stored while no budget runs, then one replica (or two partitions) started: seconds from ready
  until every event is settled and in the spend records (no publisher competing for the cores;
  the look-back is 0, so the monitor replays nothing older and each run does the same work);
- deadlock detection: from the stored message that closes a wait-for cycle to the budget
  acting on it (the service's own ``detected_after_s``), beside a raw request/reply;
- ceiling crossing -> task stopped: from the client seeing the budget's ``budget.denied``
  event to the client seeing the task's ``task.failed`` outcome (client receive times).

- content-stream messages: CPU per message the budget's monitor folds (a task's worth at a time:
  plan, dispatch, a tool call and a retrieval with their results, the step's end), for the
  budget and for nats-server, the other services stopped so that only the budget reads them.

    python bench/bench_budget.py [--reservations 300] [--usage 2000] [--deadlocks 10] [--ceilings 10]
    python bench/bench_budget.py --only-watched 3 [--watched 3000]

The measurements are in modules beside this script: the usage accounting and the backlog drain in
budget_accounting.py, the monitor's (deadlocks, ceilings, content-stream messages) in
budget_monitor.py; this script runs them in turn on one mesh and prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from budget_accounting import (
    TENANT,
    USAGE_TENANTS,
    Accounting,
    Drained,
    accounting,
    create_record,
    drains,
    start_budgets,
    stop_budgets,
)
from budget_monitor import ceiling_limits, ceilings, deadlocks, watched

from mesh_contracts.v1 import BudgetGranted, BudgetReserve, TaskLimits
from mesh_host import Mesh
from meshctl import local
from meshctl.client import TenantClient


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.2f} ms p99 {pct(values, 0.99) * 1000:.2f} ms"


async def raw_request_reply(url: str, opts: dict, n: int) -> list[float]:
    """Core request/reply with raw nats-py: one connection answers, another asks."""
    server = await nats.connect(url, **opts)
    caller = await nats.connect(url, **opts)

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await server.subscribe("bench.echo", cb=echo)
    await server.flush()
    body = b"x" * 300  # about the size of a budget.reserve body
    for _ in range(20):  # warm-up
        await caller.request("bench.echo", body, timeout=5)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await caller.request("bench.echo", body, timeout=5)
        out.append(time.perf_counter() - t0)
    await caller.close()
    await server.close()
    return out


async def reservations(worker: Mesh, js: Any, n: int) -> list[float]:
    task = "bench-reserve"
    await create_record(js, task)

    def ask(i: int) -> BudgetReserve:
        return BudgetReserve(tenant=TENANT, task_id=task, agent="worker", call_id=f"r{i}", tokens=1000, cost_usd=0.0)

    for i in range(20):  # warm-up (the first one loads the task's view into Redis)
        assert isinstance(await worker.request(ask(10_000 + i), timeout=5), BudgetGranted)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        answer = await worker.request(ask(i), timeout=5)
        out.append(time.perf_counter() - t0)
        assert isinstance(answer, BudgetGranted), answer
    return out


@dataclass(frozen=True)
class Sizes:
    """How much of each measurement (the command line's)."""

    reservations: int
    usage: int
    deadlocks: int
    ceilings: int
    backlog: int
    watched: int


@dataclass
class Measured:
    """What ``main`` measured, in the order it prints it."""

    up_s: float
    raw: list[float]
    reserve: list[float] = field(default_factory=list)
    usage: Accounting | None = None
    drained: dict[int, list[Drained]] = field(default_factory=dict)
    detect: list[float] = field(default_factory=list)
    limits: TaskLimits | None = None
    stop: list[float] = field(default_factory=list)
    quiet: list[float] = field(default_factory=list)
    watch: tuple[int, float, dict[str, float]] | None = None
    problems: list[str] = field(default_factory=list)


async def measure(
    m: Measured,
    sizes: Sizes,
    state: local.MeshState,
    ids: local.Identities,
    creds: dict[str, Any],
    worker: Mesh,
    admin: Any,
) -> None:
    """Everything after the raw baseline, in turn, on the mesh of ``state``."""
    m.reserve = await reservations(worker, admin.jetstream(), sizes.reservations)
    m.usage = await accounting(state, ids, worker, admin, creds, sizes.usage)
    m.problems += m.usage.problems
    if sizes.backlog:
        m.drained = await drains(state, ids, worker, admin, sizes.backlog)
    async with TenantClient.of(ids, state.nats_url, TENANT) as c:
        m.detect, found = await deadlocks(c, sizes.deadlocks)
        m.problems += found
        m.limits = await ceiling_limits(c, admin)
        m.stop, m.quiet, found = await ceilings(c, admin, m.limits, sizes.ceilings)
        m.problems += found
    if sizes.watched:  # last: it stops every service but the budget
        stop_budgets(state)
        await start_budgets(state, ids, 1)
        m.watch = await watched(state, ids, sizes.watched)


async def main(sizes: Sizes) -> None:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-bench-budget-"))
    t0 = time.perf_counter()
    state = await local.up(home, tenants=sorted({TENANT, *USAGE_TENANTS}), nats_port=0, http_port=0, redis_port=0)
    up_s = time.perf_counter() - t0
    ids = local.Identities(home)
    creds = ids.connect_options("admin")
    try:
        m = Measured(up_s, await raw_request_reply(state.nats_url, creds, 500))
        admin = await nats.connect(state.nats_url, **creds)
        worker = Mesh(ids.settings("worker", state.nats_url))
        await worker.connection.connect()
        try:
            await measure(m, sizes, state, ids, creds, worker, admin)
        finally:
            await worker.connection.close()
            await admin.close()
    finally:
        local.down(home)
    report(m, sizes)


def report(m: Measured, sizes: Sizes) -> None:
    raw50 = statistics.median(m.raw)
    print(f"mesh up (nats + redis + provision + 6 services ready): {m.up_s:.2f}s")
    print(f"budget: raw core request/reply {ms(m.raw)} ({len(m.raw)} sequential)")
    print(
        f"  reservation round trip: {ms(m.reserve)} ({statistics.median(m.reserve) / raw50:.1f}x raw; "
        f"{len(m.reserve)} sequential, signed + verified)"
    )
    assert m.usage is not None
    report_usage(m.usage, sizes.usage)
    if m.drained:
        report_drains(m.drained, sizes.backlog)
    if m.detect:
        print(
            f"  deadlock detection (cycle closed -> detected): {ms(m.detect)} "
            f"({statistics.median(m.detect) / raw50:.1f}x raw request/reply; {len(m.detect)} tasks)"
        )
    if m.stop:
        assert m.limits is not None
        print(
            f"  ceiling crossing -> task failed: {ms(m.stop)} ({len(m.stop)} tasks; client sees budget.denied -> "
            f"client sees task.failed, max_tokens {m.limits.max_tokens})"
        )
        print(
            f"  ceiling crossing -> last service stopped: {ms(m.quiet)} (budget.denied -> the last message any "
            f"service published about the task; {statistics.median(m.quiet) / raw50:.1f}x raw request/reply)"
        )
    if m.watch is not None:
        count, took, per = m.watch
        print(
            f"  content-stream messages followed by the monitor (one replica; planner, worker, rag, tool-executor "
            f"publishing): {count} in {took:.2f} s; CPU per message: "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(per.items()))
        )
    for line in m.problems:
        print(f"  PROBLEM: {line}")


def report_usage(a: Accounting, n: int) -> None:
    """The usage accounting lines: one replica, two, two partitions, and the cores each kept busy."""
    one, two, parts = a.runs
    print(
        f"  usage accounting: {n} events settled in {one.settled:.2f} s = {n / one.settled:.0f} events/s, "
        f"in the spend records after {one.recorded:.2f} s (raw JetStream publish of the same: "
        f"{n / a.raw_publish_s:.0f} msgs/s; the signed mesh publishes alone took {one.published:.2f} s)"
    )
    print(
        f"  usage accounting, 2 budget replicas: settled in {two.settled:.2f} s = {n / two.settled:.0f} events/s "
        f"({one.settled / two.settled:.2f}x one replica), in the records after {two.recorded:.2f} s (measured once the "
        f"new replica had replayed its look-back and gone quiet: {a.caught_up[0]:.1f} s)"
    )
    print(
        f"  usage accounting, 2 budget partitions (one replica each): settled in {parts.settled:.2f} s = "
        f"{n / parts.settled:.0f} events/s ({one.settled / parts.settled:.2f}x one replica), in the records after "
        f"{parts.recorded:.2f} s ({one.recorded / parts.recorded:.2f}x one replica; quiet after {a.caught_up[1]:.1f} s)"
    )
    for label, run in (("one replica", one), ("two replicas", two), ("two partitions", parts)):
        top = sorted(((k, v) for k, v in run.busy.items() if v >= 0.05), key=lambda kv: -kv[1])
        print(
            f"    cores busy while accounting, {label}: {sum(run.busy.values()):.2f} of {os.cpu_count()} ("
            + ", ".join(f"{k} {v:.2f}" for k, v in top)
            + ")"
        )


def report_drains(drained: dict[int, list[Drained]], n: int) -> None:
    """The backlog drain lines: the best run of each partitioning."""
    best = {parts: min(runs, key=lambda r: r[0]) for parts, runs in drained.items()}
    for parts, (settled, recorded, busy) in sorted(best.items()):
        label = "1 replica" if parts == 1 else f"{parts} partitions"
        top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(busy.items(), key=lambda kv: -kv[1]) if v >= 0.05)
        print(
            f"  backlog of {n} usage events, {label}: settled {settled:.2f} s after ready = "
            f"{n / settled:.0f} events/s"
            + (f" ({best[1][0] / settled:.2f}x one replica)" if parts > 1 else "")
            + f", in the records after {recorded:.2f} s; cores busy {sum(busy.values()):.2f} ({top})"
        )
    print(f"    (best of {len(drained[1])} runs each, in turns)")


async def main_watched(n: int, runs: int) -> None:
    """Only the content streams' messages (``--only-watched``): a fresh mesh per run."""
    rows = []
    for _ in range(runs):
        home = Path(tempfile.mkdtemp(prefix="agentmesh-bench-budget-"))
        state = await local.up(home, tenants=sorted({TENANT, *USAGE_TENANTS}), nats_port=0, http_port=0, redis_port=0)
        try:
            rows.append(await watched(state, local.Identities(home), n))
        finally:
            local.down(home)
    for count, took, per in rows:
        print(
            f"  content-stream messages followed by the monitor: {count} in {took:.2f} s; CPU per message: "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(per.items()))
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reservations", type=int, default=300)
    ap.add_argument("--usage", type=int, default=2000)
    ap.add_argument("--deadlocks", type=int, default=10)
    ap.add_argument("--ceilings", type=int, default=10)
    ap.add_argument("--backlog", type=int, default=6000, help="usage events for the backlog drain; 0: skip it")
    ap.add_argument("--watched", type=int, default=3000, help="content-stream messages the monitor folds; 0: skip")
    ap.add_argument("--only-watched", type=int, default=0, metavar="RUNS",
                    help="measure only the content-stream messages, on a fresh mesh RUNS times")  # fmt: skip
    a = ap.parse_args()
    if a.only_watched:
        asyncio.run(main_watched(a.watched, a.only_watched))
    else:
        asyncio.run(main(Sizes(a.reservations, a.usage, a.deadlocks, a.ceilings, a.backlog, a.watched)))
