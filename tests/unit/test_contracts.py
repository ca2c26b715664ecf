"""Contracts: every example is a valid message; subjects, versions and ids behave."""

from __future__ import annotations

import json

import pytest

from mesh_contracts import ContractError, contract_for_subject, parse_message
from mesh_contracts import topology as topo
from mesh_contracts.registry import VERSIONS
from mesh_contracts.v1 import ALL, TaskSubmitted

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.type_name())
def test_every_contract_documents_itself_and_its_examples_validate(cls):
    schema = cls.model_json_schema()
    assert cls.__doc__ and schema.get("description"), "model docstring must reach the schema"
    assert schema["properties"]["type"]["const"] == cls.type_name()
    examples = schema.get("examples") or []
    assert examples, f"{cls.__name__} has no example"
    for ex in examples:
        model = cls.parse(json.dumps(ex), strict=True)
        assert model.type == cls.type_name()
    assert cls.spec.producers, "every contract declares who may produce it"
    documented = [name for name, f in cls.model_fields.items() if f.description]
    assert len(documented) >= 1


def test_type_names_and_subjects_are_unique():
    types = [c.type_name() for cs in VERSIONS.values() for c in cs]
    assert len(types) == len(set(types))
    keys = [(c.spec.domain, c.spec.event) for c in ALL]
    assert len(keys) == len(set(keys))


def test_subject_round_trip():
    m = TaskSubmitted(tenant="acme", task_id="t-1", goal="hello")
    assert m.subject() == "task.v1.acme.t-1.submitted"
    assert parse_message(m.subject(), m.to_bytes()) == m
    assert contract_for_subject("task.v1.x.y.submitted") is TaskSubmitted


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "a b", "", "x" * 65])
def test_ids_that_would_escape_their_subject_token_are_refused(bad):
    with pytest.raises(ContractError):
        TaskSubmitted.parse(json.dumps({"tenant": bad, "task_id": "t", "goal": "g"}))


def test_unknown_version_names_the_versions_this_consumer_knows():
    m = TaskSubmitted(tenant="acme", task_id="t-1", goal="hello")
    with pytest.raises(
        ContractError, match=r"unknown contract version v7 for task.submitted \(this consumer knows v1\)"
    ):
        parse_message("task.v7.acme.t-1.submitted", m.to_bytes())


def test_body_must_agree_with_subject():
    m = TaskSubmitted(tenant="acme", task_id="t-1", goal="hello")
    with pytest.raises(ContractError, match="subject names globex"):
        parse_message("task.v1.globex.t-1.submitted", m.to_bytes())


def test_tolerant_in_production_strict_in_tests():
    data = json.dumps({"tenant": "acme", "task_id": "t", "goal": "g", "added_in_v1_3": True})
    assert TaskSubmitted.parse(data).model_extra == {"added_in_v1_3": True}
    with pytest.raises(ContractError, match="unknown field"):
        TaskSubmitted.parse(data, strict=True)


def test_malformed_json_gets_a_readable_reason():
    with pytest.raises(ContractError, match=r"decode: not JSON \(Expecting property name"):
        TaskSubmitted.parse(b"{not json")


def test_topology_gives_each_consumer_one_durable_per_contract_for_every_version():
    durables = topo.durables()
    assert len({d.name for d in durables}) == len(durables)
    for d in durables:
        assert d.service in d.contract.spec.consumers
        assert d.filter_subject.split(".")[1] == "*", "durables must see unknown versions to dead-letter them"
        assert d.stream == topo.STREAMS[d.contract.spec.domain]
