"""The guard's view of a bucket (``mesh_durable.view.KeyView``) against a real, provisioned bucket:
a key is read once and then kept current from the bucket's republished feed; a lost fed write, a
reconnect, a write racing the read and ``max_age_s`` each make it read again, so it never
answers from memory what it cannot prove current."""

from __future__ import annotations

import asyncio

import pytest
from integration_helpers import connect, eventually, running, settings_for
from nats.js.errors import KeyWrongLastSequenceError

from mesh_contracts import topology as topo
from mesh_durable.guard import enable as enable_guard
from mesh_durable.view import KeyView
from mesh_host import Mesh
from mesh_kit import state as st

pytestmark = pytest.mark.integration


@pytest.fixture
async def meshes(integration_infra):
    """The checker reads the ``status`` bucket (a follower of its feed); the planner writes it."""
    reader = Mesh(settings_for(integration_infra, "checker"))
    writer = Mesh(settings_for(integration_infra, "planner"))
    async with running(reader), running(writer):
        yield reader, writer


async def _view(mesh: Mesh, max_age_s: float = 30.0) -> KeyView:
    view = KeyView(mesh.nc, st.bind(mesh.nc, "status"), "status", max_age_s=max_age_s)
    await view.start()
    return view


async def test_a_key_is_read_once_and_every_later_write_arrives_by_the_feed(meshes, unique):
    reader, writer = meshes
    view, out = await _view(reader), st.bind(writer.nc, "status")
    key = f"acme.{unique('t')}"
    try:
        assert await view.get(key) is None and view.reads == 1, "never written: one read"
        for _ in range(5):
            assert await view.get(key) is None
        assert view.reads == 1 and view.hits == 5, "then from memory"

        await out.put(key, b'{"status":"halted"}')
        await eventually(lambda: view.get(key), timeout=30, what="the fed write")
        assert await view.get(key) == b'{"status":"halted"}'
        await out.put(key, b'{"status":"running"}')
        await out.delete(key)
        await eventually(lambda: _is(view, key, None), timeout=30, what="the fed delete")
        assert view.reads == 1 and view.gaps == 0, "every write came by the feed, none was read"

        # A write the bucket refused (a failed compare-and-set) is never fed: the view keeps what is stored.
        await out.put(key, b'{"status":"completed"}')
        await eventually(lambda: _is(view, key, b'{"status":"completed"}'), timeout=30, what="the put")
        with pytest.raises(KeyWrongLastSequenceError):
            await out.update(key, b'{"status":"failed"}', last=1)
        await asyncio.sleep(0.2)
        assert await view.get(key) == b'{"status":"completed"}' and view.reads == 1
    finally:
        await view.stop()


async def _is(view: KeyView, key: str, value: bytes | None) -> bool:
    return await view.get(key) == value


async def test_a_lost_fed_write_is_found_by_the_next_one_or_by_the_age_bound(meshes, unique):
    reader, writer = meshes
    view, out = await _view(reader, max_age_s=1.5), st.bind(writer.nc, "status")
    key = f"acme.{unique('t')}"
    try:
        await out.put(key, b"1")
        assert await view.get(key) == b"1" and view.reads == 1

        # Lose the feed for one write (the subscription is gone while it is stored).
        await view._sub.unsubscribe()
        await reader.nc.flush()
        await out.put(key, b"2")
        view._sub = await reader.nc.subscribe(topo.watch_feed("KV_status"), cb=view._on_feed)
        await reader.nc.flush()
        assert await view.get(key) == b"1", "the lost write is not known yet (what the age bound is for)"

        await out.put(key, b"3")  # follows revision 2, which the view never saw: a gap
        await eventually(lambda: view.gaps == 1, timeout=30, what="the gap")
        assert await view.get(key) == b"3" and view.reads == 2, "read again after the gap"

        await view._sub.unsubscribe()
        await reader.nc.flush()
        await out.put(key, b"4")  # lost, and nothing follows it
        view._sub = await reader.nc.subscribe(topo.watch_feed("KV_status"), cb=view._on_feed)
        await reader.nc.flush()
        await eventually(lambda: _is(view, key, b"4"), timeout=30, what="the age bound")
        assert view.reads == 3, "seen by the re-read max_age_s after the last read"
    finally:
        await view.stop()


async def test_a_write_that_races_the_read_is_not_forgotten(meshes, unique):
    reader, writer = meshes
    kv = st.bind(reader.nc, "status")
    view, out = KeyView(reader.nc, kv, "status", max_age_s=30.0), st.bind(writer.nc, "status")
    await view.start()
    key = f"acme.{unique('t')}"
    await out.put(key, b"old")
    get = kv.get

    async def slow_get(k, *a, **kw):
        entry = await get(k, *a, **kw)  # the stored value as of now ...
        await out.put(k, b"new")  # ... then a write is stored and fed before the answer is used
        await eventually(lambda: view._reading.get(k), timeout=30, what="the fed write during the read")
        return entry

    kv.get = slow_get
    try:
        assert await view.get(key) == b"new", "the fed write is newer than what the read returned"
        kv.get = get
        assert await view.get(key) == b"new" and view.reads == 1, "and it is what the view remembers"
    finally:
        await view.stop()


async def test_a_reconnect_forgets_everything_and_zero_age_reads_every_time(meshes, unique):
    reader, _ = meshes
    view = await _view(reader)
    key = f"acme.{unique('t')}"
    try:
        await view.get(key)
        await view.get(key)
        assert view.reads == 1
        before = reader.nc.stats["reconnects"]
        await reader.nc.force_reconnect()
        await eventually(lambda: reader.nc.stats["reconnects"] > before and reader.nc.is_connected, timeout=10)
        await view.get(key)
        assert view.reads == 2, "what was remembered before the reconnect may have missed writes"
        await view.get(key)
        assert view.reads == 2
    finally:
        await view.stop()

    off = await _view(reader, max_age_s=0)
    for _ in range(3):
        await off.get(key)
    assert off.reads == 3 and off.hits == 0 and off._sub is None


async def test_memory_holds_the_keys_read_lately_not_every_key_ever_read(meshes, unique):
    """A soak's finished tasks used to stay in every process's view up to 50,000 keys; a key read
    longer ago than ``max_age_s`` is read again anyway, so it is forgotten when newer reads come."""
    reader, _ = meshes
    view = await _view(reader, max_age_s=0.5)
    old = [f"acme.{unique('old')}" for _ in range(200)]
    try:
        for key in old:
            await view.get(key)
        assert len(view) == 200 and view.reads == 200
        await view.get(old[-1])
        assert view.hits == 1, "a key read lately is answered from memory"
        await asyncio.sleep(0.6)
        fresh = f"acme.{unique('new')}"
        await view.get(fresh)
        assert len(view) == 1, "the keys read over max_age_s ago are forgotten"
        await view.get(fresh)
        assert view.hits == 2 and view.reads == 201
    finally:
        await view.stop()


async def test_the_guard_sees_a_kill_switch_and_a_halt_without_reading_per_call(integration_infra, unique):
    """The guard's checks cost no round trip once warm, and an operator's kill switch still stops
    the next call as soon as its fed write arrives."""
    checker = Mesh(settings_for(integration_infra, "checker"))
    guard = enable_guard(checker)
    task = unique("t")
    async with running(checker):
        assert await guard.check("acme", task) is None
        for _ in range(20):
            assert await guard.check("acme", task) is None
        assert guard.switch_view is not None and guard.status_view is not None
        assert guard.switch_view.reads == 2 and guard.status_view.reads == 1, "two switches and one status, read once"

        async with connect(integration_infra, "admin") as admin:
            kv = await admin.jetstream().key_value("control")
            await kv.put("kill.tenant.acme", b'{"reason": "incident 7"}')
            stop = await eventually(lambda: guard.check("acme", task), timeout=30, what="the kill switch")
            assert stop.code == "kill_switch" and "incident 7" in stop.reason
            assert await guard.check("globex", task) is None, "another tenant goes on"
            await kv.delete("kill.tenant.acme")
            await eventually(lambda: _none(guard.check("acme", task)), timeout=30, what="the switch off")
        assert guard.switch_view.reads <= 3 and guard.status_view.reads <= 2


async def _none(check) -> bool:
    return await check is None
