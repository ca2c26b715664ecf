"""``FairConsumer`` on a real durable: tenants in turn, a tenant's priority first, every message
handled exactly once, waiting messages kept alive past ``ack_wait`` and handed back on stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator

import nats
import pytest
from integration_helpers import connect, eventually
from nats.js import api

from mesh_contracts import topology as topo
from mesh_contracts.v1 import TaskSubmitted
from mesh_kit.fair import PRIORITY, FairConsumer, Fetched
from meshctl.provision import consumer_config

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(integration_infra) -> AsyncIterator[nats.NATS]:
    async with connect(integration_infra, "admin") as conn:
        yield conn


async def _stream(nc: nats.NATS, name: str, ack_wait: float = 30.0) -> None:
    js = nc.jetstream()
    try:
        await js.delete_stream(name)
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(api.StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    await js.add_consumer(
        name, api.ConsumerConfig(durable_name="d", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait)
    )


async def test_a_quiet_tenant_is_served_in_turn_and_priorities_go_first(nc):
    await _stream(nc, "FAIRA")
    js = nc.jetstream()
    for i in range(30):
        await js.publish(f"faira.v1.burst.t{i}.x", b"b", headers={PRIORITY: "9" if i == 29 else "5"})
    await js.publish("faira.v1.quiet.q1.x", b"q")
    order: list[str] = []
    done = asyncio.Event()

    async def handle(m: Fetched) -> None:
        order.append(m.raw_message.subject.split(".")[3])
        if len(order) == 1:  # the first one is held until everything else waits here
            while len(fair.queue) < 30:
                await asyncio.sleep(0.01)
        await m.ack()
        if len(order) == 31:
            done.set()

    fair = FairConsumer(lambda: nc, "FAIRA", "d", "_INBOX", handle, workers=1, window=64, ack_wait_s=30, graceful_s=5)
    await fair.start()
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        await fair.stop()
    assert sorted(order) == sorted([f"t{i}" for i in range(30)] + ["q1"]), "each message once"
    assert order[:5] == ["t0", "t29", "q1", "t1", "t2"], (
        "after the one already running: the burst's turn (its priority 9 first), then the quiet "
        f"tenant's, then the burst in stored order: {order[:6]}"
    )
    info = await js.consumer_info("FAIRA", "d")
    assert info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0


async def test_waiting_messages_outlive_ack_wait_and_are_handed_back_on_stop(nc):
    await _stream(nc, "FAIRB", ack_wait=1.0)
    js = nc.jetstream()
    for i in range(6):
        await js.publish(f"fairb.v1.acme.t{i}.x", b"x")
    handled: list[str] = []
    release = asyncio.Event()

    async def slow(m: Fetched) -> None:
        handled.append(m.raw_message.subject)
        while not release.is_set():  # a long handler beats (as Delivery.keepalive does)
            await m.in_progress()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 0.3)
        await m.ack()

    fair = FairConsumer(lambda: nc, "FAIRB", "d", "_INBOX", slow, workers=1, window=8, ack_wait_s=1.0, graceful_s=5)
    await fair.start()
    deadline = time.monotonic() + 30  # returns as soon as it holds
    while len(fair.queue) < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(fair.queue) == 5, "five wait here while one is handled"
    await asyncio.sleep(2.5)  # two and a half ack_waits: kept alive, none redelivered
    info = await js.consumer_info("FAIRB", "d")
    assert info.num_redelivered == 0 and info.num_ack_pending == 6

    stopping = asyncio.create_task(fair.stop())  # the five waiting are handed back at once ...
    await asyncio.sleep(0.3)
    assert not stopping.done(), "... while the running handler is let finish"
    release.set()
    await stopping
    assert handled == ["fairb.v1.acme.t0.x"], "nothing more was started after stop"
    psub = await js.pull_subscribe_bind("d", "FAIRB")
    back = await psub.fetch(10, timeout=2)
    assert sorted(m.subject for m in back) == [f"fairb.v1.acme.t{i}.x" for i in range(1, 6)], (
        "the waiting five are available again at once (not after ack_wait), none lost"
    )
    assert all(m.metadata.num_delivered == 2 for m in back)


async def test_work_a_crash_loop_of_replicas_held_is_still_handled_and_goes_first(integration_infra, nc):
    """kill -9 of a replica hands nothing back: what it fetched ahead returns after ack_wait with a
    delivery spent and no attempt made. A cohort held by one dead replica after another keeps
    coming back (the provisioned cap leaves room for it) and is handled once a replica lives.
    (That it then goes ahead of its tenant's fresh work is the queue's order: the unit tests.)"""
    name = "FAIRC"
    js = nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(name)
    await js.add_stream(api.StreamConfig(name=name, subjects=["fairc.>"]))
    durable = topo.Durable("worker", name, "d", "fairc.>", TaskSubmitted)
    await js.add_consumer(name, consumer_config(durable, ack_wait_s=0.5))
    for i in range(3):
        await js.publish(f"fairc.v1.acme.held{i}.x", b"h")
    deaths = topo.MAX_DELIVER + 1  # the cap before replicas fetched ahead: the cohort would be gone
    for _ in range(deaths):
        async with connect(integration_infra, "admin") as doomed:  # a replica that dies holding it
            psub = await doomed.jetstream().pull_subscribe_bind("d", name)
            held = await psub.fetch(3, timeout=5)
            assert len(held) == 3
        await asyncio.sleep(0.6)  # ack_wait runs out: back, one more delivery spent
    for i in range(3):
        await js.publish(f"fairc.v1.acme.fresh{i}.x", b"f")
    order: list[tuple[str, int]] = []

    async def handle(m: Fetched) -> None:
        order.append((m.raw_message.subject.split(".")[3], m.raw_message.metadata.num_delivered))
        await m.ack()

    fair = FairConsumer(lambda: nc, name, "d", "_INBOX", handle, workers=1, window=8, ack_wait_s=30, graceful_s=5)
    await fair.start()
    try:
        deadline = time.monotonic() + 10
        while len(order) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await fair.stop()
    assert sorted(s for s, _ in order) == sorted([f"held{i}" for i in range(3)] + [f"fresh{i}" for i in range(3)])
    assert all(n == deaths + 1 for s, n in order if s.startswith("held")), order
    info = await js.consumer_info(name, "d")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_waiting_message_redelivered_after_lost_keepalives_is_handled_once(nc, monkeypatch):
    """A broker node dies and the keepalives of the messages parked here are lost: JetStream
    redelivers them. The redelivery becomes the parked message's delivery (JetStream extends only
    the newest delivery's ack_wait) instead of a second copy, which used to be handled again,
    park again, and take a second turn (the planner's planning slots, the cluster chaos drill)."""
    await _stream(nc, "FAIRD", ack_wait=1.0)
    js = nc.jetstream()
    for i in range(3):
        await js.publish(f"faird.v1.acme.t{i}.x", b"x")
    handled: Counter[str] = Counter()
    acked_delivery: dict[str, int] = {}
    go = asyncio.Event()

    async def handle(m: Fetched) -> None:
        handled[m.raw_message.subject] += 1
        if not go.is_set() and m.park(go.wait):
            return
        acked_delivery[m.raw_message.subject] = m.raw_message.metadata.num_delivered
        await m.ack()

    real = Fetched.in_progress
    lost = True

    async def in_progress(self: Fetched) -> None:
        if not lost:
            await real(self)

    monkeypatch.setattr(Fetched, "in_progress", in_progress)
    fair = FairConsumer(lambda: nc, "FAIRD", "d", "_INBOX", handle, workers=2, window=8, ack_wait_s=1.0, graceful_s=5)
    await fair.start()
    try:
        await asyncio.sleep(2.6)  # keepalives lost for two and a half ack_waits: redelivered, fetched
        assert (await js.consumer_info("FAIRD", "d")).num_redelivered == 3, "every parked one came back"
        lost = False
        await asyncio.sleep(0.1)
        newest = {m.raw_message.subject: m.raw_message.metadata.num_delivered for m in fair.parked}
        assert len(fair.parked) == 3 and not fair.queue, "one waiting each, not one per delivery"
        assert min(newest.values()) >= 2, newest
        await asyncio.sleep(2.6)  # keepalives again: they reach the newest delivery, nothing comes back
        go.set()
        deadline = time.monotonic() + 30  # returns as soon as it holds
        while sum(handled.values()) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    finally:
        await fair.stop()
    assert handled == {f"faird.v1.acme.t{i}.x": 2 for i in range(3)}, "parked once, then handled once"
    info = await js.consumer_info("FAIRD", "d")
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert acked_delivery == newest, "kept alive once the keepalives reached the newest delivery"


async def test_a_running_handler_keeps_its_message_unless_stuck_past_hold_max_outside_a_long_call(nc):
    """The consumer beats for the messages its handlers hold, not only for those waiting: a
    handler that never beats itself keeps its message through three ack_waits (and through a
    graceful stop), so ``ack_wait`` can be short. One held past ``hold_max_s`` is taken for stuck:
    no more beats, and its message is redelivered (here to the same consumer's next handler)."""
    await _stream(nc, "FAIRE", ack_wait=1.0)
    js = nc.jetstream()
    await js.publish("faire.v1.acme.quiet.x", b"x")
    handled: Counter[str] = Counter()
    release = asyncio.Event()

    async def silent(m: Fetched) -> None:  # never beats itself
        handled[m.raw_message.subject.split(".")[3]] += 1
        await release.wait()
        await m.ack()

    beats: list[str] = []
    fair = FairConsumer(
        lambda: nc,
        "FAIRE",
        "d",
        "_INBOX",
        silent,
        workers=2,
        window=4,
        ack_wait_s=1.0,
        graceful_s=10,
        count=beats.append,
    )
    await fair.start()
    try:
        await asyncio.sleep(3.0)  # three ack_waits
        assert handled == {"quiet": 1} and (await js.consumer_info("FAIRE", "d")).num_redelivered == 0
        assert len(beats) >= 3 and set(beats) == {"mesh.messages.kept_alive"}, "each beat counted"
        stopping = asyncio.create_task(fair.stop())
        await asyncio.sleep(2.5)  # draining on stop: still beating for the handler that runs
        assert not stopping.done() and (await js.consumer_info("FAIRE", "d")).num_redelivered == 0
        release.set()
        await stopping
    finally:
        release.set()
        await fair.stop()
    assert handled == {"quiet": 1}

    async def settled() -> bool:  # an ack is applied by the server after it is sent
        return (await js.consumer_info("FAIRE", "d")).num_ack_pending == 0

    await eventually(settled, what="the quiet message acked")

    await js.publish("faire.v1.acme.stuck.x", b"x")
    release.clear()
    fair = FairConsumer(
        lambda: nc, "FAIRE", "d", "_INBOX", silent, workers=2, window=4, ack_wait_s=1.0, graceful_s=1, hold_max_s=1.5
    )
    await fair.start()
    try:
        deadline = time.monotonic() + 30
        while handled["stuck"] < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        release.set()
        await fair.stop()
    assert handled["stuck"] == 2, "held past hold_max_s: beats stop, the message goes to another handler"

    async def long_call(m: Fetched) -> None:  # a model call, a tool, a full stream: on purpose
        handled[m.raw_message.subject.split(".")[3]] += 1
        with m.hold():
            await asyncio.sleep(3.0)  # twice hold_max_s, three ack_waits
        await m.ack()

    redelivered = (await js.consumer_info("FAIRE", "d")).num_redelivered
    await js.publish("faire.v1.acme.long.x", b"x")
    fair = FairConsumer(
        lambda: nc, "FAIRE", "d", "_INBOX", long_call, workers=2, window=4, ack_wait_s=1.0, graceful_s=5, hold_max_s=1.5
    )
    await fair.start()
    try:
        await eventually(lambda: handled["long"] == 1, what="the long call started")
        await eventually(settled, what="the long call acked")
    finally:
        await fair.stop()
    assert handled["long"] == 1, "in a long call on purpose: kept alive past hold_max_s, handled once"
    assert (await js.consumer_info("FAIRE", "d")).num_redelivered == redelivered


async def test_what_a_dead_replica_held_goes_to_a_live_one_once_its_beats_stop(integration_infra, nc):
    """A replica dies holding messages (its connection gone, no NAK: kill -9): they come back
    once ``ack_wait`` has passed since its last beat, not after a long call's worst case, and the
    live replica handles each of them once."""
    await _stream(nc, "FAIRF", ack_wait=1.0)
    js = nc.jetstream()
    for i in range(4):
        await js.publish(f"fairf.v1.acme.t{i}.x", b"x")
    held: list[str] = []
    handled: Counter[str] = Counter()
    forever = asyncio.Event()

    async def hang(m: Fetched) -> None:
        held.append(m.raw_message.subject)
        await forever.wait()

    async def handle(m: Fetched) -> None:
        handled[m.raw_message.subject] += 1
        await m.ack()

    async with connect(integration_infra, "admin") as doomed_nc:
        doomed = FairConsumer(
            lambda: doomed_nc, "FAIRF", "d", "_INBOX", hang, workers=2, window=8, ack_wait_s=1.0, graceful_s=1
        )
        await doomed.start()
        deadline = time.monotonic() + 30
        while len(held) + len(doomed.queue) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # alive: it keeps all four past two ack_waits
        assert (await js.consumer_info("FAIRF", "d")).num_redelivered == 0
        for t in [*doomed._tasks, doomed._keepalive, *doomed.running]:  # dies: no beat, no NAK
            if t is not None:
                t.cancel()
    died = time.monotonic()
    live = FairConsumer(lambda: nc, "FAIRF", "d", "_INBOX", handle, workers=2, window=8, ack_wait_s=1.0, graceful_s=5)
    await live.start()
    try:
        deadline = time.monotonic() + 30
        while sum(handled.values()) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        taken_after = time.monotonic() - died
    finally:
        await live.stop()
    assert handled == {f"fairf.v1.acme.t{i}.x": 1 for i in range(4)}, handled
    print(f"dead replica's messages handled by the live one {taken_after:.2f}s after it died (ack_wait 1.0s)")
    info = await js.consumer_info("FAIRF", "d")
    assert info.num_ack_pending == 0 and info.num_pending == 0
