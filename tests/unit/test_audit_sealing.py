"""The tenant's content in an audit link: sealed to its auditor key, the chain verifiable without it."""

from __future__ import annotations

import json
import time

import pytest
from nacl.public import PrivateKey

from mesh_contracts.v1.audit import GENESIS, SEALED_DETAIL
from mesh_durable import sealing
from mesh_durable.chain import digest, link, verify
from mesh_durable.tail import Stored
from mesh_identity import Principal, Signer, TrustBundle, Verifier, new_signing_key

pytestmark = pytest.mark.unit

DETAIL = {
    "tool": "send_email",
    "risk": "external",
    "call_id": "c1",
    "arguments": {"to": "dana@example.org", "body": "the quarterly numbers"},
    "reasons": ["destination dana@example.org offered by the goal"],
    "reason": "spend capped",
}


def test_content_fields_are_sealed_and_open_only_with_the_tenants_key():
    key = PrivateKey.generate()
    sealed = sealing.seal_detail(DETAIL, bytes(key.public_key))
    text = json.dumps(sealed)
    assert "dana@example.org" not in text and "quarterly" not in text and "spend capped" not in text
    assert {k for k, v in sealed.items() if sealing.is_sealed(v)} == {"arguments", "reasons", "reason"}
    assert {k: sealed[k] for k in ("tool", "risk", "call_id")} == {"tool": "send_email", "risk": "external",
                                                                     "call_id": "c1"}, "facts stay in clear"  # fmt: skip
    assert set(SEALED_DETAIL) >= {"arguments", "reasons", "reason", "error", "comment"}

    assert sealing.open_detail(sealed, sealing.opener(bytes(key))) == DETAIL, "values come back as they were"
    other = sealing.open_detail(sealed, sealing.opener(bytes(PrivateKey.generate())))
    assert other["arguments"] == sealing.UNREADABLE and other["tool"] == "send_email"
    assert sealing.open_detail(sealed, None)["reasons"] == sealing.CLOSED


def test_each_sealing_is_fresh_and_sealing_twice_changes_nothing():
    pub = bytes(PrivateKey.generate().public_key)
    a, b = sealing.seal_detail(DETAIL, pub), sealing.seal_detail(DETAIL, pub)
    assert a["arguments"] != b["arguments"], "an ephemeral key per value: equal values do not show as equal"
    assert sealing.seal_detail(a, pub) == a
    assert sealing.seal_detail({"tool": "x"}, pub) == {"tool": "x"}


def test_without_a_key_the_content_is_withheld_not_written_in_clear():
    withheld = sealing.seal_detail(DETAIL, None)
    assert "dana@example.org" not in json.dumps(withheld)
    assert withheld["arguments"] == {"sealed": ""}
    assert sealing.open_detail(withheld, sealing.opener(bytes(PrivateKey.generate())))["arguments"] == sealing.WITHHELD


def test_a_chain_of_sealed_links_verifies_by_its_hashes_with_no_key_at_hand():
    signer = Signer("tool-executor", new_signing_key())
    verifier = Verifier(
        TrustBundle({"tool-executor": Principal("tool-executor", "tool-executor", None, signer.public_key)})
    )
    key, t0 = PrivateKey.generate(), time.time()
    out, prev = [], GENESIS
    for n, detail in enumerate([DETAIL, {"ok": True, "error": "smtp said no to dana@example.org"}], start=1):
        model, body, headers = link(signer, "acme", "t1", n, prev, "tool.approved", f"k{n}", at=t0,
                                    detail=sealing.seal_detail(detail, bytes(key.public_key)))  # fmt: skip
        out.append(Stored(model.subject(), body, headers, seq=n, time=t0, pending=0))
        prev = digest(body)
    del key  # the erasure: nothing opens the content now
    v = verify("acme", out, verifier, [])
    assert v.ok and v.records == 2, v.reason
    assert b"dana@example.org" not in b"".join(s.data for s in out)
    # Sealed bytes are hashed like any others: altering one breaks the chain at that link.
    rec = json.loads(out[0].data)
    rec["detail"]["arguments"] = sealing.seal_detail({"arguments": "x"}, bytes(PrivateKey.generate().public_key))[
        "arguments"
    ]
    out[0] = Stored(out[0].subject, json.dumps(rec).encode(), out[0].headers, seq=1, time=t0, pending=0)
    assert not verify("acme", out, verifier, []).ok
