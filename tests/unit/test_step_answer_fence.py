"""A step's answer ends it with its outcome message alone (no last checkpoint write), fenced by a read.

The answering turn is not written to KV ``steps`` (one stored write less per step): the
``step.completed`` message is the step's record. What the write's compare-and-set did, a read of
the checkpoint still does: a delivery whose turn another delivery moved on meanwhile publishes
nothing. These tests run the worker's real loop on in-memory stores.
"""

from __future__ import annotations

from typing import Any

import pytest

from mesh_contracts.v1 import PlanStep, StepCompleted, StepRequested, ToolCompleted, ToolRequested
from mesh_testing.fakes import FakeMesh
from mesh_tool_executor.tools import Registry

pytestmark = pytest.mark.unit
T = {"tenant": "acme", "task_id": "t1"}
STEP = PlanStep(step_id="s1", instruction="Compute 17 * 23", tools=("calculator",))


class CountingMesh(FakeMesh):
    def __init__(self) -> None:
        super().__init__()
        self.counted: list[str] = []

    def count(self, name: str, attributes: dict[str, str] | None = None) -> None:
        self.counted.append(name)


def _worker(mesh: FakeMesh) -> Any:
    from mesh_durable.ledger import Ledger
    from mesh_llm import ScriptedModel
    from mesh_llm.gateway import Gateway
    from mesh_llm.resilience import RetryPolicy
    from mesh_testing.memkv import MemoryKV
    from mesh_worker.service import Worker

    model = ScriptedModel(
        "scripted-1",
        scripts={"worker": [{"tool_calls": [{"name": "calculator", "arguments": {"expression": "17 * 23"}}]},
                            {"content": "17 * 23 = 391."}]},
    )  # fmt: skip
    gateway = Gateway({"default": [model]}, retry=RetryPolicy(max_attempts=1, base_s=0.0, max_s=0.0))
    worker = Worker(mesh, gateway)  # type: ignore[arg-type]
    worker.steps, worker.ledger = MemoryKV(), Ledger(MemoryKV(), "worker")
    worker.calls.use_catalogue(Registry().catalogue())
    return worker


async def _to_the_answer(worker: Any, mesh: FakeMesh) -> None:
    """The step asks for the calculator, then its result comes back: the next turn answers."""
    await worker.on_step(StepRequested(**T, step=STEP), None)
    calc = mesh.last(ToolRequested)
    await worker.on_tool(
        ToolCompleted(**T, step_id="s1", call_id=calc.call_id, tool="calculator", ok=True, result="391"), None
    )


async def test_the_answer_is_published_and_not_written_to_the_checkpoint():
    from mesh_kit import state as st
    from mesh_worker.checkpoint import StepRun

    mesh = CountingMesh()
    worker = _worker(mesh)
    await _to_the_answer(worker, mesh)
    done = mesh.last(StepCompleted)
    assert done.output == "17 * 23 = 391." and done.iterations == 2 and done.tools == ("calculator",)
    run, rev = await st.load(worker.steps, StepRun.key("acme", "t1", "s1"), StepRun)
    # Written twice (the tool call's turn, its result); the answer only published.
    assert run is not None and run.status == "running" and run.iteration == 1 and rev == 2
    assert "mesh.steps.fenced" not in mesh.counted


async def test_an_answer_whose_turn_another_delivery_moved_on_is_not_published():
    from mesh_kit import state as st
    from mesh_worker.checkpoint import StepRun

    mesh = CountingMesh()
    worker = _worker(mesh)
    key = StepRun.key("acme", "t1", "s1")
    answer = worker.loop._call_model

    async def raced(run: Any, call_id: str, d: Any) -> Any:
        got = await answer(run, call_id, d)
        if run.iteration == 0:
            return got  # the first turn (the tool call) is not raced
        # Meanwhile a redelivery of the step moved it on (its turn asked for another call).
        stored, _ = await st.load(worker.steps, key, StepRun)
        assert stored is not None and stored.iteration == run.iteration
        stored.iteration += 1
        await worker.steps.put(key, stored.model_dump_json().encode())
        return got

    worker.loop._call_model = raced
    await _to_the_answer(worker, mesh)
    assert mesh.all(StepCompleted) == [], "a stale answer was published"
    assert mesh.counted.count("mesh.steps.fenced") == 1
