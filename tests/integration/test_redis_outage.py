"""Redis goes away (kill -9) and comes back: what each service that uses it does meanwhile.

- rag: the retrieval cache is optional. Every retrieval still answers (a miss), without
  waiting for a connect timeout each time, and the service stays ready but says it is degraded.
- tool-executor: the shared rate-limit window is optional. Limits are still enforced, in the
  process, and counted as local decisions.
- budget: shared reservations are required. The service is not ready (the reason names Redis)
  and grants nothing until Redis is back; then it is ready again without a restart.

Real nats-server and redis-server processes; the services' own classes with their own identities.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from integration_helpers import eventually, running, settings_for

from mesh_contracts.v1 import BudgetGranted, BudgetReserve, TaskLimits
from mesh_contracts.v1.records import StatusRecord, TaskRecord
from mesh_host import Mesh
from mesh_kit import telemetry as tel
from mesh_rag import metrics as rag_metrics
from mesh_tenancy import tenancy
from mesh_testing.infra import running_infra

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def outage_infra():
    # Its own servers: these tests kill Redis, which the session's shared infra must keep.
    with running_infra(["acme"], mode="binaries", name="redis-outage") as infra:
        yield infra


async def test_a_lost_retrieval_cache_is_a_miss_and_the_service_stays_ready(outage_infra):
    from mesh_rag.embed import Embedder
    from mesh_rag.service import Rag

    infra = outage_infra
    mesh = Mesh(settings_for(infra, "rag"))
    rag = Rag(mesh, embedder=Embedder.load(), seed_tenants=["acme"])
    tenancy.install(mesh)  # rag keeps the ingest door
    rag.register()
    async with running(mesh):
        assert mesh.ready() == (True, "ok")
        first, version, cached = await rag.search("acme", "identity token", 3)
        assert first and not cached
        again, _, cached = await rag.search("acme", "identity token", 3)
        assert cached and again == first

        infra.kill_redis()
        t0 = time.monotonic()
        during, during_version, cached = await rag.search("acme", "identity token", 3)
        took = time.monotonic() - t0
        assert (during, during_version, cached) == (first, version, False), "the same answer, from the index"
        assert mesh.stats.counters[rag_metrics.M_RETRIEVAL_CACHE_ERRORS] >= 1, f"one failed cache read ({took:.2f}s)"
        await eventually(lambda: not mesh.dependencies["redis"].describe()["up"], what="redis known down")
        ready, why = mesh.ready()
        assert ready and why.startswith("degraded: redis unreachable"), why

        # While it is known to be down no retrieval tries it: no wait, no new error.
        errors = mesh.stats.counters[rag_metrics.M_RETRIEVAL_CACHE_ERRORS]
        for _ in range(5):
            assert (await rag.search("acme", "identity token", 3))[0] == first
        assert mesh.stats.counters[rag_metrics.M_RETRIEVAL_CACHE_ERRORS] == errors, "the cache was not tried while down"

        await infra.start_redis()
        await eventually(lambda: mesh.ready() == (True, "ok"), timeout=10, what="rag to see Redis again")
        await rag.search("acme", "identity token", 3)  # refills the (empty) cache
        assert (await rag.search("acme", "identity token", 3))[2] is True, "cached again once Redis is back"
        assert mesh.stats.counters[tel.M_DEPENDENCY_DOWN] == 1


async def test_rate_limits_hold_in_the_process_while_redis_is_down(outage_infra):
    from mesh_tool_executor.limits import RateLimiter

    infra = outage_infra
    local_calls: list[int] = []
    limiter = RateLimiter(infra.redis_url("tool-executor"), on_local=lambda: local_calls.append(1))
    dependency = limiter.connect()
    assert dependency is not None and await dependency.check()
    try:
        assert [await limiter.take("acme", "http_get", 2) for _ in range(3)][:2] == [0.0, 0.0]
        assert await limiter.take("acme", "http_get", 2) > 0, "shared window: the limit holds"
        assert local_calls == []

        infra.kill_redis()
        decisions = [await limiter.take("acme", "http_get", 2) for _ in range(3)]
        assert decisions[:2] == [0.0, 0.0] and decisions[2] > 0, "the limit still holds, in the process"
        assert not dependency.up and len(local_calls) == 3
        await infra.start_redis()
        await eventually(dependency.check, timeout=10, what="the limiter to reach Redis again")
        assert await limiter.take("acme", "http_get", 100) == 0.0 and len(local_calls) == 3, "shared again"
    finally:
        if infra.redis is not None and not infra.redis.alive():
            await infra.start_redis()
        await limiter.close()


async def test_the_budget_is_not_ready_and_grants_nothing_without_redis(outage_infra, unique):
    from mesh_budget.service import Budget

    infra = outage_infra
    budget_mesh = Mesh(settings_for(infra, "budget"))
    Budget(budget_mesh).register()
    planner, worker = Mesh(settings_for(infra, "planner")), Mesh(settings_for(infra, "worker"))
    task = unique("outage")
    async with running(budget_mesh), running(planner), running(worker):
        kv = await planner.kv(StatusRecord.bucket)  # what the budget knows of a task (no content)
        record = StatusRecord(status="running", created_at=time.time(), limits=TaskLimits(max_tokens=9000))
        await kv.create(TaskRecord.key("acme", task), record.model_dump_json().encode())

        def reserve(call: str):
            return worker.request(
                BudgetReserve(tenant="acme", task_id=task, agent="worker", call_id=call, tokens=100), timeout=5
            )

        assert isinstance(await reserve("c1"), BudgetGranted)
        assert budget_mesh.ready() == (True, "ok")

        infra.kill_redis()
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await reserve("c2")  # no answer rather than a grant nobody can account for
        ready, why = budget_mesh.ready()
        assert not ready and "redis unreachable" in why and "reservations" in why, why

        await infra.start_redis()
        await eventually(lambda: budget_mesh.ready()[0], timeout=10, what="the budget to be ready again")
        assert isinstance(await reserve("c3"), BudgetGranted), "back without a restart"
