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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from bench_task import cpu_s, processes
from nats.js.api import StorageType, StreamConfig

from mesh_contracts import Contract
from mesh_contracts import topology as topo
from mesh_contracts.v1 import (
    BudgetGranted,
    BudgetReserve,
    PlanCreated,
    PlanStep,
    ProgressEvent,
    RetrievalCompleted,
    RetrievalHit,
    RetrievalRequested,
    StepCompleted,
    StepRequested,
    TaskCompleted,
    TaskFailed,
    TaskLimits,
    ToolCompleted,
    ToolRequested,
    UsageRecorded,
)
from mesh_kit import Mesh
from mesh_kit import envelope as env
from meshctl import local
from meshctl.client import TenantClient

TENANT = "bench"
USAGE_TENANTS = ("bench", "acme")  # crc32 % 2: partition 1 and partition 0
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
DEADLOCK_GOAL = "Deadlock drill. PLAN: " + json.dumps(
    {
        "steps": [
            {"step_id": "s1", "kind": "research", "tools": ["await_step"], "instruction": "#await:s2 Summarise s2"},
            {"step_id": "s2", "kind": "answer", "tools": [], "depends_on": ["s1"], "instruction": "Write the answer"},
        ]
    }
)
CHUNK = 100


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


async def create_record(tasks_kv: Any, task_id: str, tenant: str = TENANT) -> None:
    record = {
        "tenant": tenant, "task_id": task_id, "goal": "bench", "status": "running", "created_at": time.time(),
        "limits": {"max_tokens": 10**9, "max_cost_usd": 1000},
    }  # fmt: skip
    await tasks_kv.create(f"{tenant}.{task_id}", json.dumps(record).encode())


async def reservations(worker: Mesh, tasks_kv: Any, n: int) -> list[float]:
    task = "bench-reserve"
    await create_record(tasks_kv, task)

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
) -> tuple[float, float, float, int, dict[str, float]]:
    """Publish ``n`` usage events over 20 tasks as fast as the worker can: seconds for the publishes,
    seconds until every event was settled in the view reservations are decided on (the usage
    durable has nothing pending or unacknowledged), seconds until the spend records (KV ``budget``,
    checkpoints of the stream) count them all (or ``timeout``), how many they had counted by then,
    and the cores each process of ``pids`` (and ``bench``, this process) kept busy until settled."""
    tasks_kv = await admin.jetstream().key_value("tasks")
    budget_kv = await admin.jetstream().key_value("budget")
    tasks = usage_tasks(run)
    for tenant, t in tasks:
        await create_record(tasks_kv, t, tenant)
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
    return published, settled, recorded, seen, {k: (cpu1[k] - cpu0[k]) / settled for k in cpu0}


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


BUDGETS = ("budget", "budget-2")


async def drain(
    state: local.MeshState, ids: local.Identities, worker: Mesh, admin: Any, n: int, run: str, partitions: int
) -> tuple[float, float, dict[str, float]]:
    """Stop every budget replica, store ``n`` usage events, start ``partitions`` replicas (one each;
    one unpartitioned replica for 1): seconds from the moment every replica is ready (imports and
    connecting done: each interpreter pays its own) until every event is settled (the usage
    durable has nothing pending), and until the spend records count them all (checkpointed every
    ``MESH_BUDGET_CHECKPOINT_S``, 1 s), and the cores each process kept busy until settled."""
    local.stop([[state.services.pop(k) for k in BUDGETS if k in state.services]])
    tasks_kv = await admin.jetstream().key_value("tasks")
    budget_kv = await admin.jetstream().key_value("budget")
    # Every partitioning's mark at the end of the stream (as if it had kept up): each run folds the
    # backlog alone, not also what another partitioning accounted since its own mark.
    last = (await admin.jetstream().stream_info(topo.STREAMS["usage"])).state.last_seq
    for key in ("accounts", "accounts.0-of-2", "accounts.1-of-2"):
        await budget_kv.put(key, json.dumps({"through": last, "at": time.time()}).encode())
    tasks = usage_tasks(run)
    for tenant, t in tasks:
        await create_record(tasks_kv, t, tenant)
    msgs = usage_messages(n, tasks)
    for i in range(0, n, CHUNK):
        await asyncio.gather(*(worker.publish(m, key=m.call_id) for m in msgs[i : i + CHUNK]))
    env = {"MESH_BUDGET_LOOKBACK_S": "0"}
    pids = {k: v for k, v in processes(state).items() if k in ("nats-server", "redis-server")}
    for i, name in enumerate(BUDGETS[:partitions]):
        extra = env | (
            {"MESH_BUDGET_PARTITIONS": str(partitions), "MESH_BUDGET_PARTITION": str(i)} if partitions > 1 else {}
        )
        state.services[name] = local.start_service(ids, state.nats_url, "budget", name=name, extra_env=extra)
        pids[name] = state.services[name].pid
    state.save()
    await local.wait_ready({k: state.services[k] for k in BUDGETS[:partitions]})
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
    return settled, recorded, busy


def watched_messages(n: int) -> list[tuple[str, Contract]]:
    """(producer, message): ``n`` messages of the content streams the monitor follows, a task's
    worth at a time (plan, dispatch, a tool call and a retrieval with their results, the step's
    end), each with a body of the size such a message carries (passages, results, outputs)."""
    text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 9  # ~0.5 KB
    out: list[tuple[str, Contract]] = []
    i = 0
    while len(out) < n:
        t = {"tenant": USAGE_TENANTS[i % 2], "task_id": f"bench-watch-{i:05d}"}
        step = PlanStep(
            step_id="s1", instruction=f"Summarise what the documents say. {text[:200]}", tools=("http_get",)
        )
        hits = tuple(RetrievalHit(doc_id=f"d{k}", version="v1", chunk_id=f"c{k}", chunk_hash=f"h{k}", text=text,
                                  score=0.5) for k in range(4))  # fmt: skip
        out += [
            ("planner", PlanCreated(**t, steps=(step,))),
            ("planner", StepRequested(**t, step=step)),
            (
                "worker",
                ToolRequested(
                    **t, step_id="s1", call_id="s1-t1", tool="http_get", arguments={"url": "https://example.com/a"}
                ),
            ),
            (
                "tool-executor",
                ToolCompleted(**t, step_id="s1", call_id="s1-t1", tool="http_get", ok=True, result=text * 2),
            ),
            ("worker", RetrievalRequested(**t, step_id="s1", call_id="s1-r1", query="what do the documents say")),
            ("rag", RetrievalCompleted(**t, step_id="s1", call_id="s1-r1", hits=hits)),
            ("worker", StepCompleted(**t, step_id="s1", output=text * 2)),
        ]
        i += 1
    return out[:n]


async def watched(state: local.MeshState, ids: local.Identities, n: int) -> tuple[int, float, dict[str, float]]:
    """CPU per message of the content streams, for the budget (its monitor folds each one) and
    nats-server: the other services stopped (only the budget reads these), the messages
    published by their real producers, then until the budget has gone quiet. Returns how many,
    the seconds until quiet, and CPU ms per message per process."""
    local.stop([[state.services.pop(k) for k in ("planner", "worker", "checker", "rag", "tool-executor")]])
    producers = {}
    for name in ("planner", "worker", "rag", "tool-executor"):
        producers[name] = Mesh(ids.settings(name, state.nats_url))
        await producers[name].connection.connect()
    msgs = watched_messages(n)
    pids = {k: v for k, v in processes(state).items() if k in ("nats-server", "budget")}
    await gone_quiet(list(pids.values()))
    cpu0 = {k: cpu_s(p) for k, p in pids.items()}
    t0 = time.perf_counter()
    try:
        for i in range(0, n, CHUNK):
            await asyncio.gather(*(producers[who].publish(m, key=f"{m.type}:{i + j}")
                                   for j, (who, m) in enumerate(msgs[i : i + CHUNK])))  # fmt: skip
        await gone_quiet([pids["budget"]], cores=0.02)
    finally:
        for mesh in producers.values():
            await mesh.connection.close()
    took = time.perf_counter() - t0 - 0.5  # gone_quiet's last half second was quiet
    return n, took, {k: (cpu_s(p) - cpu0[k]) * 1000 / n for k, p in pids.items()}


async def deadlocks(c: TenantClient, n: int) -> tuple[list[float], list[str]]:
    """``detected_after_s`` of each deadlock task's ``budget.deadlock`` event; problems seen."""
    out, problems = [], []
    for i in range(n):
        seen = await c.submit(DEADLOCK_GOAL, task_id=f"bench-deadlock-{i:03d}", timeout=30)
        found = next((e for e in seen.events if e.stage == "budget.deadlock"), None)
        if not isinstance(seen.outcome, TaskFailed) or "deadlock" not in seen.outcome.reason:
            problems.append(f"{seen.task_id}: outcome {seen.outcome!r}")
        if found is None:
            problems.append(f"{seen.task_id}: no budget.deadlock event among {[e.stage for e in seen.events]}")
        else:
            out.append(float(found.detail["detected_after_s"]))
    return out, problems


async def ceiling_limits(c: TenantClient, admin: Any) -> TaskLimits:
    """Run the sample task once without a ceiling and set one that its last call crosses (as the
    budget scenario does: the tokens before s3 + s3's prompt + 511, one short of s3's worst case)."""
    task = "bench-ceil-000"
    free = await c.submit(GOAL, task_id=task, limits=TaskLimits(max_steps=4), timeout=60)
    assert isinstance(free.outcome, TaskCompleted), free.outcome
    budget_kv = await admin.jetstream().key_value("budget")
    usage: dict = {"by_step": {}}
    for _ in range(600):  # the budget may still be draining the usage backlog of the step before
        try:
            usage = json.loads((await budget_kv.get(f"usage.{TENANT}.{task}")).value)
        except nats.js.errors.KeyNotFoundError:
            pass
        if {"plan", "s1", "s2", "s3"} <= set(usage["by_step"]):
            break
        await asyncio.sleep(0.1)
    steps = usage["by_step"]
    before = sum(steps[s]["input_tokens"] + steps[s]["output_tokens"] for s in ("plan", "s1", "s2"))
    return TaskLimits(max_steps=4, max_tokens=before + steps["s3"]["input_tokens"] + 511)


async def ceilings(
    c: TenantClient, admin: Any, limits: TaskLimits, n: int
) -> tuple[list[float], list[float], list[str]]:
    """Per task, from the client receiving ``budget.denied``: to it receiving ``task.failed``, and
    to the last message any service published about the task (an admin subscription on every
    subject of the task, quiet for 1 s after the outcome); problems seen."""
    out, last, problems = [], [], []
    for i in range(1, n + 1):
        task_id = f"bench-ceil-{i:03d}"
        denied_at: list[tuple[float, dict]] = []
        heard: list[tuple[float, str]] = []

        def on_event(model: Contract, into: list = denied_at) -> None:
            if isinstance(model, ProgressEvent) and model.stage == "budget.denied" and not into:
                into.append((time.time(), model.detail))

        async def on_any(msg: Any, into: list = heard) -> None:
            into.append((time.time(), msg.subject))

        sub = await admin.subscribe(f"*.*.{TENANT}.{task_id}.*", cb=on_any)
        seen = await c.submit(GOAL, task_id=task_id, limits=limits, timeout=60, on_event=on_event)
        await asyncio.sleep(1.0)
        await sub.unsubscribe()
        if not isinstance(seen.outcome, TaskFailed) or "budget (task_tokens)" not in seen.outcome.reason:
            problems.append(f"{seen.task_id}: outcome {seen.outcome!r}")
            continue
        if not denied_at:
            problems.append(f"{seen.task_id}: failed on its ceiling but no budget.denied event reached the client")
            continue
        at, detail = denied_at[0]
        if detail.get("code") != "task_tokens":
            problems.append(f"{seen.task_id}: budget.denied code {detail.get('code')!r}")
        if at > seen.finished_at:
            problems.append(f"{seen.task_id}: budget.denied arrived {1000 * (at - seen.finished_at):.1f} ms after")
        out.append(seen.finished_at - at)
        stops = [t for t, subject in heard if t >= at and not subject.startswith("event.")]
        last.append(max(stops, default=seen.finished_at) - at)
    return out, last, problems


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


async def main(n_reserve: int, n_usage: int, n_deadlock: int, n_ceiling: int, n_backlog: int, n_watched: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-bench-budget-"))
    t0 = time.perf_counter()
    state = await local.up(home, tenants=sorted({TENANT, *USAGE_TENANTS}), nats_port=0, http_port=0, redis_port=0)
    up_s = time.perf_counter() - t0
    ids = local.Identities(home)
    creds = ids.connect_options("admin")
    problems: list[str] = []
    watch: tuple[int, float, dict[str, float]] | None = None
    try:
        raw = await raw_request_reply(state.nats_url, creds, 500)
        admin = await nats.connect(state.nats_url, **creds)
        worker = Mesh(ids.settings("worker", state.nats_url))
        await worker.connection.connect()
        try:
            reserve = await reservations(worker, await admin.jetstream().key_value("tasks"), n_reserve)
            msgs = usage_messages(n_usage, usage_tasks("usage"))
            raw_pub_s = await raw_publish(state.nats_url, creds, worker, msgs)
            pub_s, usage_s, rec_s, usage_seen, busy1 = await usage_accounting(
                worker, admin, n_usage, pids=processes(state)
            )
            if usage_seen < n_usage:
                problems.append(f"usage: only {usage_seen}/{n_usage} events in the records after {rec_s:.1f} s")
            # The same again with a second budget replica: both share the usage durable.
            second = local.start_service(ids, state.nats_url, "budget", name="budget-2")
            state.services["budget-2"] = second
            state.save()
            await local.wait_ready({"budget-2": second})
            caught_up = [await gone_quiet([state.services["budget"].pid, second.pid])]
            _, usage2_s, rec2_s, usage2_seen, busy2 = await usage_accounting(
                worker, admin, n_usage, run="usage2", pids=processes(state)
            )
            if usage2_seen < n_usage:
                problems.append(
                    f"usage, 2 replicas: only {usage2_seen}/{n_usage} events in the records after {rec2_s:.1f} s"
                )
            # Both replicas again, as two partitions: each follows one of the two tenants.
            local.stop([[state.services.pop("budget"), state.services.pop("budget-2")]])
            for i, name in enumerate(("budget", "budget-2")):
                state.services[name] = local.start_service(
                    ids, state.nats_url, "budget", name=name,
                    extra_env={"MESH_BUDGET_PARTITIONS": "2", "MESH_BUDGET_PARTITION": str(i)},
                )  # fmt: skip
            state.save()
            await local.wait_ready({k: state.services[k] for k in ("budget", "budget-2")})
            caught_up.append(await gone_quiet([state.services[k].pid for k in ("budget", "budget-2")]))
            _, usage3_s, rec3_s, usage3_seen, busy3 = await usage_accounting(
                worker, admin, n_usage, run="usage3", pids=processes(state)
            )
            if usage3_seen < n_usage:
                problems.append(
                    f"usage, 2 partitions: only {usage3_seen}/{n_usage} events in the records after {rec3_s:.1f} s"
                )
            drained = {}
            if n_backlog:
                for turn, parts in enumerate((1, 2, 1, 2)):  # in turns: the machine drifts
                    drained.setdefault(parts, []).append(
                        await drain(state, ids, worker, admin, n_backlog, f"drain{turn}", parts)
                    )
                # Back to two partitions with the default look-back for the rest.
                local.stop([[state.services.pop(k) for k in BUDGETS if k in state.services]])
                for i, name in enumerate(BUDGETS):
                    state.services[name] = local.start_service(
                        ids, state.nats_url, "budget", name=name,
                        extra_env={"MESH_BUDGET_PARTITIONS": "2", "MESH_BUDGET_PARTITION": str(i)},
                    )  # fmt: skip
                state.save()
                await local.wait_ready({k: state.services[k] for k in BUDGETS})
                await gone_quiet([state.services[k].pid for k in BUDGETS])  # replayed the drains' events
            async with TenantClient.of(ids, state.nats_url, TENANT) as c:
                detect, found = await deadlocks(c, n_deadlock)
                problems += found
                limits = await ceiling_limits(c, admin)
                stop, quiet, found = await ceilings(c, admin, limits, n_ceiling)
                problems += found
            if n_watched:  # last: it stops every service but the budget
                local.stop([[state.services.pop(k) for k in BUDGETS if k in state.services]])
                state.services["budget"] = local.start_service(ids, state.nats_url, "budget", name="budget")
                state.save()
                await local.wait_ready({"budget": state.services["budget"]})
                watch = await watched(state, ids, n_watched)
        finally:
            await worker.connection.close()
            await admin.close()
    finally:
        local.down(home)
    raw50 = statistics.median(raw)
    print(f"mesh up (nats + redis + provision + 6 services ready): {up_s:.2f}s")
    print(f"budget: raw core request/reply {ms(raw)} ({len(raw)} sequential)")
    print(
        f"  reservation round trip: {ms(reserve)} ({statistics.median(reserve) / raw50:.1f}x raw; "
        f"{len(reserve)} sequential, signed + verified)"
    )
    print(
        f"  usage accounting: {n_usage} events settled in {usage_s:.2f} s = {n_usage / usage_s:.0f} events/s, "
        f"in the spend records after {rec_s:.2f} s (raw JetStream publish of the same: "
        f"{n_usage / raw_pub_s:.0f} msgs/s; the signed mesh publishes alone took {pub_s:.2f} s)"
    )
    print(
        f"  usage accounting, 2 budget replicas: settled in {usage2_s:.2f} s = {n_usage / usage2_s:.0f} events/s "
        f"({usage_s / usage2_s:.2f}x one replica), in the records after {rec2_s:.2f} s (measured once the "
        f"new replica had replayed its look-back and gone quiet: {caught_up[0]:.1f} s)"
    )
    print(
        f"  usage accounting, 2 budget partitions (one replica each): settled in {usage3_s:.2f} s = "
        f"{n_usage / usage3_s:.0f} events/s ({usage_s / usage3_s:.2f}x one replica), in the records after "
        f"{rec3_s:.2f} s ({rec_s / rec3_s:.2f}x one replica; quiet after {caught_up[1]:.1f} s)"
    )
    for label, busy in (("one replica", busy1), ("two replicas", busy2), ("two partitions", busy3)):
        top = sorted(((k, v) for k, v in busy.items() if v >= 0.05), key=lambda kv: -kv[1])
        print(
            f"    cores busy while accounting, {label}: {sum(busy.values()):.2f} of {os.cpu_count()} ("
            + ", ".join(f"{k} {v:.2f}" for k, v in top)
            + ")"
        )
    if drained:
        best = {parts: min(runs, key=lambda r: r[0]) for parts, runs in drained.items()}
        for parts, (settled, recorded, busy) in sorted(best.items()):
            label = "1 replica" if parts == 1 else f"{parts} partitions"
            top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(busy.items(), key=lambda kv: -kv[1]) if v >= 0.05)
            print(
                f"  backlog of {n_backlog} usage events, {label}: settled {settled:.2f} s after ready = "
                f"{n_backlog / settled:.0f} events/s"
                + (f" ({best[1][0] / settled:.2f}x one replica)" if parts > 1 else "")
                + f", in the records after {recorded:.2f} s; cores busy {sum(busy.values()):.2f} ({top})"
            )
        print(f"    (best of {len(drained[1])} runs each, in turns)")
    if detect:
        print(
            f"  deadlock detection (cycle closed -> detected): {ms(detect)} "
            f"({statistics.median(detect) / raw50:.1f}x raw request/reply; {len(detect)} tasks)"
        )
    if stop:
        print(
            f"  ceiling crossing -> task failed: {ms(stop)} ({len(stop)} tasks; client sees budget.denied -> "
            f"client sees task.failed, max_tokens {limits.max_tokens})"
        )
        print(
            f"  ceiling crossing -> last service stopped: {ms(quiet)} (budget.denied -> the last message any "
            f"service published about the task; {statistics.median(quiet) / raw50:.1f}x raw request/reply)"
        )
    if watch is not None:
        count, took, per = watch
        print(
            f"  content-stream messages followed by the monitor (one replica; planner, worker, rag, tool-executor "
            f"publishing): {count} in {took:.2f} s; CPU per message: "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(per.items()))
        )
    for line in problems:
        print(f"  PROBLEM: {line}")


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
        asyncio.run(main(a.reservations, a.usage, a.deadlocks, a.ceilings, a.backlog, a.watched))
