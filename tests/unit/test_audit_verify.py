"""``mesh_durable.chain.verify``: a whole chain passes; a record removed, altered, replayed, written
by a principal not allowed its kind, or a tail cut below an anchor is named at the first break."""

from __future__ import annotations

import json
import time

import pytest

from mesh_contracts.v1.audit import ANCHOR, ANCHOR_TTL_S, GENESIS
from mesh_durable.chain import Anchor, digest, link, verify
from mesh_durable.tail import Stored
from mesh_identity import Principal, Signer, TrustBundle, Verifier, new_signing_key

pytestmark = pytest.mark.unit

ROLES = ("tool-executor", "budget", "planner", "worker", "admin")
KINDS = ["tool.allowed", "budget.loop", "control.cancel", "tool.approved", "tool.blocked", "control.halt"]
WRITER = {"tool": "tool-executor", "budget": "budget", "control": "planner"}


@pytest.fixture(scope="module")
def keys() -> dict[str, Signer]:
    return {r: Signer(r, new_signing_key()) for r in ROLES}


@pytest.fixture(scope="module")
def verifier(keys) -> Verifier:
    return Verifier(TrustBundle({r: Principal(r, r, None, s.public_key) for r, s in keys.items()}))


def _chain(keys, size: int = 6, tenant: str = "acme", start: int = 1) -> list[Stored]:
    t0 = time.time()  # stored as they are signed (a token is judged at its record's stored time)
    out, prev = [], GENESIS if start == 1 else "ab" * 32
    for i in range(size):
        n = start + i
        kind = KINDS[i % len(KINDS)]
        model, body, headers = link(keys[WRITER[kind.split(".")[0]]], tenant, f"t{n}", n, prev, kind, f"k{n}", at=t0)
        out.append(Stored(model.subject(), body, headers, seq=10 + i, time=t0, pending=0))
        prev = digest(body)
    return out


def _anchor(keys, n: int, head: str, tenant: str = "acme", signer: str = "budget") -> Anchor:
    at = time.time()
    claims = {"ten": tenant, "n": n, "head": head, "seq": 0}
    return Anchor(keys[signer].statement(ANCHOR, claims, now=at, ttl_s=ANCHOR_TTL_S), at)


def test_a_whole_chain_passes_with_its_anchor(keys, verifier):
    chain = _chain(keys)
    v = verify(
        "acme", chain, verifier, [_anchor(keys, 6, digest(chain[-1].data)), _anchor(keys, 3, digest(chain[2].data))]
    )
    assert v.ok, v.reason
    assert (v.records, v.first, v.head.n, v.anchors) == (6, 1, 6, 2)
    assert v.kinds["tool.allowed"] == 1 and sum(v.kinds.values()) == 6


def test_a_removed_record_is_named(keys, verifier):
    chain = _chain(keys)
    v = verify("acme", chain[:3] + chain[4:], verifier)
    assert (v.broken_at, v.records) == (4, 3) and "record 4 missing: record 5 follows record 3" in v.reason
    v = verify("acme", chain[:1] + chain[4:], verifier)
    assert v.broken_at == 2 and "records 2 to 4 missing" in v.reason


def test_an_altered_record_fails_its_signature_and_a_re_signed_one_fails_the_chain(keys, verifier):
    chain = _chain(keys)
    s = chain[3]  # a "tool.approved" record: say "blocked" instead, keep the signed headers
    forged = Stored(s.subject, s.data.replace(b"tool.approved", b"tool.blocked"), s.headers, s.seq, s.time, 0)
    v = verify("acme", [*chain[:3], forged, *chain[4:]], verifier)
    assert v.broken_at == 4 and "digest" in v.reason, v.reason
    # The tool-executor's own key signs a different record 4: its signature holds, the chain does not.
    model, body, headers = link(keys["tool-executor"], "acme", "t4", 4, digest(chain[2].data), "tool.blocked", "k4")
    v = verify("acme", [*chain[:3], Stored(model.subject(), body, headers, 13, s.time, 0), *chain[4:]], verifier)
    assert v.broken_at == 4 and "altered or replaced" in v.reason, v.reason


def test_a_replayed_record_and_a_forged_start_are_breaks(keys, verifier):
    chain = _chain(keys)
    v = verify("acme", [*chain[:4], chain[1], *chain[4:]], verifier)
    assert v.broken_at == 2 and "appears again" in v.reason
    model, body, headers = link(keys["planner"], "acme", "t1", 1, "cd" * 32, "control.cancel", "k1")
    v = verify("acme", [Stored(model.subject(), body, headers, 1, time.time(), 0)], verifier)
    assert v.broken_at == 1 and "beginning" in v.reason


def test_a_principal_may_write_only_its_own_kinds(keys, verifier):
    chain = _chain(keys, 2)
    for signer, kind in (("worker", "tool.allowed"), ("planner", "tool.allowed"), ("tool-executor", "budget.loop")):
        model, body, headers = link(keys[signer], "acme", "t3", 3, digest(chain[-1].data), kind, "k3")
        v = verify("acme", [*chain, Stored(model.subject(), body, headers, 12, time.time(), 0)], verifier)
        assert v.broken_at == 3, (signer, kind, v.reason)
        assert "may not" in v.reason, v.reason  # the worker is no producer at all; the others not of this kind


def test_a_cut_tail_is_caught_by_the_anchor_and_a_forged_anchor_is_refused(keys, verifier):
    chain = _chain(keys)
    anchor = _anchor(keys, 6, digest(chain[-1].data))
    assert verify("acme", chain[:4], verifier).ok, "without an anchor a cut tail looks whole: why anchors exist"
    v = verify("acme", chain[:4], verifier, [anchor])
    assert v.broken_at == 5 and "tail was cut" in v.reason
    v = verify("acme", chain, verifier, [_anchor(keys, 6, digest(chain[0].data))])
    assert v.broken_at == 6 and "not the one the anchor" in v.reason
    v = verify("acme", chain, verifier, [_anchor(keys, 6, digest(chain[-1].data), signer="planner")])
    assert not v.ok and "may not sign" in v.reason
    v = verify("acme", chain, verifier, [_anchor(keys, 6, digest(chain[-1].data), tenant="globex")])
    assert not v.ok and "globex" in v.reason


def test_a_chain_whose_beginning_expired_is_whole_with_a_note(keys, verifier):
    chain = _chain(keys, 4, start=50)
    old_anchor = _anchor(keys, 20, "ef" * 32)  # vouches for a record no longer retained: not held
    v = verify("acme", chain, verifier, [old_anchor], stream_first_seq=1234)
    assert v.ok and v.first == 50 and v.anchors == 0
    assert "starts at record 50" in v.notes[0]


def test_a_missing_beginning_is_a_break_when_the_stream_has_lost_nothing_to_age(keys, verifier):
    """The admin re-creates the stream without the first records: the new stream still holds its
    first message, so nothing can have expired."""
    chain = _chain(keys, 4)
    v = verify("acme", chain[1:], verifier, stream_first_seq=1)
    assert v.broken_at == 1 and "record 1 missing: the chain starts at record 2" in v.reason
    v = verify("acme", chain[3:], verifier, stream_first_seq=1)
    assert v.broken_at == 1 and "records 1 to 3 missing" in v.reason
    assert verify("acme", chain, verifier, stream_first_seq=1).ok


def test_another_tenants_record_is_a_break(keys, verifier):
    chain = _chain(keys, 3)
    other = _chain(keys, 1, tenant="globex")[0]
    v = verify("acme", [*chain, other], verifier)
    assert v.broken_at == 1 and "globex" in v.reason


def test_a_head_kept_outside_the_mesh_is_held_like_an_anchor(keys, verifier):
    """``meshctl audit verify --anchor N:SHA256``: no signature needed, the operator kept it."""
    chain = _chain(keys)
    assert verify("acme", chain, verifier, pinned=(4, digest(chain[3].data))).ok
    v = verify("acme", chain[:3], verifier, pinned=(4, digest(chain[3].data)))
    assert v.broken_at == 4 and "before record 4, which --anchor vouches for" in v.reason
    v = verify("acme", chain, verifier, pinned=(4, digest(chain[2].data)))
    assert v.broken_at == 4 and "not the one --anchor vouches for" in v.reason


def test_records_older_than_their_stream_show_a_re_created_stream(keys, verifier):
    """The admin deletes the stream and puts every record back at once (within the tokens'
    lifetime, so each signature still verifies): nothing is missing, but the stream is younger
    than its records."""
    chain = _chain(keys, 4)
    written = json.loads(chain[0].data)["at"]
    assert verify("acme", chain, verifier, stream_created=written - 3600).ok, "a stream older than its records"
    assert verify("acme", chain, verifier, stream_created=written + 4).ok, "a writer's clock a little behind"
    v = verify("acme", chain, verifier, stream_created=written + 60)
    assert v.broken_at == 1 and "written 60 s before its stream was created" in v.reason
    assert "re-created and the record put back" in v.reason
