"""The breaking-change detector and the committed artifacts."""

from __future__ import annotations

import copy

import pytest

from mesh_contracts import generate
from mesh_contracts.v1 import StepRequested, TaskSubmitted

pytestmark = pytest.mark.unit


def _schema():
    return TaskSubmitted.model_json_schema()


def test_adding_an_optional_field_is_compatible():
    new = _schema()
    new["properties"]["priority"] = {"type": "integer", "default": 0}
    assert generate.breaking_changes(_schema(), new) == []


def test_removed_field_is_breaking():
    new = _schema()
    del new["properties"]["labels"]
    assert generate.breaking_changes(_schema(), new) == ["labels: property removed"]


def test_new_required_field_is_breaking():
    new = _schema()
    new["properties"]["owner"] = {"type": "string"}
    new["required"] = [*new["required"], "owner"]
    assert generate.breaking_changes(_schema(), new) == ["owner: became required"]


def test_changed_type_is_breaking_also_inside_nested_definitions():
    old = StepRequested.model_json_schema()
    new = copy.deepcopy(old)
    new["properties"]["attempt"] = {"type": "string"}
    new["$defs"]["PlanStep"]["properties"]["tools"] = {"type": "string"}
    problems = generate.breaking_changes(old, new)
    assert any(p.startswith("attempt: type changed") for p in problems)
    assert any(p.startswith("PlanStep.tools: type changed") for p in problems)


def test_committed_artifacts_match_the_models_and_history():
    assert generate.check() == 0, "run `make contracts` and commit the result"


def test_history_is_actually_consulted():
    """Regression: the git lookup once resolved paths from the wrong directory and compared nothing."""
    history = generate._history(generate.SCHEMAS / "v1" / "task.submitted.json")
    if not history:
        pytest.skip("not a git checkout with history (e.g. an sdist)")
    assert all("properties" in schema for _, schema in history)


def test_asyncapi_document_covers_every_contract_and_operation():
    doc = generate.asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    assert len(doc["components"]["messages"]) == 29
    live = doc["channels"]["live_token_v1"]
    assert live["address"] == "live.v1.{tenant}.{task}.token" and live["x-transport"] == "core"
    assert live["x-stream"] is None, "streamed tokens are never stored"
    sends = [k for k, op in doc["operations"].items() if op["action"] == "send"]
    assert "client.send.task_submitted_v1" in sends
    assert doc["channels"]["task_submitted_v1"]["address"] == "task.v1.{tenant}.{task}.submitted"
