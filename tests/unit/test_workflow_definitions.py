"""Workflow definitions (issue 40, item 1): a DAG a tenant writes, validated strictly, named by its
content, shown as text and mermaid, diffed node by node; and the edge semantics a runtime follows
(``advance``): conditions choose branches, a branch not taken does not stop what joins after it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as hs

from mesh_contracts import generate
from mesh_contracts.v1.workflow import Condition, Retry, WorkflowDefinition
from mesh_contracts.v1.workflow_runs import advance
from meshctl import workflow as mw

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "workflows" / "refund.yaml"


def wf(*nodes: dict, **extra: object) -> dict:
    return {"name": "w", "nodes": list(nodes), **extra}


def agent(i: str, *after: object, **kw: object) -> dict:
    return {"id": i, "kind": "agent", "instruction": f"do {i}", "after": list(after), **kw}


def problems(document: dict) -> list[str]:
    with pytest.raises(mw.Invalid) as exc:
        mw.parse(document)
    return exc.value.problems


def test_the_example_validates_and_its_version_is_its_content():
    a = mw.load(EXAMPLE)
    assert a.name == "refund" and a.mode == "fixed" and a.answer_node() == "reply"
    assert a.order().index("decide") > max(a.order().index("policy"), a.order().index("order"))
    # The same content as JSON, keys in another order: the same version.
    doc = yaml.safe_load(EXAMPLE.read_text())
    shuffled = json.loads(json.dumps(dict(reversed(list(doc.items())))))
    assert mw.parse(shuffled).digest() == a.digest()
    # Defaults written out are the same definition; any real change is another version.
    assert mw.parse({**doc, "schema_version": 1, "mode": "fixed"}).digest() == a.digest()
    changed = json.loads(json.dumps(doc))
    changed["nodes"][2]["instruction"] += " Be brief."
    assert mw.parse(changed).digest() != a.digest()
    assert a.ref() == f"refund@{a.digest()}" and len(a.digest()) == 16


def test_the_json_schema_in_contracts_accepts_the_example_and_refuses_what_the_model_refuses():
    schema = json.loads((generate.SCHEMAS / "v1" / "workflow.definition.json").read_text())
    assert schema["$schema"].endswith("2020-12/schema") and not any(k.startswith("x-") for k in schema)
    check = jsonschema.Draft202012Validator(schema)
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert not list(check.iter_errors(doc))
    misspelt = json.loads(json.dumps(doc))
    misspelt["nodes"][1]["retires"] = 3
    assert list(check.iter_errors(misspelt)) and problems(misspelt)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (wf(agent("a", "b"), agent("b", "a")), "the graph has a cycle through a, b"),
        (wf(agent("a", "a")), "node 'a' runs after itself"),
        (wf(agent("a", "nope")), "node 'a' runs after 'nope', which is not a node"),
        (wf(agent("a"), agent("a")), "node id 'a' is used twice"),
        (wf(agent("a", retires=3)), "node 'a': retires: not a field of this (misspelt?)"),
        (wf({"id": "a", "kind": "robot"}), "node 'a': kind must be one of agent, tool, retrieve"),
        (wf({"id": "a", "instruction": "x"}), "node 'a': says no kind"),
        (
            wf(agent("a", instruction="use {{nodes.b.output}}"), agent("b")),
            "uses the output of 'b', which does not run",
        ),
        (
            wf(agent("a", instruction="{{inputs.who}}"), inputs={"properties": {"x": {}}}),
            "an input the workflow does not",
        ),
        (wf(agent("a", instruction="{{secrets.key}}")), "a template names inputs.<name> or nodes.<id>.output"),
        (wf(agent("a"), {"id": "c", "kind": "check", "of": "a"}), "check 'c' must run after 'a'"),
        (wf(agent("a", budget_share=0.7), agent("b", "a", budget_share=0.5)), "add up to 1.2, more than the whole"),
        (wf(agent("a"), agent("b")), "several nodes end the workflow (a, b): say which is its 'output'"),
        (wf(agent("a"), output="z"), "output 'z' is not a node"),
        (wf({"id": "t", "kind": "timer"}), "node 't': timer 't' waits either 'after_s' or 'until'"),
        (wf(agent("a", retry={"attempts": 0})), "node 'a': retry.attempts: Input should be greater than or equal to 1"),
        (wf(agent("a.b")), "node 'a.b': id: String should match pattern"),
        (
            wf(agent("a"), agent("b", {"node": "a", "when": {"status": "completed", "path": "x"}})),
            "either 'status' or a",
        ),
        ({"name": "w", "nodes": []}, "nodes: a workflow has at least one node"),
        ([1, 2], "a workflow definition is a mapping"),
    ],
)
def test_every_problem_is_named_with_its_node(document, expected):
    found = problems(document)  # type: ignore[arg-type]
    assert any(expected in p for p in found), found


def test_all_problems_at_once_and_only_for_the_kind_the_node_says():
    found = problems(wf(agent("a", retires=3), {"id": "b", "kind": "tool", "tool": "x", "argumnts": {}}))
    assert found == ["node 'a': retires: not a field of this (misspelt?)",
                     "node 'b': argumnts: not a field of this (misspelt?)"], found  # fmt: skip


def test_retry_backoff_is_exponential_and_capped():
    assert Retry(attempts=5, backoff_s=2, multiplier=3, max_backoff_s=30).delays() == [2, 6, 18, 30]
    assert Retry().delays() == []


@pytest.mark.parametrize(
    ("cond", "status", "output", "holds"),
    [
        ({"status": "approved"}, "approved", None, True),
        ({"status": "approved"}, "denied", None, False),
        ({"status": "failed", "op": "ne"}, "completed", None, True),
        ({"path": "amount", "op": "gt", "value": 100}, "completed", {"amount": 150}, True),
        ({"path": "amount", "op": "gt", "value": 100}, "completed", {"amount": 100}, False),
        ({"path": "amount", "op": "gt", "value": 100}, "completed", {"amount": "lots"}, False),  # across types
        ({"path": "amount", "op": "gt", "value": 100}, "completed", {}, False),  # missing
        ({"path": "a.b", "op": "eq", "value": "x"}, "completed", {"a": {"b": "x"}}, True),
        ({"path": "tags", "op": "contains", "value": "vip"}, "completed", {"tags": ["vip"]}, True),
        ({"path": "tier", "op": "in", "value": ["gold", "silver"]}, "completed", {"tier": "gold"}, True),
        ({"path": "refund", "op": "exists"}, "completed", {"refund": 0}, True),
        ({"path": "refund", "op": "exists", "value": False}, "completed", {}, True),
        ({"path": "", "op": "contains", "value": "yes"}, "completed", "yes, refund", True),
        ({"path": "x", "op": "ne", "value": 1}, "completed", "plain text", True),
    ],
)
def test_conditions_are_data_evaluated_without_code(cond, status, output, holds):
    assert Condition.model_validate(cond).holds(status, output) is holds


def test_the_example_takes_the_branch_its_conditions_choose():
    a = mw.load(EXAMPLE)
    ran = {"policy": ("completed", "p"), "order": ("completed", "o")}
    assert advance(a, {}) == (["policy", "order"], [])
    assert advance(a, ran) == (["decide"], [])
    small = {**ran, "decide": ("completed", {"amount": 50, "reason": "r"})}
    assert advance(a, small) == (["reply"], ["approve"]), "no approval under 100; the reply still runs"
    large = {**ran, "decide": ("completed", {"amount": 500, "reason": "r"})}
    assert advance(a, large) == (["approve"], [])
    assert advance(a, {**large, "approve": ("approved", None)}) == (["reply"], [])
    assert advance(a, {**large, "approve": ("denied", None)}) == ([], ["reply"])
    assert advance(a, ran, started={"decide"}) == ([], []), "a started node is not ready again"


@hs.composite
def dags(draw: hs.DrawFn) -> WorkflowDefinition:
    n = draw(hs.integers(1, 12))
    nodes = []
    for i in range(n):
        after: list[object] = []
        for j in draw(hs.sets(hs.integers(0, i - 1), max_size=3)) if i else ():
            if draw(hs.booleans()):
                after.append(f"n{j}")
            else:
                after.append({"node": f"n{j}", "when": {"path": "v", "op": "gt", "value": draw(hs.integers(0, 9))}})
        nodes.append(agent(f"n{i}", *after))
    return WorkflowDefinition.model_validate(wf(*nodes, output=f"n{n - 1}"))


@settings(max_examples=200, deadline=None)
@given(dags(), hs.randoms(use_true_random=False))
def test_advance_decides_every_node_once_and_never_runs_one_before_what_it_needs(w, rnd: random.Random):
    """Run any DAG to its end, nodes finishing in any order with any outputs: every node is run or
    skipped exactly once; a node runs only after everything it is after ended; a node runs iff no
    edge of it is not taken and not all of them are void."""
    ended: dict[str, tuple[str, object]] = {}
    running: set[str] = set()
    decided: list[str] = []
    while len(ended) < len(w.nodes):
        ready, skipped = advance(w, ended, running)
        for s in skipped:
            ended[s] = ("skipped", None)
        decided += ready + skipped
        running |= set(ready)
        assert not set(ready) & set(skipped)
        if not running:
            assert len(ended) == len(w.nodes), "nothing runs, and something is undecided: stuck"
            break
        done = rnd.choice(sorted(running))
        running.discard(done)
        for e in w.node(done).edges():
            assert e.node in ended, f"{done} ran before {e.node} ended"
        ended[done] = ("completed", {"v": rnd.randint(0, 9)})
    assert sorted(decided) == sorted(n.id for n in w.nodes) and len(decided) == len(set(decided))
    for n in w.nodes:
        verdicts = [
            "void" if ended[e.node][0] == "skipped"
            else "taken" if e.when is None or e.when.holds(*ended[e.node]) else "not taken"
            for e in n.edges()
        ]  # fmt: skip
        should_skip = "not taken" in verdicts or (bool(verdicts) and set(verdicts) == {"void"})
        assert (ended[n.id][0] == "skipped") is should_skip, (n.id, verdicts, ended[n.id])


def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshctl", *args], capture_output=True, text=True, timeout=60)


def test_meshctl_workflow_validate_show_and_diff(tmp_path):
    ok = meshctl("workflow", "validate", str(EXAMPLE))
    ref = mw.load(EXAMPLE).ref()
    assert ok.returncode == 0 and f"ok: {ref} (5 nodes, mode fixed)" in ok.stdout, ok.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(wf(agent("a", "b", retires=2), agent("b", "a"))))
    out = meshctl("workflow", "validate", str(bad), str(EXAMPLE))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"{bad}: node 'a': retires: not a field of this (misspelt?)"], out.stderr
    assert f"ok: {ref}" in out.stdout, "every file is checked"

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    out = meshctl("workflow", "validate", str(broken))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "not YAML" in out.stderr, out.stderr
    out = meshctl("workflow", "show", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and out.stderr.strip() == f"meshctl: no such file: {tmp_path / 'missing.yaml'}"

    text = meshctl("workflow", "show", str(EXAMPLE)).stdout
    assert text.splitlines()[0] == f"workflow {ref}  mode: fixed  nodes: 5  answer: reply"
    assert "after decide if decide.amount gt 100" in text and "(3 tries, backoff 2, 4 s; timeout 20 s)" in text
    mermaid = meshctl("workflow", "show", str(EXAMPLE), "--mermaid").stdout.splitlines()
    assert mermaid[0] == "flowchart TD" and '  decide -->|"decide.amount gt 100"| approve' in mermaid
    assert "  policy --> decide" in mermaid and "  order --> decide" in mermaid
    shown = json.loads(meshctl("workflow", "show", str(EXAMPLE), "--json").stdout)
    assert shown["ref"] == ref and mw.parse(shown["definition"]).digest() == shown["digest"], "the JSON is canonical"

    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["nodes"][4]["budget_share"] = 0.2
    doc["nodes"].append(
        {"id": "log", "kind": "tool", "tool": "note_write", "arguments": {"text": "x"}, "after": ["reply"]}
    )
    doc["output"] = "reply"
    new = tmp_path / "refund-2.json"
    new.write_text(json.dumps(doc))
    d = meshctl("workflow", "diff", str(EXAMPLE), str(new))
    assert d.returncode == 0, d.stderr
    assert d.stdout.splitlines()[1:] == ["~ node reply.budget_share: 0.3 -> 0.2", "+ node log: tool note_write(text)"]
    assert meshctl("workflow", "diff", str(EXAMPLE), str(EXAMPLE)).stdout.splitlines()[1] == "no change"
