"""Usage accounting through the budget service, for bench/bench_budget.py: ``usage.recorded``
events published as fast as a worker can, beside raw JetStream storing the same messages; folded
by one budget replica, by two sharing the usage durable, and by two partitions; and a backlog
stored while no budget runs, drained by one replica or by two partitions.

Also what the bench's other measurements take from here: its tenants, the task records it writes
for its tasks, and starting, stopping and waiting out the budget replicas.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import nats
from bench_task import cpu_s, processes
from nats.js.api import StorageType, StreamConfig

from mesh_contracts import topology as topo
from mesh_contracts.v1 import TaskLimits, UsageRecorded
from mesh_contracts.v1.records import StatusRecord
from mesh_host import Mesh
from mesh_kit import envelope as env
from meshctl import local

TENANT = "bench"
USAGE_TENANTS = ("bench", "acme")  # crc32 % 2: partition 1 and partition 0
CHUNK = 100
BUDGETS = ("budget", "budget-2")


class Accounted(NamedTuple):
    """One run of ``usage_accounting``."""

    published: float
    settled: float
    recorded: float
    seen: int
    busy: dict[str, float]


class Drained(NamedTuple):
    """One run of ``drain``."""

    settled: float
    recorded: float
    busy: dict[str, float]


@dataclass
class Accounting:
    """``accounting``: raw JetStream's seconds to store the events, the runs with one replica, two
    replicas and two partitions, how long the new replicas took to go quiet, and problems seen."""

    raw_publish_s: float
    runs: list[Accounted] = field(default_factory=list)
    caught_up: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def create_record(js: Any, task_id: str, tenant: str = TENANT) -> None:
    """A running task as the planner leaves it: its record (``tasks``) and its status (``status``:
    what the budget reads at a task's first reservation; without it the budget denies the call as
    an unknown task)."""
    limits = {"max_tokens": 10**9, "max_cost_usd": 1000}
    record = {"tenant": tenant, "task_id": task_id, "goal": "bench", "status": "running", "created_at": time.time(),
              "limits": limits}  # fmt: skip
    await (await js.key_value("tasks")).create(f"{tenant}.{task_id}", json.dumps(record).encode())
    status = StatusRecord(status="running", created_at=record["created_at"], limits=TaskLimits.model_validate(limits))
    await (await js.key_value(StatusRecord.bucket)).put(f"{tenant}.{task_id}", status.to_bytes())


def stop_budgets(state: local.MeshState) -> None:
    """Stop every budget replica."""
    local.stop([[state.services.pop(k) for k in BUDGETS if k in state.services]])


async def start_budgets(
    state: local.MeshState, ids: local.Identities, partitions: int, extra_env: dict[str, str] | None = None
) -> None:
    """Start ``partitions`` budget replicas (one each; one unpartitioned replica for 1), each with
    ``extra_env`` in its environment, and wait until they are ready."""
    for i, name in enumerate(BUDGETS[:partitions]):
        extra = (extra_env or {}) | (
            {"MESH_BUDGET_PARTITIONS": str(partitions), "MESH_BUDGET_PARTITION": str(i)} if partitions > 1 else {}
        )
        state.services[name] = local.start_service(ids, state.nats_url, "budget", name=name, extra_env=extra)
    state.save()
    await local.wait_ready({k: state.services[k] for k in BUDGETS[:partitions]})


async def gone_quiet(pids: list[int], cores: float = 0.05, timeout: float = 60) -> float:
    """Wait until ``pids`` together keep less than ``cores`` busy over half a second (replicas
    just started have replayed their look-back): seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        before = sum(cpu_s(p) for p in pids)
        await asyncio.sleep(0.5)
        if sum(cpu_s(p) for p in pids) - before < cores * 0.5:
            break
    return time.perf_counter() - t0


def usage_tasks(run: str) -> list[tuple[str, str]]:
    """20 (tenant, task) pairs, the tasks alternating between the usage tenants."""
    return [(USAGE_TENANTS[i % len(USAGE_TENANTS)], f"bench-{run}-{i:02d}") for i in range(20)]


def usage_messages(n: int, tasks: list[tuple[str, str]]) -> list[UsageRecorded]:
    return [
        UsageRecorded(tenant=tasks[i % len(tasks)][0], task_id=tasks[i % len(tasks)][1], agent="worker", step_id="s1", call_id=f"u{i}",
                      provider="scripted", model="scripted-1", input_tokens=60, output_tokens=40)
        for i in range(n)
    ]  # fmt: skip


async def raw_publish(url: str, opts: dict, worker: Mesh, msgs: list[UsageRecorded]) -> float:
    """The same bodies and signed headers, raw js.publish to a scratch stream: seconds for all acks."""
    nc = await nats.connect(url, **opts)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCHU", subjects=["benchu.>"], storage=StorageType.FILE))
    prepared = []
    for m in msgs:
        body = m.to_bytes()
        msg_id = env.message_id(m.type, m.tenant, m.task_id, m.call_id)
        prepared.append((f"benchu.{m.task_id}.{m.call_id}", body, env.headers_for(worker.signer, m, body, msg_id)))
    t0 = time.perf_counter()
    for i in range(0, len(prepared), CHUNK):
        await asyncio.gather(*(js.publish(s, b, headers=h) for s, b, h in prepared[i : i + CHUNK]))
    took = time.perf_counter() - t0
    await js.delete_stream("BENCHU")
    await nc.close()
    return took


async def counted(budget_kv: Any, tasks: list[tuple[str, str]]) -> int:
    total = 0
    for tenant, t in tasks:
        try:
            total += json.loads((await budget_kv.get(f"usage.{tenant}.{t}")).value)["total"]["calls"]
        except nats.js.errors.KeyNotFoundError:
            pass
    return total


async def usage_accounting(
    worker: Mesh, admin: Any, n: int, timeout: float = 60, run: str = "usage", pids: dict[str, int] | None = None
) -> Accounted:
    """Publish ``n`` usage events over 20 tasks as fast as the worker can: seconds for the publishes,
    seconds until every event was settled in the view reservations are decided on (the usage
    durable has nothing pending or unacknowledged), seconds until the spend records (KV ``budget``,
    checkpoints of the stream) count them all (or ``timeout``), how many they had counted by then,
    and the cores each process of ``pids`` (and ``bench``, this process) kept busy until settled."""
    budget_kv = await admin.jetstream().key_value("budget")
    tasks = usage_tasks(run)
    for tenant, t in tasks:
        await create_record(admin.jetstream(), t, tenant)
    msgs = usage_messages(n, tasks)
    pids = pids or {}
    cpu0 = {k: cpu_s(p) for k, p in pids.items()} | {"bench": time.process_time()}
    t0 = time.perf_counter()
    for i in range(0, n, CHUNK):
        await asyncio.gather(*(worker.publish(m, key=m.call_id) for m in msgs[i : i + CHUNK]))
    published = time.perf_counter() - t0
    js = admin.jetstream()
    while time.perf_counter() - t0 < timeout:
        info = await js.consumer_info(topo.STREAMS["usage"], "budget--usage-recorded")
        if not info.num_pending and not info.num_ack_pending:
            break
        await asyncio.sleep(0.02)
    settled = time.perf_counter() - t0
    cpu1 = {k: cpu_s(p) for k, p in pids.items()} | {"bench": time.process_time()}
    seen = 0
    while time.perf_counter() - t0 < timeout:
        seen = await counted(budget_kv, tasks)
        if seen >= n:
            break
        await asyncio.sleep(0.05)
    recorded = time.perf_counter() - t0
    return Accounted(published, settled, recorded, seen, {k: (cpu1[k] - cpu0[k]) / settled for k in cpu0})


async def drain(
    state: local.MeshState, ids: local.Identities, worker: Mesh, admin: Any, n: int, run: str, partitions: int
) -> Drained:
    """Stop every budget replica, store ``n`` usage events, start ``partitions`` replicas (one each;
    one unpartitioned replica for 1): seconds from the moment every replica is ready (imports and
    connecting done: each interpreter pays its own) until every event is settled (the usage
    durable has nothing pending), and until the spend records count them all (checkpointed every
    ``MESH_BUDGET_CHECKPOINT_S``, 1 s), and the cores each process kept busy until settled."""
    stop_budgets(state)
    budget_kv = await admin.jetstream().key_value("budget")
    # Every partitioning's mark at the end of the stream (as if it had kept up): each run folds the
    # backlog alone, not also what another partitioning accounted since its own mark.
    last = (await admin.jetstream().stream_info(topo.STREAMS["usage"])).state.last_seq
    for key in ("accounts", "accounts.0-of-2", "accounts.1-of-2"):
        await budget_kv.put(key, json.dumps({"through": last, "at": time.time()}).encode())
    tasks = usage_tasks(run)
    for tenant, t in tasks:
        await create_record(admin.jetstream(), t, tenant)
    msgs = usage_messages(n, tasks)
    for i in range(0, n, CHUNK):
        await asyncio.gather(*(worker.publish(m, key=m.call_id) for m in msgs[i : i + CHUNK]))
    pids = {k: v for k, v in processes(state).items() if k in ("nats-server", "redis-server")}
    await start_budgets(state, ids, partitions, {"MESH_BUDGET_LOOKBACK_S": "0"})
    pids |= {k: state.services[k].pid for k in BUDGETS[:partitions]}
    cpu0 = {k: cpu_s(p) for k, p in pids.items()}
    t0 = time.perf_counter()
    js = admin.jetstream()
    settled = recorded = 0.0
    busy: dict[str, float] = {}
    while time.perf_counter() - t0 < 120 and not recorded:
        now = time.perf_counter() - t0
        info = await js.consumer_info(topo.STREAMS["usage"], "budget--usage-recorded")
        if not settled and not info.num_pending and not info.num_ack_pending:
            settled = now
            busy = {k: (cpu_s(p) - cpu0[k]) / settled for k, p in pids.items()}
        if settled and await counted(budget_kv, tasks) >= n:
            recorded = now
        await asyncio.sleep(0.02)
    return Drained(settled, recorded, busy)


async def accounting(
    state: local.MeshState, ids: local.Identities, worker: Mesh, admin: Any, creds: dict[str, Any], n: int
) -> Accounting:
    """``n`` usage events stored by raw JetStream, then accounted by the one budget replica, by two
    sharing the usage durable and by two partitions, each once the new replicas have gone quiet.
    The two partitions keep running."""
    msgs = usage_messages(n, usage_tasks("usage"))
    out = Accounting(raw_publish_s=await raw_publish(state.nats_url, creds, worker, msgs))
    out.runs.append(await usage_accounting(worker, admin, n, pids=processes(state)))
    # The same again with a second budget replica: both share the usage durable.
    second = local.start_service(ids, state.nats_url, "budget", name="budget-2")
    state.services["budget-2"] = second
    state.save()
    await local.wait_ready({"budget-2": second})
    out.caught_up.append(await gone_quiet([state.services["budget"].pid, second.pid]))
    out.runs.append(await usage_accounting(worker, admin, n, run="usage2", pids=processes(state)))
    # Both replicas again, as two partitions: each follows one of the two tenants.
    stop_budgets(state)
    await start_budgets(state, ids, 2)
    out.caught_up.append(await gone_quiet([state.services[k].pid for k in BUDGETS]))
    out.runs.append(await usage_accounting(worker, admin, n, run="usage3", pids=processes(state)))
    for label, run in zip(("usage", "usage, 2 replicas", "usage, 2 partitions"), out.runs, strict=True):
        if run.seen < n:
            out.problems.append(f"{label}: only {run.seen}/{n} events in the records after {run.recorded:.1f} s")
    return out


async def drains(
    state: local.MeshState, ids: local.Identities, worker: Mesh, admin: Any, n: int
) -> dict[int, list[Drained]]:
    """A backlog of ``n`` events drained by one replica and by two partitions, twice each in
    turns (the machine drifts), by partitioning; then two partitions again with the default
    look-back, once they have replayed the drains' events."""
    drained: dict[int, list[Drained]] = {}
    for turn, parts in enumerate((1, 2, 1, 2)):  # in turns: the machine drifts
        drained.setdefault(parts, []).append(await drain(state, ids, worker, admin, n, f"drain{turn}", parts))
    # Back to two partitions with the default look-back for the rest.
    stop_budgets(state)
    await start_budgets(state, ids, 2)
    await gone_quiet([state.services[k].pid for k in BUDGETS])  # replayed the drains' events
    return drained
