"""Compare-and-set on a real bucket: a process that made a key's last write skips the read
before its next one, and nothing a writer elsewhere did is ever lost or decided on stale data."""

from __future__ import annotations

import asyncio

import pytest
from integration_helpers import running, settings_for
from pydantic import BaseModel

from mesh_host import Mesh
from mesh_kit import state as st

pytestmark = pytest.mark.integration


class Tally(BaseModel):
    n: int = 0
    by: list[str] = []


def _counting(kv):
    calls = {"get": 0}
    get = kv.get

    async def counted(key, *a, **k):
        calls["get"] += 1
        return await get(key, *a, **k)

    kv.get = counted
    return calls


def _add(who: str):
    def mutate(cur: Tally | None) -> Tally:
        cur = cur or Tally()
        cur.n += 1
        cur.by.append(who)
        return cur

    return mutate


async def test_own_writes_skip_the_read_and_another_writer_is_never_lost(integration_infra, unique):
    mesh = Mesh(settings_for(integration_infra, "planner"))
    key = f"acme.{unique('tally')}"
    async with running(mesh):
        a, b = st.bind(mesh.nc, "tasks"), st.bind(mesh.nc, "tasks")  # two processes' views
        reads = _counting(a)
        for _ in range(3):
            await st.update(a, key, Tally, _add("a"))
        assert reads["get"] == 1, "only the first write read the key"

        await st.update(b, key, Tally, _add("b"))  # a write a does not know of
        value, changed = await st.update(a, key, Tally, _add("a"))
        assert changed and value is not None and value.by == ["a", "a", "a", "b", "a"], "b's write kept"
        assert reads["get"] == 2, "a's remembered value failed the compare-and-set, so a read the key"

        # "no change" is never decided on a remembered value: a remembers the mark it looks for,
        # b has removed it since
        await st.update(a, key, Tally, _add("mark"))

        def unmark(cur: Tally | None) -> Tally | None:
            assert cur is not None
            cur.by.remove("mark")
            return cur

        await st.update(b, key, Tally, unmark)

        def unless_marked(cur: Tally | None) -> Tally | None:
            return None if cur is not None and "mark" in cur.by else _add("after")(cur)

        value, changed = await st.update(a, key, Tally, unless_marked)
        assert changed and value is not None and value.by[-1] == "after", "decided on what is stored now"


async def test_concurrent_writers_in_two_views_count_every_increment(integration_infra, unique):
    mesh = Mesh(settings_for(integration_infra, "planner"))
    key = f"acme.{unique('race')}"
    async with running(mesh):
        views = [st.bind(mesh.nc, "tasks") for _ in range(2)]
        await asyncio.gather(*(st.update(views[i % 2], key, Tally, _add(str(i % 2))) for i in range(40)))
        final, _ = await st.load(views[0], key, Tally)
        assert final is not None and final.n == 40 and sorted(final.by) == sorted(str(i % 2) for i in range(40))


async def test_handlers_of_one_process_take_turns_on_a_key_and_no_write_is_refused(integration_infra, unique):
    """Twenty updates of one key at once from one process: each starts from the value the one
    before it wrote, so none of them reads the key again or has a write refused; another key is
    not held up meanwhile, and no lock outlives the updates that held it."""
    mesh = Mesh(settings_for(integration_infra, "planner"))
    key, other = f"acme.{unique('turns')}", f"acme.{unique('other')}"
    async with running(mesh):
        kv = st.bind(mesh.nc, "tasks")
        await st.update(kv, key, Tally, _add("first"))  # remembered from here on
        reads = _counting(kv)
        refused = {"n": 0}
        update = kv.update

        async def counted_update(k, value, last=None):
            try:
                return await update(k, value, last=last)
            except st.KeyWrongLastSequenceError:
                refused["n"] += 1
                raise

        kv.update = counted_update
        order: list[str] = []

        def slow(who: str):
            def mutate(cur: Tally | None) -> Tally:
                order.append(who)
                return _add(who)(cur)

            return mutate

        await asyncio.gather(
            *(st.update(kv, key, Tally, slow(str(i))) for i in range(20)), st.update(kv, other, Tally, _add("o"))
        )
        assert reads["get"] == 1, "only the other key was read (it was new to this process)"
        final, _ = await st.load(kv, key, Tally)
        assert final is not None and final.n == 21 and final.by[1:] == order, "every update kept, in turn"
        assert refused["n"] == 0, "no write refused: nobody started from a value another had replaced"
        assert not st._writers.get(kv), "no lock left behind"
