"""Chaos: a 3-node JetStream cluster (R3 streams and KV) loses a node mid-run.

The node killed is the one leading the most streams and buckets at that moment, so the
kill forces the most leader elections. The services and the client were given every node's
address and move to a live one.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from mesh_contracts import topology as topo
from mesh_contracts.v1 import TaskCompleted
from mesh_testing.chaos import (
    ChaosMesh,
    failed_calls,
    outbox_effects,
    pct,
    recovery_s,
    report,
    stored_per_task,
    where_stuck,
)
from mesh_testing.infra import Infra, running_infra

pytestmark = pytest.mark.chaos
FULL = os.environ.get("MESH_CHAOS") == "full"
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23, and email the answer to ops@acme.test."
ACK_WAIT_S = topo.ACK_WAIT_S  # what ships: the drills assert the guarantees at the real failover timing
STORED = {"step.completed": 4, "tool.requested": 2, "task.completed": 1}  # per task, exactly
ENV = {
    "MESH_ACK_WAIT_S": str(ACK_WAIT_S),
    "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]",
    "MESH_LOG_LEVEL": "WARNING",
    # hundreds of tasks a minute each send one email: lift the default per-tenant email rate limit
    "MESH_TOOL_POLICY": '{"send_email": {"rate_per_min": 0}}',
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Infra]:
    with running_infra(["acme"], name="cluster", ack_wait_s=ACK_WAIT_S, cluster=3) as infra:
        yield infra


async def leaders(infra: Infra) -> Counter[str]:
    """How many streams (KV buckets included) each node leads."""
    nc = await infra.admin()
    try:
        infos = await nc.jetstream().streams_info()
        return Counter(i.cluster.leader for i in infos if i.cluster and i.cluster.leader)
    finally:
        await nc.close()


async def test_kill_one_node_of_three_mid_run_loses_and_duplicates_nothing(cluster):
    n = 200 if FULL else 40
    mesh = ChaosMesh(cluster, env=ENV, replicas={"worker": 2})
    mesh.start()
    await mesh.ready()
    before = await leaders(cluster)
    assert sum(before.values()) >= 10 and len(before) >= 2, f"R3 assets spread over the nodes: {before}"
    victim_name = before.most_common(1)[0][0]
    victim = next(i for i, p in enumerate(cluster.nodes) if p.name == victim_name)
    completed_live = 0

    def count(model) -> None:
        nonlocal completed_live
        completed_live += isinstance(model, TaskCompleted)

    t0 = time.monotonic()
    try:
        async with cluster.client("acme") as c:
            runs = asyncio.gather(
                *(c.submit(GOAL, task_id=f"cl-{i}", timeout=90 if FULL else 45, on_event=count) for i in range(n))
            )
            while completed_live < n // 4:  # mid-run: a quarter done, the rest in flight
                await asyncio.sleep(0.05)
            killed_at, done_at_kill = time.time(), completed_live
            cluster.kill_nats(victim)
            results = await runs
            after = await leaders(cluster)
    finally:
        await mesh.stop()
    wall = time.monotonic() - t0
    rejoin_s = await cluster.start_nats(victim)  # healthy = caught up on every replicated stream
    tasks = [f"cl-{i}" for i in range(n)]
    effects = await outbox_effects(cluster, "acme")
    stored = await stored_per_task(cluster, "acme", tasks)
    completed = [r for r in results if isinstance(r.outcome, TaskCompleted)]
    resumed = recovery_s([killed_at], [r.finished_at for r in completed])
    duplicated = sum(max(0, effects[t] - 1) for t in tasks) + sum(
        max(0, counts[k] - STORED[k]) for counts in stored.values() for k in STORED
    )
    report(
        "kill one node of a 3-node cluster",
        tasks=n,
        node_killed=victim_name,
        leaders_it_held=before[victim_name],
        leaders_after=dict(after),
        completed_before_kill=done_at_kill,
        lost=n - len(completed),
        duplicated=duplicated,
        missing_effects=sum(effects[t] == 0 for t in tasks),
        wall_s=round(wall, 1),
        recovery_s=pct(resumed, 0.5),
        node_rejoined_s=round(rejoin_s, 2),
        latency_p50_s=pct([r.latency_s for r in completed], 0.5),
        latency_p99_s=pct([r.latency_s for r in completed], 0.99),
    )
    assert victim_name not in after, "the dead node leads nothing: its streams elected new leaders"
    lost = [r.task_id for r in results if r not in completed]
    assert not lost, (lost[:3], await where_stuck(cluster, "acme", lost[:3]))
    missing = [t for t in tasks if effects[t] == 0]
    assert not missing, ("one email per task", missing[:3], await failed_calls(cluster, "acme", missing[:3]),
                         {t: stored[t] for t in missing[:3]})  # fmt: skip
    assert all(effects[t] == 1 for t in tasks), "one email per task"
    assert all(v == STORED for v in stored.values()), [(t, v) for t, v in stored.items() if v != STORED][:3]
    assert all("391" in r.outcome.answer for r in completed)
