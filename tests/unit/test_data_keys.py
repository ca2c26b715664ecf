"""Tenant content sealed at rest with per-tenant data keys (issue 42 item 2): the keyring, the
sealed form of messages and records, what a sealed value is bound to, and the statement of which
fields are sealed."""

from __future__ import annotations

import asyncio
import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_contracts import ContractError, parse_message, sealing
from mesh_contracts.registry import open_body
from mesh_contracts.v1 import (
    ALL,
    IngestRequested,
    PlanStep,
    StepRequested,
    TaskCompleted,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
)
from mesh_contracts.v1.records import TaskRecord
from mesh_contracts.v1.work import MAX_INGEST_B64
from mesh_identity.datakeys import Keyring, key_id, new_data_key, unwrap, wrap
from mesh_kit import envelope as env

KEK = bytes(range(32))
MARK = "zebra-quartz-7731"


def keyring(*tenants: str, kek: bytes = KEK) -> tuple[Keyring, dict[str, str]]:
    wrapped = {t: wrap(kek, t, new_data_key()) for t in tenants}
    return Keyring(kek, lambda: wrapped), wrapped


@pytest.fixture
def ring() -> typing.Iterator[tuple[Keyring, dict[str, str]]]:
    got = keyring("acme", "globex")
    sealing.install(got[0])
    yield got
    sealing.install(None)


def test_a_data_key_unwraps_only_with_its_deployment_key_and_for_its_tenant():
    dk = new_data_key()
    w = wrap(KEK, "acme", dk)
    assert w.startswith(key_id(dk) + ".") and unwrap(KEK, "acme", w) == dk
    with pytest.raises(sealing.SealError, match="does not unwrap with this deployment's data key"):
        unwrap(bytes(32), "acme", w)
    with pytest.raises(sealing.SealError, match="does not unwrap"):
        unwrap(KEK, "globex", w)  # a wrapped key moved to another tenant
    assert wrap(KEK, "acme", dk) != w, "each wrapping has its own nonce"


def test_a_sealed_message_hides_its_content_keeps_its_ids_and_opens_to_the_same_message(ring):
    m = TaskSubmitted(tenant="acme", task_id="t1", goal=f"find {MARK}", inputs={"q": MARK}, labels={"team": "x"})
    body = m.to_bytes()
    assert MARK.encode() not in body
    raw = json.loads(body)
    assert raw["tenant"] == "acme" and raw["task_id"] == "t1" and raw["labels"] == {"team": "x"}
    assert sealing.is_sealed(raw["goal"]) and sealing.is_sealed(raw["inputs"])
    assert parse_message(m.subject(), body) == m
    assert m.to_bytes() == body, "the same message seals to the same bytes (its token signs them)"


def test_an_empty_field_stays_as_it_is(ring):
    raw = json.loads(TaskCompleted(tenant="acme", task_id="t1", answer="a").to_bytes())
    assert raw["citations"] == [] and raw["checks"] == [] and sealing.is_sealed(raw["answer"])


def test_a_sealed_value_moved_to_another_task_does_not_open_and_a_field_beside_it_changes_nothing(ring):
    body = TaskSubmitted(tenant="acme", task_id="t1", goal=MARK).to_bytes()
    with pytest.raises(ContractError, match="does not open here: altered, or moved"):
        TaskSubmitted.parse(body.replace(b'"task_id":"t1"', b'"task_id":"t2"'))
    beside = body.replace(b'"type":"task.submitted"', b'"type":"task.submitted","x":1')
    assert TaskSubmitted.parse(beside).goal == MARK


def test_a_sealed_field_moved_to_another_tenant_or_field_does_not_open(ring):
    acme = json.loads(TaskSubmitted(tenant="acme", task_id="t1", goal=MARK).to_bytes())
    globex = json.loads(TaskSubmitted(tenant="globex", task_id="t1", goal="mine").to_bytes())
    globex["goal"] = acme["goal"]
    with pytest.raises(ContractError, match=r"of tenant 'globex', which this process does not hold"):
        TaskSubmitted.parse(json.dumps(globex))  # sealed with acme's key: not globex's
    call = json.loads(ToolRequested(tenant="acme", task_id="t1", step_id="s", call_id="c", tool="calc",
                                    arguments={"x": MARK}).to_bytes())  # fmt: skip
    step = json.loads(
        StepRequested(tenant="acme", task_id="t1", step=PlanStep(step_id="s", instruction="i")).to_bytes()
    )
    step["step"] = call["arguments"]
    with pytest.raises(ContractError, match="moved"):
        StepRequested.parse(json.dumps(step))


def test_without_the_tenants_key_a_sealed_body_is_refused_with_the_reason(ring):
    body = TaskSubmitted(tenant="acme", task_id="t1", goal=MARK).to_bytes()
    sealing.install(None)
    with pytest.raises(ContractError, match="holds no data keys"):
        TaskSubmitted.parse(body)
    sealing.install(keyring("acme")[0])  # acme's key now is another one (its old one destroyed)
    with pytest.raises(ContractError, match=r"which this process does not hold \(the tenant was erased"):
        TaskSubmitted.parse(body)


def test_a_tenant_without_a_data_key_gets_nothing_written(ring):
    with pytest.raises(sealing.SealError, match="'initech' has no data key"):
        TaskSubmitted(tenant="initech", task_id="t1", goal=MARK).to_bytes()


def test_a_clear_body_is_still_read(ring):
    """A client that seals nothing (one written before the keys) is read as it was."""
    clear = TaskSubmitted(tenant="acme", task_id="t1", goal=MARK).model_dump_json().encode()
    assert TaskSubmitted.parse(clear).goal == MARK


def test_a_record_is_sealed_bound_to_its_key(ring):
    rec = TaskRecord(tenant="acme", task_id="t1", goal=MARK, inputs={"a": MARK})
    data = rec.to_bytes("acme.t1")
    assert MARK.encode() not in data and b'"status":"planning"' in data
    assert TaskRecord.from_bytes(data, "acme.t1") == rec
    with pytest.raises(sealing.SealError, match="moved"):
        TaskRecord.from_bytes(data, "acme.t2")
    with pytest.raises(ValueError, match="needs the key"):
        rec.to_bytes()


def test_the_token_signs_the_sealed_bytes_and_verifies_without_a_key(ring, keys):
    m = TaskSubmitted(tenant="acme", task_id="t1", goal=MARK)
    body = m.to_bytes()
    headers = env.headers_for(keys.signer("client.acme"), m, body, "id-1")
    sealing.install(None)  # verification needs no data key
    assert keys.verifier().verify(headers[env.IDENTITY], body, m, msg_id="id-1").name == "client.acme"


def test_tools_that_show_messages_open_what_they_can_and_say_why_not(ring):
    m = TaskSubmitted(tenant="acme", task_id="t1", goal=MARK)
    body = m.to_bytes()
    assert open_body(m.subject(), body)["goal"] == MARK
    sealing.install(keyring("acme")[0])
    assert open_body(m.subject(), body)["goal"].startswith("(sealed: sealed with data key")


@settings(max_examples=60, deadline=None)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers(-(10**15), 10**15) | st.text(max_size=40),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
)
def test_any_json_value_of_a_sealed_field_comes_back_as_it_was(value):
    ring, _ = keyring("acme")
    sealing.install(ring)
    try:
        m = TaskSubmitted(tenant="acme", task_id="t1", goal="g", inputs={"v": value})
        assert TaskSubmitted.parse(m.to_bytes()).inputs == {"v": value}
    finally:
        sealing.install(None)


def test_the_largest_document_still_fits_its_message_sealed_and_reads_back(ring):
    m = IngestRequested(
        tenant="acme", task_id="t1", doc_id="d", media_type="text/plain", content_b64="A" * MAX_INGEST_B64
    )
    body = m.to_bytes()
    assert len(body) <= IngestRequested.spec.max_bytes
    assert IngestRequested.parse(body) == m, "a sealed field is bounded by its message's limit, not a smaller one"


def test_a_large_result_reads_back_from_the_message_and_from_the_ledger_record(ring):
    from mesh_durable.ledger import _done, _record

    page = "x" * 2_000_000  # a tool's web page: over 1 MB, within tool.completed's 4 MB
    m = ToolCompleted(tenant="acme", task_id="t1", step_id="s", call_id="c", tool="fetch", ok=True, result=page)
    assert ToolCompleted.parse(m.to_bytes()).result == page

    class KV:
        async def get(self, key):
            return type("Entry", (), {"value": _record(key, {"text": page})})()

    done = asyncio.run(_done(KV(), "tool-executor.acme.t1.c"))
    assert done is not None and done.result == {"text": page}


def test_the_statement_names_real_fields_and_every_free_text_field_of_a_tenant_is_sealed():
    """What is sealed is stated per field (``ContractSpec.sealed``); a field named like the tenant's
    content (a goal, an answer, arguments, a result...) that is not sealed fails here."""
    content = {"goal", "answer", "output", "arguments", "result", "query", "hits", "content_b64", "instruction",
               "inputs", "retrievals", "payload", "comment", "feedback"}  # fmt: skip
    for c in ALL:
        assert set(c.spec.sealed) <= set(c.model_fields), c.schema_id()
        if c.spec.transport in ("stream",) and c.type_name() not in ("audit.recorded",):
            missing = (content & set(c.model_fields)) - set(c.spec.sealed)
            assert not missing, f"{c.schema_id()}: {sorted(missing)} carry the tenant's content, unsealed"


def test_the_readme_states_every_sealed_field():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for c in ALL:
        if c.spec.sealed:
            row = f"| `{c.schema_id()}` | {', '.join(f'`{f}`' for f in c.spec.sealed)} |"
            assert row in readme, f"the README's data section does not state {c.schema_id()}'s sealed fields: {row}"
    fields = ", ".join(f"`{f}`" for f in TaskRecord.sealed)
    assert f"| task records (bucket `tasks`) | {fields} |" in readme


def test_each_bucket_names_what_its_writer_binds_its_values_to():
    from mesh_contracts.stored import SEALED_IN
    from mesh_contracts.v1.records import Evidence
    from mesh_rag.store import Manifest
    from mesh_tool_executor.approvals import ApprovalRecord
    from mesh_worker.checkpoint import StepRun

    writers = {
        "tasks": TaskRecord,
        "evidence": Evidence,
        "steps": StepRun,
        "approvals": ApprovalRecord,
        "rag": Manifest,
    }
    assert {b: c.seal_id() for b, c in writers.items()} == {b: SEALED_IN[b] for b in writers}
