"""The bounded decoder: every hostile body is a DecodeError with a readable reason, nothing else
ever escapes, and every consumer of the mesh dead-letters such a body on its first delivery
without the framework touching it (a test per consumer)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_contracts import BodyError, ContractError, parse_message
from mesh_contracts import topology as topo
from mesh_contracts.decode import DecodeError, DecodeLimits, decode, depth
from mesh_contracts.v1 import IngestRequested, TaskSubmitted
from mesh_host import Mesh
from mesh_kit import ServiceSettings
from mesh_kit import envelope as env
from mesh_testing.inmemory import InMemoryBus

pytestmark = pytest.mark.unit

OK = {"type": "task.submitted", "tenant": "acme", "task_id": "t1", "goal": "What is 6 * 7?"}
HOSTILE: dict[str, tuple[bytes, str]] = {
    "deep array": (b"[" * 5000 + b"]" * 5000, "decode: nesting deeper than 64"),
    "deep object": (b'{"a":' * 5000 + b"1" + b"}" * 5000, "decode: nesting deeper than 64"),
    "deep but parseable": (b'{"a":' + b"[" * 100 + b"]" * 100 + b"}", "decode: nesting deeper than 64"),
    "huge integer": (json.dumps({**OK, "limits": {"max_tokens": 1}}).encode().replace(b"1}", b"9" * 5001 + b"}"),
                     "decode: an integer of 5001 digits (at most 20)"),
    "invalid utf-8": (b'{"goal": "\xff\xfe"}', "decode: invalid UTF-8 at byte 10"),
    "NaN": (b'{"x": NaN}', "decode: NaN is not a JSON number"),
    "Infinity": (b'{"x": -Infinity}', "decode: -Infinity is not a JSON number"),
    "not json": (b"{not json", "decode: not JSON (Expecting property name"),
    "not an object": (b'["a", "b"]', "decode: the body is a JSON list, not an object"),
    "duplicate key": (b'{"tenant": "acme", "tenant": "globex"}', "decode: key 'tenant' appears twice in one object"),
    "oversized": (json.dumps({**OK, "goal": "x" * 300_000}).encode(), "decode: body 293 KB over the 256 KB limit"),
}  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_each_hostile_body_is_refused_with_its_reason(name):
    body, reason = HOSTILE[name]
    with pytest.raises(BodyError) as err:
        TaskSubmitted.parse(body)
    assert str(err.value).startswith(reason), str(err.value)
    assert isinstance(err.value, ContractError), "a contract error to every consumer"


def test_limits_are_per_contract_and_settings_can_only_lower_them():
    big = IngestRequested(tenant="acme", task_id="i1", doc_id="d.md", media_type="text/plain",
                          content_b64="QQ==" * 500_000).to_bytes()  # fmt: skip
    assert len(big) > 1_000_000 and IngestRequested.parse(big).doc_id == "d.md", "a document may be big"
    with pytest.raises(BodyError, match=r"over the 1.0 MB limit"):
        IngestRequested.parse(big, limits=DecodeLimits(max_bytes=1024 * 1024))
    with pytest.raises(BodyError, match="nesting deeper than 3"):
        TaskSubmitted.parse(json.dumps({**OK, "labels": {"a": "b"}, "policy": {"output_schema": {"x": [[]]}}}),
                            limits=DecodeLimits(max_depth=3))  # fmt: skip


def test_duplicate_keys_are_refused_where_tenants_write_and_tolerated_elsewhere():
    twice = b'{"type": "step.requested", "tenant": "acme", "task_id": "t1", "attempt": 1, "attempt": 2}'
    assert decode(twice, max_bytes=10_000, unique_keys=False)["attempt"] == 2
    assert TaskSubmitted.spec.unique_keys and not topo.STREAMS.get("x")
    assert parse_message("task.v1.acme.t1.submitted", json.dumps(OK).encode()).goal == OK["goal"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_no_input_makes_the_decoder_raise_anything_but_its_own_error(body):
    try:
        decode(body, max_bytes=1000, unique_keys=True)
    except DecodeError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=40))  # fmt: skip
def test_depth_is_measured_without_recursion_and_agrees_with_a_recursive_count(value):
    def recursive(v) -> int:
        children = list(v.values()) if isinstance(v, dict) else v if isinstance(v, list) else None
        return 0 if children is None else 1 + max((recursive(c) for c in children), default=0)

    assert depth(value) == recursive(value)


def _mesh(keys, service: str) -> Mesh:
    settings = ServiceSettings(
        service=service, signing_key_file="unused", trust_bundle_file="unused", strict_contracts=True
    )
    return Mesh(settings, signer=keys.signer(service), verifier=keys.verifier())


@pytest.mark.parametrize("durable", topo.durables(), ids=lambda d: d.name)
async def test_every_consumer_dead_letters_an_undecodable_body_on_its_first_delivery(keys, durable):
    """No way around the decoder: it is the first stage of every consumer's pipeline, so a body
    it refuses reaches no handler and is dead-lettered with the reason at once."""
    mesh = _mesh(keys, durable.service)
    handled: list[object] = []

    async def handler(m: object, d: object) -> None:
        handled.append(m)

    mesh.consume(durable.contract, handler)
    bus = InMemoryBus(mesh)
    dead_letters = bus.capture("dlq.>")  # the sink holds the hostile body too: it is never decoded as a contract
    subject = durable.contract.spec.subject("acme", "t1").replace(".v1.", f".v{durable.contract.spec.major}.")
    async with bus:
        for i, (body, _) in enumerate((HOSTILE["deep array"], HOSTILE["huge integer"], HOSTILE["invalid utf-8"])):
            await bus.publish(body, subject, headers={env.MSG_ID: f"m-{i}"})
    assert handled == []
    assert [outcome for *_, outcome in bus.outcomes] == ["rejected"] * 3, "TERMinated on the first delivery"
    dead = [h for _, h in dead_letters]
    assert [h[env.DLQ_REASON].split(" ")[0:2] for h in dead] == [["decode:", "nesting"], ["decode:", "an"],
                                                                 ["decode:", "invalid"]]  # fmt: skip
    assert all(h[env.DLQ_KIND] == "rejected" and h[env.DLQ_DELIVERIES] == "1" for h in dead)
