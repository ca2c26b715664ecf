"""An effect whose receipt is late (the outbox stream's leader moved, the broker restarted) is
neither "failed" nor lost: the call raises a broker timeout and keeps its ledger claim, the
handler is re-run in place, and each try hands the sink the same idempotency key, so one email
lands and the step is told it was sent. Taken to explain the cluster chaos drill's miss: a task
completed without its email, which the 5 s tool timeout cutting a publish that waited for a
leader election would do (recorded "send_email timed out")."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from mesh_contracts.v1 import ToolRequested
from mesh_durable.ledger import Ledger
from mesh_kit.consume.handle import rerun
from mesh_kit.delivery import Delivery
from mesh_kit.settings import BROKER_UNAVAILABLE
from mesh_testing.fakes import FakeMesh
from mesh_testing.memkv import MemoryKV
from mesh_tool_executor.running import EffectUnconfirmed
from mesh_tool_executor.service import ToolExecutor
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_tool_executor.tools import with_policy

pytestmark = pytest.mark.unit

REQ = ToolRequested(tenant="acme", task_id="t1", step_id="s3", call_id="s3-i1-c0", tool="send_email",
                    arguments={"to": "ops@acme.test", "subject": "Your answer", "body": "391"})  # fmt: skip


class Outbox:
    """The sink as JetStream is to it: it stores once per idempotency key (``Nats-Msg-Id``), and a
    receipt can be late: ``late`` receipts (the first ones) arrive only after ``late_s``."""

    def __init__(self, late: int, late_s: float = 30.0) -> None:
        self.stored: dict[str, bytes] = {}
        self.handed = 0
        self.late, self.late_s = late, late_s

    async def __call__(self, suffix: str, payload: bytes, key: str) -> str:
        self.handed += 1
        self.stored.setdefault(key, payload)  # the broker has it; its answer is what may not come back
        if self.handed <= self.late:
            await asyncio.sleep(self.late_s)
        return f"outbox #{list(self.stored).index(key) + 1}"


def _executor(tmp_path, outbox: Outbox) -> tuple[ToolExecutor, Ledger]:
    settings = ToolExecutorSettings(
        service="tool-executor", signing_key_file=tmp_path / "k", trust_bundle_file=tmp_path / "b"
    )
    mesh = FakeMesh(service="tool-executor")
    mesh.settings = None  # type: ignore[attr-defined]
    ex = ToolExecutor(mesh, settings)  # type: ignore[arg-type]
    ex.registry.tools["send_email"] = with_policy(ex.registry.tools["send_email"], {"timeout_s": 0.2})
    ex.ledger = Ledger(MemoryKV(), "tool-executor")
    ex.runner.effect = outbox  # type: ignore[method-assign]
    return ex, ex.ledger


def _delivery(attempt: int) -> Delivery:
    """The same stored message (TOOL sequence 41), delivered for the ``attempt``-th time."""
    return Delivery(SimpleNamespace(name="worker"), REQ.subject(), "m-1", attempt, {}, seq=41)  # type: ignore[arg-type]


async def test_a_late_receipt_is_retried_under_the_same_key_and_lands_once(tmp_path):
    outbox = Outbox(late=1)
    ex, ledger = _executor(tmp_path, outbox)
    tool, args = ex.registry.validate(REQ.tool, REQ.arguments)
    key = ledger.key("acme", "t1", REQ.call_id)

    with pytest.raises(
        EffectUnconfirmed, match=r"the outbox did not confirm tool-executor\.acme\.t1\.s3-i1-c0"
    ) as raised:
        await ex.runner.run_recorded(REQ, tool, args, _delivery(1))
    assert isinstance(raised.value, BROKER_UNAVAILABLE), "the broker's timeout: re-run in place, no attempt spent"
    held = json.loads((await ledger.kv.get(key)).value)
    assert held["status"] == "claimed", "nothing recorded: the retry decides, not this timeout"

    outcome = await ex.runner.run_recorded(REQ, tool, args, _delivery(1))  # the in-place re-run
    assert outcome["ok"] and "queued email to ops@acme.test (outbox #1)" in outcome["result"]
    assert (outbox.handed, len(outbox.stored)) == (2, 1), "handed twice under one key: stored once"
    assert json.loads((await ledger.kv.get(key)).value)["status"] == "done"
    # a later redelivery (the answer's publish failed) gets the record without touching the sink
    assert await ex.runner.run_recorded(REQ, tool, args, _delivery(2)) == outcome
    assert outbox.handed == 2


async def test_the_consumer_re_runs_the_call_in_place_until_the_receipt_comes(tmp_path):
    """Through the kit's handle stage: two late receipts, one delivery, no attempt spent."""
    outbox = Outbox(late=2)
    ex, _ = _executor(tmp_path, outbox)
    tool, args = ex.registry.validate(REQ.tool, REQ.arguments)
    outcomes = []

    async def handler(m, d):
        outcomes.append(await ex.runner.run_recorded(m, tool, args, d))

    await rerun(handler, REQ, _delivery(1), infra_retry_s=30, count=lambda name: None)
    assert [o["ok"] for o in outcomes] == [True] and (outbox.handed, len(outbox.stored)) == (3, 1)


async def test_a_tool_that_fails_on_its_own_is_still_an_answer_not_a_retry(tmp_path):
    """Only a receipt still awaited makes a timeout ambiguous: a tool that times out before it
    handed anything to the sink failed, and the step is told so at once."""
    ex, ledger = _executor(tmp_path, Outbox(late=0))

    async def slow_before_the_effect(args, ctx):
        await asyncio.sleep(5)
        return "never"

    slow = replace(ex.registry.tools["send_email"], timeout_s=0.1, run=slow_before_the_effect)
    outcome = await ex.runner.run_recorded(REQ, slow, {}, _delivery(1))
    assert outcome == {"ok": False, "result": "", "error": "send_email timed out after 0.1s", "untrusted": False}
    assert json.loads((await ledger.kv.get(ledger.key("acme", "t1", REQ.call_id))).value)["status"] == "done"
