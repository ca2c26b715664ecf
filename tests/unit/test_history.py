"""``meshctl history``'s ordering and reading, on stored messages made here: causal order even when
an effect was stored before its cause, a forged sender shown as such, and a dead letter of the
task shown with who gave up and why."""

from __future__ import annotations

import time

import pytest

from mesh_contracts.v1 import StepCompleted, StepRequested, TaskSubmitted
from mesh_contracts.v1.common import PlanStep
from mesh_durable.tail import Stored
from mesh_identity import Principal, Signer, TrustBundle, Verifier, new_signing_key
from mesh_kit import envelope as env
from meshctl import history

pytestmark = pytest.mark.unit

T = {"tenant": "acme", "task_id": "t1"}


@pytest.fixture(scope="module")
def keys() -> dict[str, Signer]:
    return {r: Signer(r, new_signing_key()) for r in ("planner", "worker", "client.acme")}


@pytest.fixture(scope="module")
def verifier(keys) -> Verifier:
    return Verifier(
        TrustBundle({
            "planner": Principal("planner", "planner", None, keys["planner"].public_key),
            "worker": Principal("worker", "worker", None, keys["worker"].public_key),
            "client.acme": Principal("client.acme", "client", "acme", keys["client.acme"].public_key),
        })
    )  # fmt: skip


def _stored(signer: Signer, model, key: str, at: float, seq: int, cause: str = "") -> Stored:
    body = model.to_bytes()
    msg_id = env.message_id(model.type, model.tenant, model.task_id, key)
    return Stored(model.subject(), body, env.headers_for(signer, model, body, msg_id, cause or None), seq, at, 0)


def test_causal_order_dead_letters_and_unverified_senders(keys, verifier):
    now = time.time()
    submitted = _stored(keys["client.acme"], TaskSubmitted(**T, goal="mail ops@acme.test the report"), "s", now, 1)
    sub_id = submitted.headers[env.MSG_ID]
    step = PlanStep(step_id="s1", kind="research", instruction="look it up")
    requested = _stored(keys["planner"], StepRequested(**T, step=step), "s1:1", now + 0.01, 1, cause=sub_id)
    req_id = requested.headers[env.MSG_ID]
    # the worker's completion stored with an earlier timestamp than its request (another stream,
    # another clock in a cluster): causation still puts it after
    done = _stored(keys["worker"], StepCompleted(**T, step_id="s1", attempt=1, output="x"), "s1:1", now + 0.005, 2,
                   cause=req_id)  # fmt: skip
    forged = _stored(Signer("worker", new_signing_key()), StepCompleted(**T, step_id="s2", attempt=1, output="y"),
                     "s2:1", now + 0.02, 3, cause=req_id)  # fmt: skip
    dead = Stored(
        "dlq.worker.step.v1.acme.t1.requested", requested.data,
        {env.DLQ_SERVICE: "worker", env.DLQ_SUBJECT: "step.v1.acme.t1.requested", env.DLQ_KIND: "failed",
         env.DLQ_DELIVERIES: "5", env.DLQ_REASON: "ToolError: no route to ops@acme.test",
         env.ORIG_PREFIX + env.CAUSATION: sub_id},
        7, now + 0.03, 0,
    )  # fmt: skip
    h = history.build(
        "acme",
        "t1",
        [("STEP", done), ("TASK", submitted), ("STEP", requested), ("STEP", forged), ("DLQ", dead)],
        verifier,
    )
    types = [e.type for e in h.entries]
    assert types.index("task.submitted") < types.index("step.requested") < types.index("step.completed")
    by_type = {e.type: e for e in h.entries}
    assert by_type["step.requested"].cause == types.index("task.submitted")
    assert by_type["step.requested"].depth == 1 and h.entries[types.index("step.completed")].depth == 2
    senders = {e.summary.split(":")[0]: e.sender for e in h.entries if e.type == "step.completed"}
    assert senders["s1 attempt 1"] == "worker"
    assert senders["s2 attempt 1"].startswith("? ("), "a token the bundle does not vouch for is shown as such"
    letter = by_type["dead-letter"]
    assert letter.sender == "worker" and "gave up on step.requested after 5 deliveries (failed)" in letter.summary
    assert "ops@acme.test" not in letter.summary and "ops@acme.test" not in by_type["task.submitted"].summary
    assert letter.cause == types.index("task.submitted"), "a dead letter sits where its original would have"
    t = h.totals()
    assert t["dead_letters"] == 1 and t["step_attempts"] == {"s1": 1} and t["messages"] == 5
    text = history.render(h)
    assert "dead letters: 1" in text and "WARNING: 1 message(s)" in text
