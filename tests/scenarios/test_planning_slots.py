"""A burst bigger than the planner's fetch-ahead window does not hide another tenant's submission.

Admission is decided after a submission is fetched, so the submission queue is the one whose
backlog per tenant has no bound. The planner fetches ahead a window of messages and serves the
tenants in turn, but a burst larger than the window used to hide every later submission until
enough of it was planned (each plan a model call holding a handler): with a 200 ms model, the task
submitted right after a 300-task burst took 3.1x its quiet latency. Admitted submissions now wait
for a planning slot parked, out of the window. Here the window is 8 and the burst 40, with a model
that takes 150 ms a call, as a remote one would (the production regime: tasks wait on models,
not on the CPU, and no run slots are set). The quiet tenant's first task is planned after at
most the plans in progress and a turn of the handlers, in the broker's order of events (with
every plan made in place instead, MESH_PLANNING_SLOTS above the burst, the first one waited for
the window's worth of plans: 3.4x its quiet latency here).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from mesh_planner import metrics as planner_metrics
from mesh_testing.chaos import PLANNER, ChaosMesh, latencies, overtaken, report
from mesh_testing.infra import Infra, running_infra

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
LATENCY_MS = 150


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["steady", "burst"], name="planning", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra, tmp_path_factory) -> Iterator[ChaosMesh]:
    config = tmp_path_factory.mktemp("models") / "models.json"
    config.write_text(json.dumps({
        "providers": {"remote": {"kind": "scripted", "latency_ms": LATENCY_MS}},
        "models": {"m": {"provider": "remote", "id": "scripted-1"}},
        "routes": {"default": ["m"]},
    }))  # fmt: skip
    env = {
        "MESH_MODEL_CONFIG": str(config),
        "MESH_ACK_WAIT_S": "2",
        "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]",
        "MESH_LOG_LEVEL": "WARNING",
    }
    m = ChaosMesh(infra, env=env)
    # The planner's window only: the other services' queues hold what was admitted, which stays
    # within their default window here, as with the default admission limits in production.
    m.start({"planner": {"MESH_FAIR_WINDOW": "8"}})
    asyncio.run(m.ready())
    yield m
    asyncio.run(m.stop())


async def _planner_counters(mesh: ChaosMesh) -> dict[str, int]:
    planner = mesh.procs[mesh.names("planner")[0]][1]
    async with httpx.AsyncClient(timeout=2) as client:
        return (await client.get(f"http://127.0.0.1:{planner.http_port}/status")).json().get("counters", {})


async def test_a_burst_past_the_fetch_window_does_not_hide_a_quiet_tenants_task(infra, mesh):
    ids: list[str] = []
    async with infra.client("steady") as s, infra.client("burst") as b:
        await latencies(s, GOAL, 2, warm=True)
        burst = [asyncio.create_task(b.submit(GOAL, progress=False, timeout=300)) for _ in range(40)]
        await asyncio.sleep(0.2)  # the burst is stored ahead of the next submission
        under = await latencies(s, GOAL, 6, while_=lambda: not all(t.done() for t in burst), timeout=120, ids=ids)
        outcomes = [(await t).outcome for t in burst]

    assert [type(o).__name__ for o in outcomes] == ["TaskCompleted"] * 40, "nothing admitted is lost"
    # The first one was submitted right behind the burst: the one a full window used to hide. In
    # the broker's order of events, the planner planned at most the plans in progress when it came
    # (its 3 planning slots) and a turn of its handlers' (4) before it, not the 40 of the burst.
    planned_before = await overtaken(infra, PLANNER, "steady", ids, "burst")
    report("planning slots, turns", planned_before=planned_before, latencies_s=[round(x, 3) for x in under])
    assert len(under) >= 3, (under, planned_before)
    assert max(planned_before) <= 3 + 4 + 1, planned_before  # (+1: a plan finishing as it is stored)
    waits = (await _planner_counters(mesh)).get(planner_metrics.M_PLANNING_WAITS, 0)
    assert waits > 0, "the burst's admitted submissions waited for planning slots, out of the window"
