"""The provider breakers in the budget's Redis view (real Redis, the budget's own user).

Every budget replica used to fold every usage message into breakers of its own, so that any of
them could refuse a call to a failing provider: the one piece of work that kept a second replica
(or a partition) from sharing the reading. Now the replica that settles a call (the usage
durable hands each call to one) adds its outcome to the provider/model's window in Redis, and
the reserve script refuses calls while the circuit is open. The rule must stay the gateway's.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_budget.ledger import DayUsage, Outcome, View, today
from mesh_resilience import BreakerPolicy, CircuitBreaker

pytestmark = pytest.mark.integration

LIMITS = (10_000, 10.0, -1, -1.0)
POLICY = BreakerPolicy(window_s=30, min_calls=5, failure_rate=0.5, cooldown_s=10)


@pytest.fixture
async def view(integration_infra):
    v = View(integration_infra.redis_url("budget"), provider_policy=POLICY)
    try:
        yield v
    finally:
        await v.close()


async def _settle(v: View, model: str, call: str, ok: bool, at: float, tenant: str = "acme", task: str = "t1"):
    return await v.settle(tenant, task, today(), call, call, 100, 0.001, Outcome("scripted", model, ok, at))


async def _reserve(v: View, model: str, tenant: str, task: str):
    await v.init(None, DayUsage(tenant=tenant, day=today()), tenant, task, [], [])  # a view of a new task
    return await v.reserve(tenant, task, today(), "r1", 100, 0.001, LIMITS, 0.0, time.time(), ("scripted", model))


async def test_failures_from_many_tasks_open_the_circuit_for_every_task_until_the_cooldown(view, unique):
    model = unique("m")
    now = time.time()
    results = []
    for i in range(5):  # five tasks of two tenants, one failing call each
        results.append(await _settle(view, model, f"c{i}", False, now + i * 0.1, ("acme", "globex")[i % 2], f"t{i}"))
    assert [r.trip for r in results] == [0, 0, 0, 0, 1], "opens on the fifth call (min_calls)"
    assert (results[-1].failed, results[-1].calls) == (5, 5)
    assert results[-1].open_until == pytest.approx(now + 0.4 + POLICY.cooldown_s, abs=0.01)

    tenant = unique("other").replace("-", "")
    refused = await _reserve(view, model, tenant, unique("t"))
    assert not refused.granted and refused.code == "provider_breaker"
    assert refused.open is not None and refused.open[1:] == (5, 5)
    assert (await _reserve(view, unique("healthy"), tenant, unique("t"))).granted, "per provider/model"

    again = await _settle(view, model, "c9", False, now + 1.0)
    assert again.trip == 2, "still failing, and this call failed: its task is told"
    assert (await _settle(view, model, "c10", True, now + 1.1)).trip == 0, "a success while open: nothing to tell"


async def test_a_redelivered_call_is_one_outcome(view, unique):
    model = unique("m")
    now = time.time()
    for i in range(4):
        first = await _settle(view, model, f"c{i}", False, now + i)
        again = await _settle(view, model, f"c{i}", False, now + i)  # the same usage message, redelivered
        assert again.calls == 0 and again.trip == 0, "not counted again"
    assert first.calls == 4 and first.trip == 0, "four distinct calls: under min_calls"
    assert (await _settle(view, model, "c4", False, now + 4)).trip == 1


async def test_the_circuit_closes_after_its_cooldown(view, unique):
    model = unique("m")
    then = time.time() - 60  # opened a minute ago, for 10 s
    for i in range(5):
        await _settle(view, model, f"c{i}", False, then + i * 0.1)
    assert (await _reserve(view, model, unique("x").replace("-", ""), unique("t"))).granted


async def test_outcomes_older_than_the_window_do_not_count(view, unique):
    model = unique("m")
    now = time.time()
    for i in range(4):
        await _settle(view, model, f"old{i}", False, now - 100 + i)
    late = await _settle(view, model, "c", False, now)
    assert (late.calls, late.failed, late.trip) == (1, 1, 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0.0, 20.0), st.booleans()), min_size=1, max_size=40))
def test_the_budget_and_the_gateway_open_a_provider_circuit_at_the_same_outcome(integration_infra, outcomes):
    """One breaker rule (mesh_resilience): fed the same outcomes at the same times, the gateway's
    breaker and the budget's mesh-wide circuit (Lua in Redis) open at the same call."""
    policy = BreakerPolicy(window_s=30, min_calls=3, failure_rate=0.5, cooldown_s=1000)

    async def run() -> tuple[int | None, int | None]:
        v = View(integration_infra.redis_url("budget"), provider_policy=policy)
        model = f"p{uuid.uuid4().hex[:12]}"
        now = [time.time()]
        gateway = CircuitBreaker(f"scripted/{model}", policy, clock=lambda: now[0])
        opened_gateway = opened_budget = None
        try:
            for i, (dt, ok) in enumerate(outcomes):
                now[0] += dt
                gateway.record(ok)
                if opened_gateway is None and gateway.state == "open":
                    opened_gateway = i
                settled = await _settle(v, model, f"c{i}", ok, now[0])
                if opened_budget is None and settled.trip == 1:
                    opened_budget = i
        finally:
            await v.close()
        return opened_gateway, opened_budget

    opened_gateway, opened_budget = asyncio.run(run())
    assert opened_budget == opened_gateway


async def test_the_provider_keys_are_the_budget_users_and_expire(integration_infra, unique):
    """The keys live under ``budget:`` like the rest of the view, so the budget's ACL user (limited
    to ``budget:*``) may write them with no change to it, and they expire after a window and a
    cooldown (plus a minute) without calls."""
    v = View(integration_infra.redis_url("budget"), provider_policy=POLICY)
    admin = aioredis.from_url(integration_infra.redis_url("admin"))
    try:
        model = unique("m")
        await _settle(v, model, "c1", False, time.time())
        calls, failed, _ = View.provider_keys("scripted", model)
        assert await admin.zcard(calls) == 1 and await admin.zcard(failed) == 1
        assert 0 < await admin.ttl(calls) <= POLICY.window_s + POLICY.cooldown_s + 61
    finally:
        await admin.aclose()
        await v.close()
