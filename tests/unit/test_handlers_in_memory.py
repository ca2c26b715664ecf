"""Service handlers on the in-memory bus (``mesh_testing.inmemory``): the production pipeline,
no server, fast.

The same behaviours run against a real nats-server in tests/integration and tests/e2e.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_contracts.v1 import CheckRequested, Citation, RetrievalRequested, ToolCompleted, ToolRequested
from mesh_host import Mesh
from mesh_identity import Signer, new_signing_key
from mesh_kit import ServiceSettings
from mesh_kit import envelope as env
from mesh_testing.inmemory import InMemoryBus

pytestmark = pytest.mark.unit


def _mesh(keys, service: str) -> Mesh:
    settings = ServiceSettings(
        service=service, signing_key_file=Path("unused"), trust_bundle_file=Path("unused"), strict_contracts=True
    )  # fmt: skip
    return Mesh(settings, signer=keys.signer(service), verifier=keys.verifier())


def _headers(signer: Signer, model, body: bytes | None = None) -> dict[str, str]:
    body = body or model.to_bytes()
    msg_id = f"m-{model.tenant}"  # one message each: the bus, like the server, stores an id once
    return {
        env.IDENTITY: signer.token(tenant=model.tenant, msg_type=model.type, body=body, msg_id=msg_id),
        env.MSG_ID: msg_id,
        env.SCHEMA: model.schema_id(),
    }


async def test_tool_executor_answers_with_a_signed_result(keys):
    from mesh_tool_executor.service import ToolExecutor

    mesh = _mesh(keys, "tool-executor")
    ToolExecutor(mesh).register()
    bus = InMemoryBus(mesh)
    out = bus.capture("tool.v1.*.*.completed")
    req = ToolRequested(
        tenant="acme",
        task_id="t1",
        step_id="s2",
        call_id="s2-a1-i0-c0",
        tool="calculator",
        arguments={"expression": "17 * 23"},
    )
    async with bus:
        await bus.publish(req.to_bytes(), req.subject(), headers=_headers(keys.signer("worker"), req))
    body, headers = out[0]
    assert body["ok"] is True and body["result"] == "391" and body["call_id"] == "s2-a1-i0-c0"
    assert headers[env.MSG_ID] == "tool.completed:acme:t1:s2-a1-i0-c0", "deterministic id: re-runs dedupe"
    # the result carries the tool-executor's own verifiable identity over the exact body bytes
    from mesh_contracts import parse_message

    model = parse_message("tool.v1.acme.t1.completed", model_bytes := ToolCompleted.model_validate(body).to_bytes())
    assert keys.verifier().verify(headers[env.IDENTITY], model_bytes, model).name == "tool-executor"


async def test_a_failing_tool_is_an_observation_not_a_crash(keys):
    from mesh_tool_executor.service import ToolExecutor

    mesh = _mesh(keys, "tool-executor")
    ToolExecutor(mesh).register()
    bus = InMemoryBus(mesh)
    out = bus.capture("tool.v1.*.*.completed")
    req = ToolRequested(
        tenant="acme", task_id="t1", step_id="s2", call_id="c1", tool="calculator", arguments={"expression": "1/0"}
    )
    async with bus:
        await bus.publish(req.to_bytes(), req.subject(), headers=_headers(keys.signer("worker"), req))
    assert out[0][0]["ok"] is False and out[0][0]["error"] == "division by zero"


@pytest.mark.parametrize("attack", ["forged", "altered", "wrong_producer", "missing"])
async def test_untrusted_messages_are_dead_lettered_and_never_handled(keys, attack):
    from mesh_tool_executor.service import ToolExecutor

    mesh = _mesh(keys, "tool-executor")
    ToolExecutor(mesh).register()
    bus = InMemoryBus(mesh)
    results = bus.capture("tool.v1.*.*.completed")
    dlq = bus.capture("dlq.>")
    req = ToolRequested(
        tenant="acme", task_id="t1", step_id="s2", call_id="c1", tool="calculator", arguments={"expression": "2+2"}
    )
    body = req.to_bytes()
    headers = {
        "forged": _headers(Signer("worker", new_signing_key()), req),
        "altered": _headers(keys.signer("worker"), req),
        "wrong_producer": _headers(keys.signer("planner"), req),
        "missing": {env.MSG_ID: "m-1"},
    }[attack]
    if attack == "altered":
        body = body.replace(b"2+2", b"9**9")
    async with bus:
        await bus.publish(body, req.subject(), headers=headers)
    assert results == [], "an untrusted request must not run the tool"
    ((dead_body, dead_headers),) = dlq
    assert dead_headers[env.DLQ_KIND] == "rejected"
    assert dead_headers[env.DLQ_SUBJECT] == "tool.v1.acme.t1.requested"
    assert dead_headers[env.DLQ_REASON].startswith("identity: ")
    expected = {
        "forged": "signature invalid",
        "altered": "digest",
        "wrong_producer": "planner may not produce",
        "missing": "missing",
    }[attack]
    assert expected in dead_headers[env.DLQ_REASON]
    assert dead_body["call_id"] == "c1", "the original body is kept for inspection and re-drive"


async def test_checker_verdict_names_failed_checks(keys):
    from mesh_checker.service import Checker
    from mesh_contracts.v1 import RetrievalCompleted, RetrievalHit, SignedRecord, StepResult

    hit = RetrievalHit(
        doc_id="x.md", version="v", chunk_id="1", chunk_hash="h", score=1.0, text="Call us on 555-123-4567 any time."
    )
    found = RetrievalCompleted(tenant="acme", task_id="t1", step_id="s1", call_id="c1", hits=(hit,))
    token = _headers(keys.signer("rag"), found)[env.IDENTITY]
    record = SignedRecord(body=found.to_bytes().decode(), token=token)

    mesh = _mesh(keys, "checker")
    Checker(mesh).register()  # the passages come from the request's records, verified as rag's
    bus = InMemoryBus(mesh)
    out = bus.capture("check.v1.*.*.verdict")
    req = CheckRequested(
        tenant="acme",
        task_id="t1",
        goal="g",
        answer="Call us on 555-123-4567 any time. [x.md#1]",
        citations=(Citation(doc_id="x.md", version="v", chunk_id="1", chunk_hash="h"),),
        steps=(StepResult(step_id="s1", output="Call us on 555-123-4567 any time.", retrievals=(record,)),),
        answer_step="s1",
    )
    async with bus:
        await bus.publish(req.to_bytes(), req.subject(), headers=_headers(keys.signer("planner"), req))
    verdict = out[0][0]
    assert verdict["passed"] is False
    assert [c["name"] for c in verdict["checks"] if not c["passed"]] == ["no_pii"]


async def test_rag_answers_only_from_the_requesting_tenants_index(keys):
    from mesh_rag.embed import Embedder
    from mesh_rag.service import Rag
    from mesh_rag.store import Store
    from mesh_testing.memkv import MemoryKV

    mesh = _mesh(keys, "rag")
    rag = Rag(mesh, embedder=Embedder.load())
    rag.store = Store(MemoryKV())  # what start() binds to the rag bucket
    await rag._seed("acme")  # the sample documentation, into acme's index only
    mesh.consume(RetrievalRequested, rag.on_request)
    bus = InMemoryBus(mesh)
    out = bus.capture("rag.v1.*.*.completed")
    async with bus:
        for tenant in ("acme", "globex"):
            req = RetrievalRequested(tenant=tenant, task_id="t1", step_id="s1", call_id="c1", query="identity token")
            await bus.publish(req.to_bytes(), req.subject(), headers=_headers(keys.signer("worker"), req))
    by_tenant = {b["tenant"]: b for b, _ in out}
    assert by_tenant["acme"]["hits"][0]["doc_id"] == "identity.md"
    assert by_tenant["globex"]["hits"] == [], "globex has no documents: it must not see acme's"
    hit = by_tenant["acme"]["hits"][0]
    assert hit["version"] and len(hit["chunk_hash"]) == 64 and hit["untrusted"] is True, "provenance on every hit"


async def test_contract_violation_is_dead_lettered_with_a_readable_reason(keys):
    from mesh_tool_executor.service import ToolExecutor

    mesh = _mesh(keys, "tool-executor")
    ToolExecutor(mesh).register()
    bus = InMemoryBus(mesh)
    dlq = bus.capture("dlq.>")
    async with bus:
        await bus.publish(b'{"type": "tool.requested", "tenant": "acme"}', "tool.v1.acme.t1.requested")
    reason = dlq[0][1][env.DLQ_REASON]
    assert reason.startswith("contract: invalid tool.requested:") and "task_id: Field required" in reason


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        (None, "header Mesh-Schema is missing: this message is a tool.requested/v1"),
        ("tool.requested/v2", "header Mesh-Schema is 'tool.requested/v2', this message is a tool.requested/v1"),
        ("plan.created/v1", "header Mesh-Schema is 'plan.created/v1', this message is a tool.requested/v1"),
    ],
)
async def test_a_message_whose_mesh_schema_header_names_another_contract_is_dead_lettered(keys, schema, says):
    """Signed by its rightful producer and valid as a body, but its ``Mesh-Schema`` header is
    missing or names another contract or version: a client reading the header would take it for
    something else, so it is not handled; the dead letter says what it had to be."""
    from mesh_tool_executor.service import ToolExecutor

    mesh = _mesh(keys, "tool-executor")
    ToolExecutor(mesh).register()
    bus = InMemoryBus(mesh)
    results = bus.capture("tool.v1.*.*.completed")
    dlq = bus.capture("dlq.>")
    req = ToolRequested(
        tenant="acme", task_id="t1", step_id="s2", call_id="c1", tool="calculator", arguments={"expression": "2+2"}
    )
    headers = _headers(keys.signer("worker"), req)
    if schema is None:
        del headers[env.SCHEMA]
    else:
        headers[env.SCHEMA] = schema
    async with bus:
        await bus.publish(req.to_bytes(), req.subject(), headers=headers)
    assert results == []
    ((_, dead_headers),) = dlq
    assert dead_headers[env.DLQ_KIND] == "rejected" and dead_headers[env.DLQ_REASON] == f"contract: {says}"
