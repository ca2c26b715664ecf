"""Identity tokens: only an untampered message from a declared producer is believed."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_contracts.v1 import StepCompleted, StepRequested, TaskSubmitted
from mesh_identity import IdentityError, Signer, body_digest, new_signing_key

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


def test_a_tenants_approver_decides_for_that_tenant_only(keys):
    from mesh_contracts.v1 import ApprovalDecided

    def decision(tenant):
        return ApprovalDecided(tenant=tenant, task_id="t1", approval_id="ap-1", approved=True,
                               decided_by="approver.acme.alice")  # fmt: skip

    mine, theirs = decision("acme"), decision("globex")
    assert keys.verifier().verify(_token(keys, "approver.acme.alice", mine), mine.to_bytes(), mine).tenant == "acme"
    with pytest.raises(IdentityError, match=r"approver\.acme\.alice may speak only for tenant 'acme', not 'globex'"):
        keys.verifier().verify(_token(keys, "approver.acme.alice", theirs), theirs.to_bytes(), theirs)
    # the console's own approver is bound to no tenant
    assert keys.verifier().verify(_token(keys, "approver", theirs), theirs.to_bytes(), theirs).name == "approver"


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


def test_a_token_is_valid_for_the_message_id_it_was_issued_for_only(keys):
    m = _step()
    token = _token(keys, "planner", m, msg_id="step.requested:acme:t1:s1:1")
    assert keys.verifier().verify(token, m.to_bytes(), m, msg_id="step.requested:acme:t1:s1:1").name == "planner"
    with pytest.raises(IdentityError, match=r"issued for message id 'step\.requested:acme:t1:s1:1', not 'x'"):
        keys.verifier().verify(token, m.to_bytes(), m, msg_id="x")


def test_a_token_that_would_outlive_the_deduplication_window_is_refused(keys):
    m = _step()
    long_lived = Signer("planner", keys.private["planner"], ttl_s=3600).token(
        tenant="acme", msg_type=m.type, body=m.to_bytes()
    )
    with pytest.raises(IdentityError, match="valid for 3600s, over the 540s"):
        keys.verifier().verify(long_lived, m.to_bytes(), m)


def test_only_an_operators_statement_for_exactly_this_message_redrives_it(keys):
    from mesh_identity import Redrive, TrustBundle, Verifier

    operator_key = new_signing_key()
    entries = {n: (p.role, p.tenant, p.public_key) for n, p in keys.bundle.principals.items()}
    verifier = Verifier(TrustBundle.from_json(TrustBundle.to_json({**entries, "admin": ("admin", None,
                                                                                         operator_key.public_key())})))  # fmt: skip
    body, now = b'{"x":1}', time.time()

    def statement(signer: Signer, **kw) -> str:
        args = dict(subject="task.v1.acme.t1.submitted", body=body, dlq_seq=7, original_stored_at=now - 86400,
                    original_msg_id="task.submitted:acme:t1:1", msg_id="redrive:7")  # fmt: skip
        return signer.redrive(**{**args, **kw})

    admin = Signer("admin", operator_key)
    ok = verifier.redrive(statement(admin), subject="task.v1.acme.t1.submitted", body=body, msg_id="redrive:7", at=now)
    assert ok == Redrive("admin", pytest.approx(now - 86400), "task.submitted:acme:t1:1", 7)
    cases = {
        "without an operator's signed re-drive statement": (None, {}),
        "client.acme may not re-drive": (statement(keys.signer("client.acme")), {}),
        "is for another message": (statement(admin, body=b"{}"), {}),
        "is for another message ": (statement(admin), {"msg_id": "redrive:8"}),
        "not valid at the time": (statement(admin, now=now - 3600), {}),
        "signature invalid": (statement(Signer("admin", new_signing_key())), {}),
    }
    for why, (token, override) in cases.items():
        args = {"subject": "task.v1.acme.t1.submitted", "body": body, "msg_id": "redrive:7", "at": now, **override}
        with pytest.raises(IdentityError, match=why.strip()):
            verifier.redrive(token, **args)


def test_no_token_outlives_the_streams_deduplication_window():
    """The replay argument rests on this: a token valid longer than the window (plus clock
    leeway) could be replayed under its own id once the server has forgotten the id."""
    from mesh_identity import CLOCK_LEEWAY_S, DEFAULT_TTL_S, MAX_TOKEN_LIFETIME_S
    from meshctl.provision import DEDUP_WINDOW_S

    assert DEFAULT_TTL_S <= MAX_TOKEN_LIFETIME_S
    assert MAX_TOKEN_LIFETIME_S + 2 * CLOCK_LEEWAY_S < DEDUP_WINDOW_S


# --- the libsodium path and PyJWT agree -----------------------------------------------------


def _verdict(verifier, token, body, model, at=None):
    try:
        return verifier.verify(token, body, model, at=at).name
    except IdentityError:
        return "refused"


def _both(keys):
    fast, slow = keys.verifier(), keys.verifier()
    slow.fast = False
    return fast, slow


def test_our_tokens_are_standard_jwts_and_pyjwts_take_the_fast_path(keys):
    import jwt

    m = _step()
    token = _token(keys, "planner", m, msg_id="m-1")
    claims = jwt.decode(token, keys.private["planner"].public_key(), algorithms=["EdDSA"])
    assert claims["iss"] == "planner" and claims["typ"] == m.type and claims["mid"] == "m-1"
    assert jwt.get_unverified_header(token)["kid"] == "planner"
    theirs = jwt.encode(claims, keys.private["planner"], algorithm="EdDSA", headers={"kid": "planner"})
    verifier = keys.verifier()
    assert verifier._fast_decode(theirs, ["iss", "dig"], "identity token", None) is not None
    assert verifier.verify(theirs, m.to_bytes(), m).name == "planner"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_tampered_token_gets_the_same_verdict_on_both_paths(keys, data):
    m = _step()
    body = m.to_bytes()
    token = _token(keys, "planner", m)
    kind = data.draw(st.sampled_from(["flip", "cut", "splice", "segments"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(token) - 1))
        c = data.draw(st.sampled_from("AZaz09-_.=+/ \x00é"))
        token = token[:i] + c + token[i + 1 :]
    elif kind == "cut":
        token = token[: data.draw(st.integers(0, len(token)))]
    elif kind == "splice":  # another principal's header or signature on this payload
        other = _token(keys, data.draw(st.sampled_from(["worker", "client.acme", "approver"])), m)
        part = data.draw(st.integers(0, 2))
        segs, others = token.split("."), other.split(".")
        segs[part] = others[part]
        token = ".".join(segs)
    else:
        token = ".".join(data.draw(st.lists(st.sampled_from([*token.split("."), "", "e30", "!!"]), max_size=5)))
    fast, slow = _both(keys)
    assert _verdict(fast, token, body, m) == _verdict(slow, token, body, m)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    extra=st.dictionaries(
        st.sampled_from(["nbf", "aud", "sub", "jti", "iss", "ten", "dig", "crit"]),
        st.one_of(st.none(), st.integers(-(10**10), 10**10), st.text(max_size=8), st.lists(st.text(max_size=3))),
    ),
    header=st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "b64"]),
        st.sampled_from(["EdDSA", "HS256", "none", "planner", "worker", 7, None, False, ["b64"]]),
    ),
)
def test_any_claims_and_header_signed_with_a_real_key_get_the_same_verdict(keys, extra, header):
    import jwt

    m = _step()
    body = m.to_bytes()
    now = int(time.time())
    claims = {"iss": "planner", "ten": "acme", "typ": m.type, "dig": body_digest(body), "mid": "",
              "iat": now, "exp": now + 60} | extra  # fmt: skip
    try:
        token = jwt.encode(claims, keys.private["planner"], algorithm="EdDSA", headers={"kid": "planner"} | header)
    except (jwt.PyJWTError, TypeError, ValueError, NotImplementedError):
        return  # not a token PyJWT will make
    fast, slow = _both(keys)
    assert _verdict(fast, token, body, m) == _verdict(slow, token, body, m)


# --- a token checked once is not checked again, unless what vouched for it changed ------------


def test_a_message_read_twice_in_one_process_has_its_signature_checked_once(keys, monkeypatch):
    from nacl.signing import VerifyKey

    m = _step()
    token, body = _token(keys, "planner", m), m.to_bytes()
    verifier = keys.verifier()
    checks = []
    real = VerifyKey.verify
    monkeypatch.setattr(VerifyKey, "verify", lambda self, *a: checks.append(1) or real(self, *a))
    assert verifier.verify(token, body, m).name == "planner"
    assert verifier.verify(token, body, m).name == "planner"
    assert len(checks) == 1
    altered = m.model_copy(update={"attempt": 2})  # every claim is still held to the message
    with pytest.raises(IdentityError, match="digest"):
        verifier.verify(token, altered.to_bytes(), altered)
    with pytest.raises(IdentityError, match="message id"):
        verifier.verify(token, body, m, msg_id="another")


def test_a_remembered_token_is_refused_once_its_key_is_retired_or_its_principal_revoked(keys):
    from mesh_identity import CLOCK_LEEWAY_S, Key, Principal, TrustBundle

    m = _step()
    signed_at = time.time() - 20 * CLOCK_LEEWAY_S
    token, body = _token(keys, "planner", m, now=signed_at), m.to_bytes()
    verifier = keys.verifier()
    verifier.verify(token, body, m)
    planner = keys.bundle.principals["planner"]
    retired_at = signed_at + 10 * CLOCK_LEEWAY_S
    rotated = Principal(planner.name, planner.role, planner.tenant, new_signing_key().public_key(),
                        (Key(planner.public_key, retired_at), Key(new_signing_key().public_key())))  # fmt: skip
    verifier.bundle = TrustBundle({**keys.bundle.principals, "planner": rotated})
    with pytest.raises(IdentityError, match="retired"):  # signed after its key was retired
        verifier.verify(token, body, m)
    assert verifier.verify(token, body, m, at=signed_at + 1).name == "planner", "stored before: still believed"
    verifier.bundle = TrustBundle({n: p for n, p in keys.bundle.principals.items() if n != "planner"})
    with pytest.raises(IdentityError, match="unknown principal"):
        verifier.verify(token, body, m)
