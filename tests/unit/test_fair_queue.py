"""The fair queue's order: tenants in turn, a tenant's higher priority first, then stored order."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_kit.fair import FairQueue, Fetched, priority_of, tenant_of

pytestmark = pytest.mark.unit


class _Metadata:
    def __init__(self, num_delivered: int) -> None:
        self.num_delivered = num_delivered


class _Raw:
    def __init__(self, tenant: str, n: int, priority: int | None = None, delivered: int = 1) -> None:
        self.subject = f"step.v1.{tenant}.t{n}.requested"
        self.headers = {"Mesh-Priority": str(priority)} if priority is not None else {}
        self.metadata = _Metadata(delivered)
        self.n = n


def _item(tenant: str, n: int, priority: int | None = None, delivered: int = 1) -> Fetched:
    return Fetched(_Raw(tenant, n, priority, delivered))


def test_a_burst_does_not_go_first_and_priorities_order_a_tenant():
    q = FairQueue()
    for n in range(5):
        q.put(_item("burst", n))
    q.put(_item("quiet", 100))
    q.put(_item("burst", 5, priority=9))
    order = [(i.tenant, i.raw_message.n) for i in (q.pop() for _ in range(len(q)))]
    assert order[:3] == [("burst", 5), ("quiet", 100), ("burst", 0)], "the quiet tenant's turn comes second"
    assert [n for t, n in order if t == "burst"] == [5, 0, 1, 2, 3, 4], "priority 9 first, then stored order"


def test_redelivered_work_goes_first_within_its_tenant_and_only_there():
    """A message a dead replica held comes back with a delivery spent; waiting behind fresh work in
    queue after queue it could spend them all without one attempt. It goes first in its tenant's
    turn (even before a higher priority), and never ahead of another tenant's turn."""
    q = FairQueue()
    for n in range(3):
        q.put(_item("burst", n, priority=9))
    q.put(_item("quiet", 100))
    q.put(_item("burst", 50, delivered=2))
    order = [(i.tenant, i.raw_message.n) for i in (q.pop() for _ in range(len(q)))]
    assert order[:3] == [("burst", 50), ("quiet", 100), ("burst", 0)]
    assert _item("a", 1, delivered=3).redelivered and not _item("a", 1).redelivered


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 9)), max_size=60))
def test_every_message_comes_out_once_and_no_tenant_waits_more_than_one_round(items):
    q = FairQueue()
    for n, (tenant, prio) in enumerate(items):
        q.put(_item(tenant, n, prio))
    out = [q.pop() for _ in range(len(q))]
    assert sorted(i.raw_message.n for i in out) == list(range(len(items)))
    tenants = {t for t, _ in items}
    # While a tenant has messages waiting, every other tenant gets at most one turn between two of its own.
    for t in tenants:
        positions = [k for k, i in enumerate(out) if i.tenant == t]
        others_waiting = len(tenants) - 1
        for a, b in itertools.pairwise(positions):
            assert b - a <= others_waiting + 1


def test_headers_and_subjects_that_say_nothing_get_defaults():
    assert priority_of({"Mesh-Priority": "x"}) == 5 and priority_of({"Mesh-Priority": "42"}) == 9
    assert priority_of(None) == 5 and priority_of({"Mesh-Priority": "-3"}) == 0
    assert tenant_of("step.v1.acme.t1.requested") == "acme" and tenant_of("odd") == ""


async def test_an_idle_consumer_asks_for_one_message_and_a_busy_one_for_a_batch():
    """A lingering pull for several messages holds the first until the rest come or it expires
    (nats-py waits out the request): a step reaching an idle worker waited ~3 s in 10 of 12 tasks.
    Idle, the consumer asks for one (returned the moment it arrives); busy, for a batch with a
    short timeout; a pull that brings nothing makes it idle again."""
    import asyncio

    import nats

    from mesh_kit.fair import BUSY_FETCH_S, IDLE_FETCH_S, FairConsumer

    outcomes = iter([1, 4, 2, "timeout", 1, "timeout"])
    calls: list[tuple[int, float]] = []
    done = asyncio.Event()

    class Psub:
        async def fetch(self, batch: int, timeout: float):
            calls.append((batch, timeout))
            got = next(outcomes, None)
            if got is None:
                done.set()
                await asyncio.sleep(3600)
            if got == "timeout":
                raise nats.errors.TimeoutError
            return [_Raw("acme", len(calls) * 10 + i) for i in range(got)]

    handled: list[int] = []

    async def dispatch(item: Fetched) -> None:
        handled.append(item.raw_message.n)

    c = FairConsumer(lambda: None, "STEP", "d", "_INBOX.x", dispatch, workers=4, window=16, ack_wait_s=30,
                     graceful_s=1)  # fmt: skip
    c._psub = Psub()
    loops = [asyncio.create_task(c._fetch_loop()), asyncio.create_task(c._dispatch_loop())]
    await asyncio.wait_for(done.wait(), 5)
    while c.queue or c.running:  # the fetched messages are handed to dispatch
        await asyncio.sleep(0.01)
    for t in loops:
        t.cancel()
    idle, busy = (1, IDLE_FETCH_S), (4, BUSY_FETCH_S)
    assert calls == [idle, busy, busy, busy, idle, busy, idle]
    assert sorted(handled) == [10, 20, 21, 22, 23, 30, 31, 50], "every message fetched is handled"


async def test_a_fetch_that_turns_its_cancellation_into_a_timeout_still_ends_the_loop():
    """nats-py's fetch waits with ``asyncio.wait_for``, which on Python 3.11 can answer a cancel
    with ``TimeoutError``: the loop took it for an empty pull and fetched again, for ever (a
    consumer never stopped hung the event loop's close for minutes)."""
    import asyncio

    from mesh_kit.fair import FairConsumer

    fetches = 0

    class Swallowing:
        async def fetch(self, batch: int, timeout: float):
            nonlocal fetches
            fetches += 1
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise TimeoutError from None  # what wait_for does when the cancel races its timeout

    async def dispatch(item: Fetched) -> None:
        raise AssertionError("nothing is fetched")

    c = FairConsumer(lambda: None, "STEP", "d", "_INBOX.x", dispatch, workers=1, window=1, ack_wait_s=30,
                     graceful_s=1)  # fmt: skip
    c._psub = Swallowing()
    loop = asyncio.create_task(c._fetch_loop())
    await asyncio.sleep(0.05)
    loop.cancel()
    done, _ = await asyncio.wait([loop], timeout=5)
    assert done == {loop} and loop.cancelled() and fetches == 1
