"""Every committed JSON Schema is usable by any validator: it declares its dialect (``$schema``,
2020-12), its ``x-*`` annotation keywords are the ones the vocabulary meta-schema declares
(``schemas/mesh-vocabulary.json``, what Ajv's strict mode is given), each schema is valid under
that meta-schema, and the example each contract carries is valid under its schema. (Ajv itself
compiles them all in the TypeScript client's tests.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from mesh_contracts.generate import ANNOTATIONS, DRAFT, SCHEMAS, VOCABULARY, VOCABULARY_ID, vocabulary

FILES = sorted(SCHEMAS.glob("v*/*.json"))
META = json.loads(VOCABULARY.read_text())


def _keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(_keys(v) for k, v in node.items() if k not in ("examples", "default", "const")))
    if isinstance(node, list):
        return set().union(*(_keys(v) for v in node))
    return set()


def test_the_vocabulary_file_is_the_generated_one() -> None:
    assert META == vocabulary()
    assert META["$id"] == VOCABULARY_ID
    assert sorted(META["properties"]) == sorted(ANNOTATIONS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_schema_declares_its_dialect_and_only_known_keywords(path: Path) -> None:
    schema = json.loads(path.read_text())
    assert schema["$schema"] == DRAFT
    extensions = {k for k in _keys(schema) if k.startswith("x-")}
    assert extensions <= set(ANNOTATIONS), f"undeclared: {sorted(extensions - set(ANNOTATIONS))}"
    Draft202012Validator.check_schema(schema)
    registry: Registry = Registry().with_resource(VOCABULARY_ID, Resource.from_contents(META, DRAFT202012))
    errors = list(Draft202012Validator(META, registry=registry).iter_errors(schema))
    assert not errors, [e.message for e in errors]


def test_a_malformed_annotation_is_caught_by_the_meta_schema() -> None:
    schema = json.loads((SCHEMAS / "v1" / "task.submitted.json").read_text())
    schema["x-transport"] = "carrier-pigeon"
    registry: Registry = Registry().with_resource(VOCABULARY_ID, Resource.from_contents(META, DRAFT202012))
    errors = list(Draft202012Validator(META, registry=registry).iter_errors(schema))
    assert [e.json_path for e in errors] == ["$['x-transport']"]


@pytest.mark.parametrize("path", [p for p in FILES if "examples" in json.loads(p.read_text())], ids=lambda p: p.name)
def test_each_example_is_valid_under_its_schema(path: Path) -> None:
    schema = json.loads(path.read_text())
    validator = Draft202012Validator(schema)
    for example in schema["examples"]:
        assert not list(validator.iter_errors(example)), example
