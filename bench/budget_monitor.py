"""How soon the budget service acts on what its monitor follows, and what following costs, for
bench/bench_budget.py: deadlock detection (from the stored message that closes a wait-for cycle
to the budget acting on it), a ceiling crossed -> the task stopped (client receive times), and
the CPU per content-stream message the monitor folds, for the budget and for nats-server.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats
from bench_task import cpu_s, processes
from budget_accounting import CHUNK, TENANT, USAGE_TENANTS, gone_quiet

from mesh_contracts import Contract
from mesh_contracts.v1 import (
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
)
from mesh_host import Mesh
from meshctl import local
from meshctl.client import TenantClient

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
DEADLOCK_GOAL = "Deadlock drill. PLAN: " + json.dumps(
    {
        "steps": [
            {"step_id": "s1", "kind": "research", "tools": ["await_step"], "instruction": "#await:s2 Summarise s2"},
            {"step_id": "s2", "kind": "answer", "tools": [], "depends_on": ["s1"], "instruction": "Write the answer"},
        ]
    }
)


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
