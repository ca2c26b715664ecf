"""What the budget is told of a message (``Mesh-Facts``): enough to follow the task, nothing of
what it is about, bound to the sender's token, and true to the body its consumers read."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from mesh_budget.monitor import Monitor, Rules, Seen
from mesh_contracts import ContractError
from mesh_contracts import facts as mf
from mesh_contracts import topology as topo
from mesh_contracts.registry import VERSIONS
from mesh_contracts.v1 import (
    CheckRequested,
    IngestRequested,
    PlanStep,
    RetrievalCompleted,
    RetrievalHit,
    RetrievalRequested,
    StepCompleted,
    StepRequested,
    TaskLimits,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
)
from mesh_identity import IdentityError
from mesh_kit import envelope as env

pytestmark = pytest.mark.unit
SECRET = "SECRET-CONTENT-41"
T = {"tenant": "acme", "task_id": "t1"}


def _with_content() -> list[tuple[str, object]]:
    step = PlanStep(step_id="s1", instruction=f"do {SECRET}")
    hit = RetrievalHit(doc_id="d1", version="v1", chunk_id="c1", chunk_hash="h1", text=SECRET, score=1.0)
    return [
        ("client.acme", TaskSubmitted(**T, goal=SECRET, labels={"team": "support"})),
        (
            "client.acme",
            IngestRequested(
                **T, doc_id="d1", media_type="text/plain", content_b64=base64.b64encode(SECRET.encode()).decode()
            ),
        ),
        ("planner", StepRequested(**T, step=step, inputs={"s0": SECRET})),
        ("worker", ToolRequested(**T, step_id="s1", call_id="c1", tool="http_get", arguments={"url": SECRET})),
        ("worker", RetrievalRequested(**T, step_id="s1", call_id="r1", query=SECRET)),
        ("rag", RetrievalCompleted(**T, step_id="s1", call_id="r1", hits=(hit,))),
        ("tool-executor", ToolCompleted(**T, step_id="s1", call_id="c1", tool="http_get", ok=True, result=SECRET)),
        ("worker", StepCompleted(**T, step_id="s1", output=SECRET)),
        ("planner", CheckRequested(**T, goal=SECRET, answer=SECRET)),
    ]


def test_every_message_the_budget_follows_gets_facts_and_no_other_does(keys):
    signer = keys.signer("planner")
    for c in VERSIONS[1]:
        if c.spec.transport != "stream":
            continue
        example = c.model_validate(c.model_config["json_schema_extra"]["examples"][0])
        if "planner" not in c.spec.producers:
            continue
        headers = env.headers_for(signer, example, example.to_bytes(), "m-1")
        assert (env.FACTS in headers) == (c.spec.domain in topo.ENVELOPED), c.type_name()


def test_the_facts_hold_no_content_and_the_signatures_need_the_producers_key(keys):
    for producer, m in _with_content():
        headers = env.headers_for(keys.signer(producer), m, m.to_bytes(), "m-1")  # type: ignore[arg-type]
        assert SECRET not in headers[env.FACTS] and base64.b64encode(SECRET.encode()).decode() not in headers[env.FACTS]
    tool = ToolRequested(**T, step_id="s1", call_id="c1", tool="http_get", arguments={"url": SECRET})
    keyed = mf.facts(tool, keys.signer("worker").fingerprint)["sig"]
    assert keyed == mf.facts(tool, keys.signer("worker").fingerprint)["sig"], "equal calls, equal signatures"
    assert keyed != mf.facts(tool)["sig"], "not the plain digest anyone can compute from a guess"
    assert keyed != mf.facts(tool, keys.signer("planner").fingerprint)["sig"]
    assert keyed not in hashlib.sha256(mf.canonical(["call", "http_get", {"url": SECRET}])).hexdigest()


def test_a_consumer_refuses_facts_that_are_not_the_bodys_or_not_the_tokens(keys):
    client, verifier = keys.signer("client.acme"), keys.verifier()
    m = TaskSubmitted(**T, goal="g", limits=TaskLimits(deadline_s=60))
    body = m.to_bytes()
    headers = env.headers_for(client, m, body, "m-1")
    assert verifier.verify_with_facts(headers[env.IDENTITY], body, m, headers[env.FACTS]).name == "client.acme"
    # The tenant tells the budget another deadline than the planner gets: refused by the planner.
    lying = mf.encode({**mf.decode(headers[env.FACTS]), "limits": TaskLimits(deadline_s=9999).model_dump(mode="json")})
    token = client.token(tenant="acme", msg_type=m.type, body=body, msg_id="m-1", facts=lying)
    with pytest.raises(ContractError, match="limits"):
        verifier.verify_with_facts(token, body, m, lying)
    with pytest.raises(IdentityError, match="does not match the identity token"):
        verifier.verify_with_facts(headers[env.IDENTITY], body, m, lying)  # altered in transit
    bare = client.token(tenant="acme", msg_type=m.type, body=body, msg_id="m-1")
    with pytest.raises(IdentityError, match="not covered"):
        verifier.verify_with_facts(bare, body, m, headers[env.FACTS])  # added in transit
    assert verifier.verify_with_facts(bare, body, m, None).name == "client.acme"  # an older client: no facts


def test_a_hand_written_submission_may_state_its_limits_as_the_body_does(keys):
    """What ``examples/submit_with_nats_py.py`` sends: ``{}`` for limits it does not set means the
    defaults, as its body does (a client need not spell out every default)."""
    client, verifier = keys.signer("client.acme"), keys.verifier()
    body = b'{"type":"task.submitted","tenant":"acme","task_id":"t1","goal":"g"}'
    m = TaskSubmitted.model_validate_json(body)
    told = '{"labels":{},"limits":{}}'
    token = client.token(tenant="acme", msg_type=m.type, body=body, msg_id="m-1", facts=told)
    assert verifier.verify_with_facts(token, body, m, told).name == "client.acme"
    assert mf.disagree('{"labels":{},"limits":{"deadline_s":30}}', m) == "limits"
    assert mf.disagree("not json", m) == "unreadable"
    assert "fct" in json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


def test_an_envelope_is_believed_without_its_body_and_only_with_its_own_facts(keys):
    verifier = keys.verifier()
    m = ToolRequested(**T, step_id="s1", call_id="c1", tool="http_get", arguments={"url": SECRET})
    headers = env.headers_for(keys.signer("worker"), m, m.to_bytes(), "m-1")
    who, told = verifier.verify_envelope(headers[env.IDENTITY], headers[env.FACTS], ToolRequested, "acme")
    assert who.name == "worker" and told["call"] == "c1" and told["step"] == "s1"
    with pytest.raises(IdentityError, match="does not match"):
        verifier.verify_envelope(headers[env.IDENTITY], headers[env.FACTS].replace("c1", "c2"), ToolRequested, "acme")
    with pytest.raises(IdentityError, match="tenant"):
        verifier.verify_envelope(headers[env.IDENTITY], headers[env.FACTS], ToolRequested, "globex")
    with pytest.raises(IdentityError, match="may not produce"):
        forged = env.headers_for(keys.signer("planner"), m, m.to_bytes(), "m-1")
        verifier.verify_envelope(forged[env.IDENTITY], forged[env.FACTS], ToolRequested, "acme")
    bare = keys.signer("worker").token(tenant="acme", msg_type=m.type, body=m.to_bytes(), msg_id="m-1")
    assert verifier.verify_envelope(bare, None, ToolRequested, "acme")[1] == {}


def test_the_monitor_trips_on_envelopes_as_it_does_on_whole_messages(keys):
    """A tool loop seen through envelopes (keyed signatures, no arguments) is the same loop."""
    worker, verifier = keys.signer("worker"), keys.verifier()
    by_envelope, by_message = Monitor(Rules(loop_repeats=3)), Monitor(Rules(loop_repeats=3))
    trips: tuple[list[str], list[str]] = ([], [])
    for i in range(3):
        m = ToolRequested(**T, step_id="s1", call_id=f"c{i}", tool="http_get", arguments={"url": SECRET})
        headers = env.headers_for(worker, m, m.to_bytes(), f"m-{i}")
        _, told = verifier.verify_envelope(headers[env.IDENTITY], headers[env.FACTS], ToolRequested, "acme")
        trips[0].extend(t.kind for t in by_envelope.observe(Seen(m.type, "acme", "t1", told), float(i)))
        trips[1].extend(t.kind for t in by_message.observe(m, float(i)))
    assert trips == (["loop"], ["loop"])
