"""Bounded streams, through the real mesh: a stream at its cap refuses new messages and keeps
every one it holds. Work in hand waits in place (no attempt spent, nothing dead-lettered) and
finishes once there is room; new tasks are refused at the door with ``overloaded`` and a
retry-after, by the planner near a cap and by the TASK stream itself when it is full."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from mesh_contracts.v1 import TaskCompleted, TaskRejected
from mesh_contracts.v1.records import AdmissionRecord
from mesh_testing.chaos import ChaosMesh, started
from mesh_testing.infra import Infra, running_infra
from meshctl.cli import main
from meshctl.provision import store_levels

pytestmark = pytest.mark.e2e
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
HIGH_WATER = 0.5
ENV = {
    "MESH_ACK_WAIT_S": "2",
    "MESH_LOG_LEVEL": "WARNING",
    "MESH_STORE_HIGH_WATER": str(HIGH_WATER),  # the planner refuses new tasks from half a cap
    # A broker outage is waited out in place for this long, then counts as an attempt; a full
    # stream is not an outage and is waited out for as long as it lasts.
    "MESH_INFRA_RETRY_S": "1",
}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex"], name="bounded", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


async def _cap(infra: Infra, stream: str, max_msgs: int) -> int:
    """Set ``stream``'s message cap (-1: none) as an operator would; returns what it holds."""
    nc = await infra.admin()
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        info.config.max_msgs = max_msgs
        await js.update_stream(info.config)
        return info.state.messages
    finally:
        await nc.close()


async def _durable(infra: Infra, stream: str, name: str):
    nc = await infra.admin()
    try:
        return await nc.jetstream().consumer_info(stream, name)
    finally:
        await nc.close()


async def _held(infra: Infra, stream: str) -> tuple[int, int]:
    nc = await infra.admin()
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.state.messages, info.state.first_seq
    finally:
        await nc.close()


async def test_work_in_hand_waits_at_a_full_stream_and_finishes_when_there_is_room(infra, mesh):
    """CHECK holds one message: the planner's check request goes in, the checker's verdict is
    refused. The checker holds the request in place (kept alive, no attempt spent), the task
    neither fails nor dead-letters, and it completes once the cap is raised."""
    assert await _cap(infra, "CHECK", 1) == 0, "a fresh mesh: CHECK is empty"
    try:
        async with infra.client("acme") as c:
            task = asyncio.create_task(c.submit(GOAL, task_id="held", progress=False, timeout=90))
            deadline = time.monotonic() + 30
            while (await _held(infra, "CHECK"))[0] < 1:
                assert time.monotonic() < deadline and not task.done(), "the check request never came"
                await asyncio.sleep(0.1)
            await asyncio.sleep(5.0)  # past two ack waits: a message not kept alive would come back
            assert not task.done(), "the verdict could not be stored: the task is waiting, not ended"
            checker = await _durable(infra, "CHECK", "checker--check-requested")
            assert checker.num_redelivered == 0 and checker.num_ack_pending == 1, checker
            assert (await _held(infra, "DLQ"))[0] == 0, "nothing was dead-lettered"
            assert await _cap(infra, "CHECK", -1) == 1, "the stream kept what it held and took nothing more"
            seen = await task
    finally:
        await _cap(infra, "CHECK", -1)
    assert isinstance(seen.outcome, TaskCompleted), seen.outcome
    assert "391" in seen.outcome.answer, seen.outcome.answer
    checker = await _durable(infra, "CHECK", "checker--check-requested")
    assert checker.num_redelivered == 0, "holding in place spent no delivery"
    assert (await _held(infra, "DLQ"))[0] == 0


async def test_the_planner_refuses_new_tasks_near_a_cap_and_nothing_of_them_runs(infra, mesh):
    held = await _cap(infra, "STEP", -1)
    await _cap(infra, "STEP", held + 1)  # over the high water (a half), one message from full
    try:
        await asyncio.sleep(1.5)  # the planner reads the streams' levels once a second
        nc = await infra.admin()
        try:
            levels = await store_levels(nc)
        finally:
            await nc.close()
        assert HIGH_WATER <= levels["STEP"]["full"] < 1.0, levels["STEP"]
        async with infra.client("globex") as g:
            seen = await g.submit(GOAL, task_id="near-cap", progress=False, timeout=30)
        out = seen.outcome
        assert isinstance(out, TaskRejected) and out.code == "overloaded", out
        assert "STEP" in out.reason and out.retry_after_s == 30.0, out.reason
        assert (await _held(infra, "STEP"))[0] == held, "nothing of the refused task ran"
    finally:
        await _cap(infra, "STEP", -1)
    await asyncio.sleep(1.5)
    async with infra.client("globex") as g:
        again = await g.submit(GOAL, task_id="after-cap", progress=False, timeout=60)
    assert isinstance(again.outcome, TaskCompleted), again.outcome
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value(AdmissionRecord.bucket)
        record = AdmissionRecord.model_validate_json((await kv.get("globex")).value)
    finally:
        await nc.close()
    assert record.refused.get("overloaded") == 1, record


async def test_a_full_task_stream_refuses_a_submission_at_once(infra, mesh, capsys):
    held = await _cap(infra, "TASK", -1)
    _, first = await _held(infra, "TASK")
    await _cap(infra, "TASK", held)
    try:
        async with infra.client("acme") as c:
            seen = await c.submit(GOAL, task_id="task-full", progress=False, timeout=30)
        out = seen.outcome
        assert isinstance(out, TaskRejected) and out.code == "overloaded", out
        assert "stream TASK is full (maximum messages exceeded)" in out.reason, out.reason
        assert out.retry_after_s == 30.0, out  # (the door's answer: no follow-up, no timeout)
        assert await _held(infra, "TASK") == (held, first), "full means no more, never forget the oldest"
        code = await asyncio.to_thread(
            main, ["--home", str(infra.home), "submit", GOAL, "--tenant", "acme", "--follow",
                   "--nats-url", infra.nats_url],
        )  # fmt: skip
        err = capsys.readouterr().err
        assert code == 4 and "(overloaded)" in err and "retry after 30s" in err, err
    finally:
        await _cap(infra, "TASK", -1)
    async with infra.client("acme") as c:
        again = await c.submit(GOAL, task_id="task-room", progress=False, timeout=60)
    assert isinstance(again.outcome, TaskCompleted), again.outcome
