"""The breaking-change detector and the committed artifacts."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

from mesh_contracts import generate
from mesh_contracts.registry import VERSIONS
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
    registered = {f"{c.type_name().replace('.', '_')}_v{major}" for major, cs in VERSIONS.items() for c in cs}
    assert set(doc["components"]["messages"]) == registered, "one message per registered contract, no other"
    assert {"budget_status_v1", "budget_report_v1"} <= registered
    live = doc["channels"]["live_token_v1"]
    assert live["address"] == "live.v1.{tenant}.{task}.token" and live["x-transport"] == "core"
    assert live["x-stream"] is None, "streamed tokens are never stored"
    sends = [k for k, op in doc["operations"].items() if op["action"] == "send"]
    assert "client.send.task_submitted_v1" in sends
    assert "admin.send.budget_status_v1" in sends, "an operator asks the budget what it sees"
    assert doc["channels"]["task_submitted_v1"]["address"] == "task.v1.{tenant}.{task}.submitted"


def _git(cwd, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=ci", "-c", "user.email=ci@example.invalid", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def _check(clone) -> subprocess.CompletedProcess[str]:
    """``make contracts-check`` as CI runs it, in ``clone`` with that clone's own package."""
    env = {**os.environ, "PYTHONPATH": str(clone / "contracts")}
    return subprocess.run(
        [sys.executable, "-m", "mesh_contracts.generate", "check"], cwd=clone, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def breaking_repo(tmp_path_factory):
    """A clone of this repository whose newest commit removes ``TaskSubmitted.labels`` and
    regenerates the schemas: a breaking change that only the history shows."""
    try:
        top = generate._git_root()
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("not a git checkout (e.g. an sdist): nothing to clone")
    repo = tmp_path_factory.mktemp("contracts") / "full"
    _git(top, "clone", "-q", "--no-hardlinks", str(top), str(repo))
    task = repo / "contracts" / "mesh_contracts" / "v1" / "task.py"
    text = task.read_text()
    assert "    labels: dict[str, str] = {}\n" in text
    task.write_text(text.replace("    labels: dict[str, str] = {}\n", "", 1))
    env = {**os.environ, "PYTHONPATH": str(repo / "contracts")}
    subprocess.run([sys.executable, "-m", "mesh_contracts.generate", "write"], cwd=repo, env=env, check=True,
                   capture_output=True)  # fmt: skip
    _git(repo, "commit", "-qam", "drop labels (breaking)")
    return repo


def test_a_shallow_clone_fetches_the_history_and_still_sees_a_breaking_change(breaking_repo, tmp_path):
    shallow = tmp_path / "shallow"
    _git(tmp_path, "clone", "-q", "--depth", "1", f"file://{breaking_repo}", str(shallow))
    assert _git(shallow, "rev-parse", "--is-shallow-repository").strip() == "true"
    out = _check(shallow)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "fetched the history of a shallow clone" in out.stderr
    assert "breaking: v1/task.submitted.json vs " in out.stderr and "labels: property removed" in out.stderr
    assert _git(shallow, "rev-parse", "--is-shallow-repository").strip() == "false"


def test_a_shallow_clone_that_cannot_fetch_its_history_fails_and_says_why(breaking_repo, tmp_path):
    shallow = tmp_path / "shallow"
    _git(tmp_path, "clone", "-q", "--depth", "1", f"file://{breaking_repo}", str(shallow))
    _git(shallow, "remote", "set-url", "origin", str(tmp_path / "gone"))
    out = _check(shallow)
    assert out.returncode == 1
    assert "this clone is shallow and `git fetch --unshallow` failed" in out.stderr
    assert "fetch-depth: 0" in out.stderr


def test_the_full_history_sees_the_breaking_change_too(breaking_repo):
    out = _check(breaking_repo)
    assert out.returncode == 1 and "labels: property removed" in out.stderr
    assert "fetched" not in out.stderr
