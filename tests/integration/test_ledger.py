"""The ledger on a real bucket: an effect is performed once, its result answers every later
attempt, and a live claim by another message keeps that message waiting."""

from __future__ import annotations

import json

import pytest
from integration_helpers import running, settings_for

from mesh_contracts import sealing
from mesh_durable.ledger import BUCKET, Busy, Ledger
from mesh_host import Mesh
from mesh_kit import state as st

pytestmark = pytest.mark.integration


async def test_performed_once_then_answered_from_the_record(integration_infra, unique):
    mesh = Mesh(settings_for(integration_infra, "tool-executor"))
    async with running(mesh):
        ledger = Ledger(st.bind(mesh.nc, BUCKET), "tool-executor")
        key = ledger.key("acme", unique("t"), "c1")
        performed: list[str] = []

        async def perform(k: str) -> dict:
            performed.append(k)
            return {"ok": True, "n": len(performed)}

        first = await ledger.run(key, perform, owner="TOOL:1", attempt=1)
        again = await ledger.run(key, perform, owner="TOOL:2", attempt=1)  # another message, same effect
        assert first == again == {"ok": True, "n": 1} and performed == [key]

        nothing = ledger.key("acme", unique("t"), "c2")

        async def returns_none(k: str) -> None:
            performed.append(k)

        assert await ledger.run(nothing, returns_none, owner="TOOL:3") is None
        assert await ledger.run(nothing, returns_none, owner="TOOL:4") is None, "a None result is a result too"
        assert performed == [key, nothing]

        held = ledger.key("acme", unique("t"), "c3")

        async def slow(k: str) -> str:
            with pytest.raises(Busy):  # a different message meets the live claim
                await ledger.run(held, perform, owner="TOOL:6", attempt=1)
            return "done"

        assert await ledger.run(held, slow, owner="TOOL:5", attempt=1) == "done"
        assert await ledger.run(held, perform, owner="TOOL:6", attempt=2) == "done"


async def test_a_model_call_is_recorded_in_one_write_and_answers_every_later_attempt(integration_infra, unique):
    """``claim=False`` (model calls): no claim, one stored write per call; the first record wins
    and answers a redelivery, another message and a racing performer alike."""
    mesh = Mesh(settings_for(integration_infra, "worker"))
    async with running(mesh):
        kv = st.bind(mesh.nc, BUCKET)
        ledger = Ledger(kv, "worker")
        key = ledger.key("acme", unique("t"), "llm", "s1-a1-i0")
        performed: list[int] = []

        async def call(k: str) -> dict:
            performed.append(len(performed) + 1)
            return {"text": f"answer {len(performed)}"}

        first = await ledger.run(key, call, owner="STEP:1", attempt=1, claim=False)
        entry = await kv.get(key)
        assert entry.revision is not None
        assert json.loads(entry.value)["status"] == "done", "recorded as done in its only write"
        again = await ledger.run(key, call, owner="STEP:1", attempt=2, claim=False)
        other = await ledger.run(key, call, owner="STEP:9", attempt=1, claim=False)
        assert first == again == other == {"text": "answer 1"} and performed == [1]
        assert (await kv.get(key)).revision == entry.revision, "answering from the record writes nothing"

        raced = ledger.key("acme", unique("t"), "llm", "s2-a1-i0")

        async def slow(k: str) -> dict:
            # another performer records first while this call runs: its record answers us both
            await ledger.run(raced, call, owner="STEP:3", attempt=1, claim=False)
            return {"text": "late"}

        assert await ledger.run(raced, slow, owner="STEP:2", attempt=1, claim=False) == {"text": "answer 2"}
        assert await ledger.recorded(raced) == {"text": "answer 2"}
        assert sealing.is_sealed(json.loads((await kv.get(raced)).value)["result"]), (
            "a model's answer is sealed at rest"
        )
