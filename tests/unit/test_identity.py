"""Identity tokens: only an untampered message from a declared producer is believed."""

from __future__ import annotations

import time

import pytest

from mesh_contracts.v1 import StepCompleted, StepRequested, TaskSubmitted
from mesh_kit.identity import IdentityError, Signer, new_signing_key

pytestmark = pytest.mark.unit


def _step():
    return StepRequested(tenant="acme", task_id="t1", step={"step_id": "s1", "instruction": "do it"})


def _token(keys, principal, model, body=None, **kw):
    return keys.signer(principal).token(tenant=model.tenant, msg_type=model.type, body=body or model.to_bytes(), **kw)


def test_declared_producer_is_accepted(keys):
    m = _step()
    p = keys.verifier().verify(_token(keys, "planner", m), m.to_bytes(), m)
    assert p.name == "planner"


def test_missing_token(keys):
    m = _step()
    with pytest.raises(IdentityError, match="missing"):
        keys.verifier().verify(None, m.to_bytes(), m)


def test_forged_token_signed_with_a_key_outside_the_bundle(keys):
    m = _step()
    forged = Signer("planner", new_signing_key()).token(tenant="acme", msg_type=m.type, body=m.to_bytes())
    with pytest.raises(IdentityError, match="signature invalid"):
        keys.verifier().verify(forged, m.to_bytes(), m)


def test_altered_body(keys):
    m = _step()
    token = _token(keys, "planner", m)
    altered = m.model_copy(update={"attempt": 2})
    with pytest.raises(IdentityError, match="digest"):
        keys.verifier().verify(token, altered.to_bytes(), altered)


def test_service_not_declared_as_producer(keys):
    m = _step()  # only the planner may produce step.requested
    with pytest.raises(IdentityError, match=r"worker may not produce step\.requested"):
        keys.verifier().verify(_token(keys, "worker", m), m.to_bytes(), m)


def test_client_may_speak_only_for_its_own_tenant(keys):
    m = TaskSubmitted(tenant="globex", task_id="t1", goal="x")
    with pytest.raises(IdentityError, match="only for tenant 'acme'"):
        keys.verifier().verify(_token(keys, "client.acme", m), m.to_bytes(), m)
    assert keys.verifier().verify(_token(keys, "client.globex", m), m.to_bytes(), m).tenant == "globex"


def test_expiry_is_judged_at_the_time_the_broker_stored_the_message(keys):
    m = _step()
    issued = time.time() - 3600
    token = _token(keys, "planner", m, now=issued)
    # stored while valid, consumed an hour later: a backlog after an outage stays valid
    assert keys.verifier().verify(token, m.to_bytes(), m, at=issued + 10).name == "planner"
    # stored long after expiry: a replayed capture
    with pytest.raises(IdentityError, match="expired"):
        keys.verifier().verify(token, m.to_bytes(), m, at=time.time())


def test_token_for_another_type_or_tenant_is_refused(keys):
    m = StepCompleted(tenant="acme", task_id="t1", step_id="s1", output="x")
    token = keys.signer("worker").token(tenant="acme", msg_type="step.failed", body=m.to_bytes())
    with pytest.raises(IdentityError, match=r"issued for step\.failed"):
        keys.verifier().verify(token, m.to_bytes(), m)
    token = keys.signer("worker").token(tenant="globex", msg_type=m.type, body=m.to_bytes())
    with pytest.raises(IdentityError, match="tenant 'globex'"):
        keys.verifier().verify(token, m.to_bytes(), m)


def test_unknown_principal_and_garbage(keys):
    m = _step()
    stranger = Signer("mallory", new_signing_key()).token(tenant="acme", msg_type=m.type, body=m.to_bytes())
    with pytest.raises(IdentityError, match="unknown principal 'mallory'"):
        keys.verifier().verify(stranger, m.to_bytes(), m)
    with pytest.raises(IdentityError, match="unreadable"):
        keys.verifier().verify("not-a-jwt", m.to_bytes(), m)


def test_issued_in_the_future(keys):
    m = _step()
    token = _token(keys, "planner", m, now=time.time() + 600)
    with pytest.raises(IdentityError, match="future"):
        keys.verifier().verify(token, m.to_bytes(), m)
