"""The budget's Redis view of a task: when it may start from nothing, and when it must be rebuilt.

A task's first reservation used to find its view missing and rebuild it from KV every time (two
reads, a scan of the durable holds, two more script calls): wasted on a task created a moment
ago, which cannot have anything durable that a view here would not hold. The reserve script
starts such a task from an empty view itself, but only when this Redis's view began before the
task was created (``budget:epoch``); a Redis that lost its data lost that mark too, and every
task created before the new one is rebuilt from KV as before (real Redis, the budget's own user).
"""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from mesh_budget.ledger import EPOCH_KEY, FRESH_WINDOW_S, Cold, View, today
from mesh_identity import CLOCK_LEEWAY_S

pytestmark = pytest.mark.integration

LIMITS = (10_000, 10.0, -1, -1.0)


@pytest.fixture
async def view(integration_infra):
    v = View(integration_infra.redis_url("budget"))
    admin = aioredis.from_url(integration_infra.redis_url("admin"))
    await admin.delete(EPOCH_KEY)  # this Redis, as if it had just lost its data
    try:
        yield v, admin
    finally:
        await admin.aclose()
        await v.close()


async def _reserve(v: View, tenant: str, task: str, call: str, created_at: float, tokens: int = 100):
    return await v.reserve(tenant, task, today(), call, tokens, 0.001, LIMITS, 0.0, created_at)


async def _warm_day(v: View, tenant: str) -> None:
    from mesh_budget.ledger import DayUsage

    await v.init(None, DayUsage(tenant=tenant, day=today()), tenant, "warm-up", [], [])


async def test_a_task_created_after_the_view_began_starts_from_nothing(view, unique):
    v, admin = view
    tenant = unique("fresh").replace("-", "")
    await _warm_day(v, tenant)
    before = time.time()
    with pytest.raises(Cold) as first:
        await _reserve(v, tenant, unique("old"), "c1", time.time())  # no epoch yet: it is set, nothing assumed
    after = time.time()
    assert first.value.task and not first.value.day
    epoch = float(await admin.get(EPOCH_KEY))
    assert before - 0.001 <= epoch <= after + 0.001, "set by that reservation, to its own time (in ms)"

    # Created within the clock leeway of the epoch: it may have had a view in the Redis before.
    with pytest.raises(Cold):
        await _reserve(v, tenant, unique("edge"), "c1", epoch + CLOCK_LEEWAY_S - 1)
    # Created after it: granted at once, from an empty view, and that view now counts.
    task = unique("new")
    d = await _reserve(v, tenant, task, "c1", epoch + CLOCK_LEEWAY_S + 1, tokens=4000)
    assert d.granted and d.remaining_tokens == 6000
    d = await _reserve(v, tenant, task, "c2", epoch + CLOCK_LEEWAY_S + 1, tokens=7000)
    assert not d.granted and d.code == "task_tokens", "the empty view is a real view: 4000 are held"


async def test_an_old_or_unknown_task_is_still_rebuilt(view, unique):
    v, admin = view
    tenant = unique("old").replace("-", "")
    await _warm_day(v, tenant)
    await admin.set(EPOCH_KEY, f"{time.time() - 2 * FRESH_WINDOW_S:.3f}")
    with pytest.raises(Cold):  # created long ago: a view of it may have expired here
        await _reserve(v, tenant, unique("t"), "c1", time.time() - FRESH_WINDOW_S - 10)
    with pytest.raises(Cold):  # no creation time known
        await _reserve(v, tenant, unique("t"), "c1", 0.0)


async def test_a_redis_that_lost_its_data_rebuilds_every_task_created_before(view, unique):
    v, admin = view
    tenant = unique("wipe").replace("-", "")
    await _warm_day(v, tenant)
    await admin.set(EPOCH_KEY, f"{time.time() - 60:.3f}")
    created = time.time() - 30  # fresh until Redis loses its data
    task = unique("t")
    assert (await _reserve(v, tenant, task, "c1", created)).granted
    await admin.delete(*View.task_keys(tenant, task))
    await admin.delete(EPOCH_KEY)  # what a restarted, empty Redis looks like
    await _warm_day(v, tenant)
    with pytest.raises(Cold):
        await _reserve(v, tenant, task, "c2", created)
    with pytest.raises(Cold):  # and still, once the new epoch is set: it predates it
        await _reserve(v, tenant, task, "c2", created)


async def test_a_steps_share_is_its_own_ceiling_held_and_settled_and_survives_a_rebuild(view, unique):
    """A workflow node's ``budget_share``: the step's settled calls and its holds count against its
    share, other steps' do not; a view rebuilt after Redis lost it knows the step's spend from the
    durable records (``TaskUsage.by_step``) and its holds from theirs (``Held.step_id``)."""
    from mesh_budget.ledger import Held, TaskUsage
    from mesh_contracts.v1 import TokenUsage

    v, admin = view
    tenant, task = unique("share").replace("-", ""), unique("t")
    await _warm_day(v, tenant)
    await admin.set(EPOCH_KEY, f"{time.time() - 60:.3f}")
    created, step = time.time() - 30, ("decide", 3000, 10.0)

    async def reserve(call: str, tokens: int, sid: tuple[str, int, float] = step):
        return await v.reserve(tenant, task, today(), call, tokens, 0.001, LIMITS, 0.0, created, step=sid)

    assert (await reserve("c1", 2000)).granted
    denied = await reserve("c2", 1500)
    assert not denied.granted and denied.code == "step_tokens" and denied.remaining_tokens == 1000, denied
    assert (await reserve("o1", 5000, ("other", -1, -1.0))).granted, "another step: only the task's ceiling"
    settled = await v.settle(tenant, task, today(), "c1", "c1", 1200, 0.0005, step_id="decide")
    assert settled.counted
    assert (await reserve("c2", 1500)).granted, "1200 settled + 1500 <= 3000 (the hold of 2000 released)"
    assert not (await reserve("c3", 400)).granted, "1200 + 1500 held + 400 > 3000"

    # Redis loses the task's view: rebuilt from what the durable records say.
    await admin.delete(*View.task_keys(tenant, task))
    await admin.delete(EPOCH_KEY)  # what a restarted, empty Redis looks like
    with pytest.raises(Cold):
        await reserve("c3", 400)
    usage = TaskUsage(tenant=tenant, task_id=task, total=TokenUsage(input_tokens=1200, cost_usd=0.0005),
                      by_step={"decide": TokenUsage(input_tokens=1200, cost_usd=0.0005)}, call_ids=["c1"])  # fmt: skip
    held = [Held(tenant=tenant, task_id=task, call_id="c2", day=today(), tokens=1500, cost_usd=0.001,
                 expires_at=time.time() + 120, step_id="decide"),
            Held(tenant=tenant, task_id=task, call_id="o1", day=today(), tokens=5000, cost_usd=0.001,
                 expires_at=time.time() + 120, step_id="other")]  # fmt: skip
    from mesh_budget.ledger import DayUsage

    await v.init(usage, DayUsage(tenant=tenant, day=today()), tenant, task, held, [])
    again = await reserve("c3", 400)
    assert not again.granted and again.code == "step_tokens" and again.remaining_tokens == 300, again
    assert (await reserve("c3", 300)).granted
