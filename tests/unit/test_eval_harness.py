"""``meshctl eval``: dataset validation, properties, aggregation, baseline comparison, the runner
(against a fake mesh), judge calibration (with the scripted judge) and the CLI's one-line errors."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mesh_contracts.base import ID_PATTERN
from mesh_contracts.v1 import (
    CheckResult,
    Citation,
    TaskCompleted,
    TaskFailed,
    TaskRejected,
    TokenUsage,
)
from mesh_eval.baseline import compare
from mesh_eval.calibration import calibrate, calibration_stats
from mesh_eval.dataset import Case, Dataset, Expect, load_dataset
from mesh_eval.errors import EvalError
from mesh_eval.harness import Runner, open_clients, run_cases, run_dataset, task_id_for
from mesh_eval.jsonl import DatasetError
from mesh_eval.properties import Observed, case_result, evaluate
from mesh_eval.render import render_calibration, render_comparison, render_summary, render_table
from mesh_eval.report import build_report, gate_failures, load_report, percentile, summarize, write_report

pytestmark = pytest.mark.unit

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."


def write(path: Path, *lines: object) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def case(**over: object) -> dict:
    return {"id": "c1", "tenant": "acme", "goal": GOAL, **over}


def a_case(expect: dict | None = None, **over: object) -> Case:
    return Case(
        id=str(over.pop("id", "c1")),
        tenant="acme",
        goal=GOAL,
        line=1,
        expect=Expect.model_validate(expect or {}),
        **over,  # type: ignore[arg-type]
    )


def completed(**over: object) -> TaskCompleted:
    base: dict = {
        "tenant": "acme",
        "task_id": "t1",
        "answer": "Every side effect carries an Idempotency Key. 17 * 23 = 391.",
        "citations": (Citation(doc_id="durability.md", version="v1", chunk_id="0", chunk_hash="h"),),
        "usage": TokenUsage(input_tokens=800, output_tokens=100, cost_usd=0.003, calls=3),
        "steps": 3,
        "checks": (CheckResult(name="grounded", passed=True), CheckResult(name="no_pii", passed=True)),
        "judge_score": 0.8,
        "prompt_versions": {"planner": "planner.plan@1+aa", "judge": "checker.judge@1+bb"},
        "tools": ("search_docs", "calculator"),
    }
    return TaskCompleted(**{**base, **over})


def failed(**over: object) -> TaskFailed:
    base: dict = {
        "tenant": "acme",
        "task_id": "t1",
        "reason": "checker rejected the answer: no_forbidden_terms: contains forbidden term(s): guarantee",
        "usage": TokenUsage(input_tokens=500, output_tokens=50, cost_usd=0.002, calls=2),
        "checks": (CheckResult(name="no_forbidden_terms", passed=False, reason="contains guarantee"),),
        "tools": ("search_docs",),
    }
    return TaskFailed(**{**base, **over})


# --- dataset validation -----------------------------------------------------------------------


def test_a_valid_dataset_loads_with_comments_blank_lines_documents_limits_and_policy(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "durability.md").write_text("# Durability\nIdempotency keys.\n")
    path = write(
        tmp_path / "ds.jsonl",
        "// the golden cases",
        "",
        case(
            documents=["docs/durability.md", {"name": "notes/extra.md", "text": "Extra."}],
            limits={"max_steps": 6},
            policy={"forbidden_terms": ["guarantee"], "rubric": '- Mentions "idempotency key".'},
            expect={"must_cite": ["durability.md"], "must_contain": ["391"], "max_cost_usd": 0.05},
            tags=["rag"],
        ),
        "   // an indented comment",
        case(id="c2", tenant="globex", documents=["docs/durability.md"], expect={"outcome": "failed"}),
    )
    ds = load_dataset(path)
    assert [c.id for c in ds.cases] == ["c1", "c2"]
    assert [c.line for c in ds.cases] == [3, 5]
    c1 = ds.cases[0]
    assert c1.limits.max_steps == 6 and c1.limits.max_tokens == 50_000
    assert c1.policy.forbidden_terms == ("guarantee",)
    assert c1.expect.keys == ("must_cite", "must_contain", "max_cost_usd")
    assert c1.expect.outcome == "completed"
    assert [d.doc_id for d in c1.documents] == ["durability.md", "notes/extra.md"]
    assert c1.documents[0].path == (tmp_path / "docs" / "durability.md").resolve()
    assert c1.documents[1].data() == b"Extra."
    assert ds.sha256 == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert ds.tenants == ["acme", "globex"]
    # the same file is ingested once per tenant that needs it
    docs = ds.documents()
    assert [d.doc_id for d in docs["acme"]] == ["durability.md", "notes/extra.md"]
    assert [d.doc_id for d in docs["globex"]] == ["durability.md"]


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        (case(expcet={}), r"ds\.jsonl:2: case 'c1': unknown field 'expcet'; did you mean 'expect'\?"),
        (
            case(expect={"must_cit": ["x"]}),
            r":2: case 'c1': unknown field 'expect\.must_cit'; did you mean 'must_cite'\?",
        ),
        (case(limits={"max_step": 3}), r":2: case 'c1': unknown field 'limits\.max_step'; did you mean 'max_steps'\?"),
        (case(policy={"forbiden_terms": ["x"]}), r":2: case 'c1': unknown field 'policy\.forbiden_terms'"),
        (case(policy={"judge_min_score": 2}), r":2: case 'c1': policy\.judge_min_score: Input should be less than"),
        (case(limits={"max_steps": 0}), r":2: case 'c1': limits\.max_steps: Input should be greater than 0"),
        (case(expect={"outcome": "done"}), r":2: case 'c1': expect\.outcome: Input should be 'completed'"),
        (case(expect={"must_contain": "391"}), r":2: case 'c1': expect\.must_contain: Input should be a list"),
        (case(expect={"max_cost_usd": None}), r"expect: max_cost_usd: null is not a value"),
        (case(expect={"outcome": "failed", "must_cite": ["d.md"]}), r"must_cite needs outcome 'completed'"),
        (case(expect={"reason_contains": ["x"]}), r"reason_contains needs outcome 'failed' or 'rejected'"),
        (case(tenant="a.b"), r":2: case 'c1': tenant: String should match pattern"),
        ({"id": "c1", "tenant": "acme"}, r":2: case 'c1': goal: Field required"),
        (
            case(documents=["docs/missing.md"]),
            r":2: case 'c1': documents\[0\]: no such file or directory: docs/missing\.md",
        ),
        (case(documents=[{"name": "../x.md", "text": "t"}]), r"documents\[0\]: a document name is a relative path"),
        (case(documents=[{"name": "x.pdf", "text": "t"}]), r"documents\[0\]: an inline document's name ends in"),
        (case(documents=[{"name": "x.md", "txt": "t"}]), r"documents\[0\]: unknown field 'txt'"),
        (case(documents=[3]), r"documents\[0\]: a document is a path or an object"),
        ("{not json", r"ds\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"ds\.jsonl:2: a line must be a JSON object, not list"),
    ],
)
def test_invalid_cases_name_file_line_and_field_in_one_line(tmp_path, line, pattern):
    path = write(tmp_path / "ds.jsonl", "// header", line)
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert re.search(pattern, str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


def test_duplicate_ids_are_an_error_naming_both_lines(tmp_path):
    path = write(tmp_path / "ds.jsonl", case(), case(id="c2"), "", case())
    with pytest.raises(DatasetError, match=r"ds\.jsonl:4: case 'c1': duplicate id 'c1' \(first on line 1\)"):
        load_dataset(path)


def test_one_doc_id_with_two_contents_in_one_tenant_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.md").write_text("one")
    (tmp_path / "b" / "x.md").write_text("two")
    path = write(tmp_path / "ds.jsonl", case(documents=["a/x.md"]), case(id="c2", documents=["b/x.md"]))
    with pytest.raises(DatasetError, match=r":2: case 'c2': document 'x.md' for tenant acme differs from .*line 1"):
        load_dataset(path)
    # in different tenants it is fine
    write(path, case(documents=["a/x.md"]), case(id="c2", tenant="globex", documents=["b/x.md"]))
    assert len(load_dataset(path).cases) == 2


def test_a_missing_or_empty_dataset_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"no such dataset file: .*nope\.jsonl"):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="no cases"):
        load_dataset(write(tmp_path / "empty.jsonl", "// nothing", ""))


def test_select_by_tag_and_id(tmp_path):
    ds = load_dataset(
        write(tmp_path / "ds.jsonl", case(tags=["rag"]), case(id="c2", tags=["tools"]), case(id="c3", tags=["rag"]))
    )
    assert [c.id for c in ds.select(tags=["rag"]).cases] == ["c1", "c3"]
    assert [c.id for c in ds.select(case_ids=["c2"]).cases] == ["c2"]
    assert [c.id for c in ds.select(tags=["rag"], case_ids=["c3", "c2"]).cases] == ["c3"]
    with pytest.raises(DatasetError, match="no case with id 'zz'"):
        ds.select(case_ids=["zz"])
    with pytest.raises(DatasetError, match="no case matches tag"):
        ds.select(tags=["nope"])


def test_task_ids_fit_the_id_pattern_and_stay_distinct():
    assert task_id_for("ab12cd34", "durability-cited") == "ev-ab12cd34-durability-cited"
    a, b = task_id_for("ab12cd34", "a.b"), task_id_for("ab12cd34", "a-b")
    assert a != b and a.startswith("ev-ab12cd34-a-b-")
    long1, long2 = task_id_for("ab12cd34", "x" * 100 + "1"), task_id_for("ab12cd34", "x" * 100 + "2")
    for tid in (a, b, long1, long2, task_id_for("ab12cd34", "ünïcode case / with spaces")):
        assert re.match(ID_PATTERN, tid), tid
    assert long1 != long2


# --- properties -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expect", "outcome", "prop", "passed"),
    [
        ({}, completed(), "outcome", True),
        ({}, failed(), "outcome", False),
        ({"outcome": "failed"}, failed(), "outcome", True),
        ({"outcome": "failed"}, completed(), "outcome", False),
        ({"outcome": "rejected"}, TaskRejected(tenant="acme", task_id="t1", reason="bad"), "outcome", True),
        ({}, completed(), "checker", True),
        ({}, completed(checks=(CheckResult(name="grounded", passed=False, reason="support 0.3"),)), "checker", False),
        ({}, failed(), "checker", False),
        ({"must_cite": ["durability.md"]}, completed(), "must_cite", True),
        ({"must_cite": ["durability.md", "identity.md"]}, completed(), "must_cite", False),
        ({"must_cite": ["durability.md"]}, completed(citations=()), "must_cite", False),
        ({"must_cite": ["durability.md"]}, failed(), "must_cite", False),
        ({"must_contain": ["391", "IDEMPOTENCY KEY"]}, completed(), "must_contain", True),
        ({"must_contain": ["392"]}, completed(), "must_contain", False),
        ({"must_contain": ["guarantee"]}, failed(), "must_contain", False),  # an answer was expected
        ({"outcome": "failed", "must_contain": ["GUARANTEE"]}, failed(), "must_contain", True),
        ({"must_not_contain": ["@", "password"]}, completed(), "must_not_contain", True),
        ({"must_not_contain": ["idempotency"]}, completed(), "must_not_contain", False),
        ({"outcome": "failed", "must_not_contain": ["guarantee"]}, failed(), "must_not_contain", False),
        ({"max_cost_usd": 0.003}, completed(), "max_cost_usd", True),
        ({"max_cost_usd": 0.0029}, completed(), "max_cost_usd", False),
        ({"max_steps": 3}, completed(), "max_steps", True),
        ({"max_steps": 2}, completed(), "max_steps", False),
        ({"tool_calls": ["calculator"]}, completed(), "tool_calls", True),
        ({"tool_calls": ["calculator", "send_email"]}, completed(), "tool_calls", False),
        ({"judge_min_score": 0.8}, completed(), "judge_min_score", True),
        ({"judge_min_score": 0.81}, completed(), "judge_min_score", False),
        ({"judge_min_score": 0.1}, completed(judge_score=None), "judge_min_score", False),
        ({"outcome": "failed", "reason_contains": ["forbidden", "GUARANTEE"]}, failed(), "reason_contains", True),
        ({"outcome": "failed", "reason_contains": ["budget"]}, failed(), "reason_contains", False),
        ({"outcome": "failed", "reason_contains": ["x"]}, completed(), "reason_contains", False),
    ],
)
def test_each_property_passes_and_fails(expect, outcome, prop, passed):
    props = evaluate(a_case(expect), outcome)
    assert props[prop]["passed"] is passed, props[prop]
    assert isinstance(props[prop]["detail"], str) and props[prop]["detail"]


def test_properties_present_are_outcome_checker_and_the_expect_keys_given():
    assert list(evaluate(a_case({"max_steps": 5, "must_contain": ["391"]}), completed())) == [
        "outcome",
        "checker",
        "must_contain",
        "max_steps",
    ]
    # an expected failure has no checker property
    assert list(evaluate(a_case({"outcome": "failed"}), failed())) == ["outcome"]


def test_max_steps_of_a_failed_task_counts_distinct_steps_seen_or_is_skipped():
    c = a_case({"outcome": "failed", "max_steps": 2})
    assert evaluate(c, failed(), step_ids=["s1", "s2", "s1"])["max_steps"]["passed"] is True
    assert evaluate(c, failed(), step_ids=["s1", "s2", "s3"])["max_steps"]["passed"] is False
    skipped = evaluate(c, failed(), step_ids=None)["max_steps"]
    assert skipped["skipped"] is True and skipped["passed"] is True


def test_a_timeout_fails_every_property_it_cannot_show():
    c = a_case({"must_contain": ["391"], "max_cost_usd": 1.0, "tool_calls": ["calculator"], "judge_min_score": 0.1})
    props = evaluate(c, None)
    assert props["outcome"] == {"passed": False, "detail": "expected completed, got timeout"}
    assert not any(p["passed"] for p in props.values())


def test_case_result_carries_usage_latency_and_a_verdict():
    c = a_case({"must_contain": ["391"]}, tags=("rag",))
    entry = case_result(c, "ev-x-c1", Observed(completed(answer="391 " + "x" * 5000), 1.23456))
    assert entry["passed"] is True and entry["outcome"] == "completed"
    assert entry["tokens"] == {"input": 800, "output": 100} and entry["cost_usd"] == 0.003
    assert entry["latency_s"] == 1.235 and entry["steps"] == 3 and entry["judge_score"] == 0.8
    assert entry["tools"] == ["search_docs", "calculator"] and entry["tags"] == ["rag"]
    assert len(entry["answer"]) == 2000 and entry["checks"][0]["name"] == "grounded"
    json.dumps(entry)
    timed_out = case_result(c, "ev-x-c1", Observed(None, 5.0), timeout_s=5)
    assert timed_out["outcome"] == "timeout" and timed_out["reason"] == "no outcome within 5s"
    assert timed_out["passed"] is False
    broken = case_result(c, "ev-x-c1", Observed(None, 0.1, error="OSError: boom"))
    assert broken["outcome"] == "error" and broken["reason"] == "OSError: boom" and not broken["passed"]


# --- aggregation ------------------------------------------------------------------------------


def test_nearest_rank_percentiles():
    values = [float(v) for v in range(10, 0, -1)]  # 10..1, unsorted on purpose
    assert percentile(values, 50) == 5.0  # rank ceil(5.0) = 5
    assert percentile(values, 95) == 10.0  # rank ceil(9.5) = 10
    twenty = [float(v) for v in range(1, 21)]
    assert percentile(twenty, 50) == 10.0  # rank 10
    assert percentile(twenty, 95) == 19.0  # rank 19
    assert percentile([4.2], 95) == 4.2
    assert percentile([], 50) is None


def entries(spec: list[tuple[str, bool, float, float]]) -> list[dict]:
    """(id, passes, latency, cost) -> report entries: a passing case meets must_contain."""
    out = []
    for cid, ok, latency, cost in spec:
        c = a_case({"must_contain": ["391" if ok else "nope"], "max_steps": 5}, id=cid)
        outcome = completed(usage=TokenUsage(input_tokens=90, output_tokens=10, cost_usd=cost))
        out.append(case_result(c, f"ev-r-{cid}", Observed(outcome, latency)))
    return out


def test_summary_pass_rate_property_rates_latency_cost_and_judge():
    cases = entries([(f"c{i}", i <= 8, float(i), 0.01) for i in range(1, 11)])
    cases.append(case_result(a_case({"outcome": "failed", "max_steps": 1}, id="f1"), "t", Observed(failed(), 11.0)))
    s = summarize(cases)
    assert s["cases"] == 11 and s["passed"] == 9 and s["pass_rate"] == round(9 / 11, 4)
    assert s["properties"]["must_contain"] == {"passed": 8, "total": 10, "rate": 0.8}
    assert s["properties"]["outcome"] == {"passed": 11, "total": 11, "rate": 1.0}
    assert s["properties"]["checker"]["total"] == 10  # the expected failure has none
    assert s["properties"]["max_steps"]["total"] == 10  # skipped for the failure (no steps seen)
    assert s["latency_s"] == {"p50": 6.0, "p95": 11.0, "max": 11.0}
    assert s["cost_usd"]["total"] == pytest.approx(0.102) and s["cost_usd"]["mean"] == pytest.approx(0.102 / 11)
    assert s["tokens"] == {"total": 10 * 100 + 550, "mean": round(1550 / 11, 1)}
    assert s["judge_score"] == {"mean": 0.8, "min": 0.8, "n": 10}
    report = build_report(
        Dataset("ds.jsonl", "abc", ()), cases, run_id="r", started_at=datetime.now(UTC),
        finished_at=datetime.now(UTC), concurrency=4,
    )  # fmt: skip
    assert report["prompt_versions"] == {"judge": ["checker.judge@1+bb"], "planner": ["planner.plan@1+aa"]}
    assert report["summary"] == s and report["format"] == 1
    assert gate_failures(report, min_pass_rate=0.8) == []
    assert gate_failures(report, min_pass_rate=0.9) == ["pass rate 0.8182 is below --min-pass-rate 0.9"]
    table = render_table(report)
    assert re.search(r"^c9\s+completed\s+FAIL .*must_contain: answer lacks 'nope'", table, re.M)
    assert "failed cases:" in table
    assert "pass rate 9/11 (81.8%)" in render_summary(report)


# --- baseline comparison ----------------------------------------------------------------------


def report_of(spec: list[tuple[str, bool, float, float]], sha: str = "s1") -> dict:
    cases = entries(spec)
    return {"format": 1, "dataset_sha256": sha, "run_id": "r", "summary": summarize(cases), "cases": cases}


def test_an_identical_run_has_no_regression():
    spec = [("a", True, 1.0, 0.01), ("b", False, 2.0, 0.01)]
    cmp = compare(report_of(spec), report_of(spec))
    assert cmp["regressions"] == 0 and cmp["warnings"] == [] and cmp["newly_failing"] == []
    assert "no regression" in render_comparison(cmp)


def test_a_pass_rate_drop_and_a_newly_failing_case_are_regressions():
    before = report_of([("a", True, 1.0, 0.01), ("b", True, 1.0, 0.01)])
    now = report_of([("a", True, 1.0, 0.01), ("b", False, 1.0, 0.01)])
    cmp = compare(before, now)
    assert cmp["newly_failing"] == ["b"]
    rate = next(m for m in cmp["metrics"] if m["metric"] == "pass_rate")
    assert rate["baseline"] == 1.0 and rate["now"] == 0.5 and rate["delta"] == -0.5 and rate["ok"] is False
    prop = next(m for m in cmp["metrics"] if m["metric"] == "property must_contain")
    assert prop["ok"] is False
    assert cmp["regressions"] == 3  # pass rate, must_contain, case b
    text = render_comparison(cmp)
    assert "case b: passed in the baseline, fails now  REGRESSION" in text
    assert re.search(r"pass_rate\s+1 -> 0.5\s+-0.5\s+REGRESSION", text)
    # a drop within --max-regression is tolerated, the newly failing case is not
    tolerant = compare(before, now, max_regression=0.5)
    assert all(m["ok"] for m in tolerant["metrics"]) and tolerant["regressions"] == 1
    # the report gate sees it
    assert gate_failures({**now, "comparison": cmp}, min_pass_rate=0.0) == ["3 regression(s) against baseline r"]


def test_cost_increase_is_flagged_beyond_the_threshold_and_not_below():
    before = report_of([("a", True, 1.0, 0.010), ("b", True, 1.0, 0.010)])
    up30 = report_of([("a", True, 1.0, 0.013), ("b", True, 1.0, 0.013)])
    up20 = report_of([("a", True, 1.0, 0.012), ("b", True, 1.0, 0.012)])
    cost = "mean cost_usd per case"
    flagged = compare(before, up30, max_cost_increase=0.25)
    m = next(m for m in flagged["metrics"] if m["metric"] == cost)
    assert m["ok"] is False and m["relative"] == pytest.approx(0.3) and flagged["regressions"] == 1
    fine = compare(before, up20, max_cost_increase=0.25)
    assert next(m for m in fine["metrics"] if m["metric"] == cost)["ok"] is True and fine["regressions"] == 0
    assert compare(before, up30, max_cost_increase=0.5)["regressions"] == 0
    # from zero, any cost is a rise
    free = report_of([("a", True, 1.0, 0.0)])
    assert compare(free, report_of([("a", True, 1.0, 0.001)]))["regressions"] == 1
    assert compare(free, free)["regressions"] == 0


def test_latency_is_only_checked_when_asked():
    before = report_of([("a", True, 1.0, 0.01)])
    slower = report_of([("a", True, 3.0, 0.01)])
    assert compare(before, slower)["regressions"] == 0
    assert not any(m["metric"].startswith("latency") for m in compare(before, slower)["metrics"])
    assert compare(before, slower, max_latency_increase=1.0)["regressions"] == 1
    assert compare(before, slower, max_latency_increase=2.0)["regressions"] == 0


def test_another_dataset_version_warns_and_compares_common_cases_by_id():
    before = report_of([("a", True, 1.0, 0.01), ("gone", False, 1.0, 0.01)], sha="old")
    now = report_of([("a", True, 1.0, 0.01), ("new", False, 1.0, 0.01)], sha="new")
    cmp = compare(before, now)
    assert len(cmp["warnings"]) == 1 and "another version of the dataset" in cmp["warnings"][0]
    assert cmp["missing_now"] == ["gone"] and cmp["new_cases"] == ["new"]
    assert cmp["common_cases"] == 1 and cmp["regressions"] == 0  # 'new' failing is not a regression
    text = render_comparison(cmp)
    assert "warning:" in text and "in the baseline only (not compared): gone" in text


def test_load_report_refuses_a_missing_file_or_a_non_report(tmp_path):
    with pytest.raises(EvalError, match=r"baseline report .*nope\.json: no such file"):
        load_report(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{oops")
    with pytest.raises(EvalError, match="not JSON"):
        load_report(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"format": 1, "cases": "no"}))
    with pytest.raises(EvalError, match="not an eval report"):
        load_report(tmp_path / "y.json")
    good = report_of([("a", True, 1.0, 0.01)])
    write_report(good, tmp_path / "deep" / "r.json")
    assert load_report(tmp_path / "deep" / "r.json") == good


# --- the runner against a fake mesh -----------------------------------------------------------


class FakeMesh:
    def __init__(self, *, delay: float = 0.02, hang: set[str] = frozenset(), explode: set[str] = frozenset()):
        self.delay, self.hang, self.explode = delay, hang, explode
        self.in_flight = self.max_in_flight = 0
        self.ingested: list[tuple[str, str, bytes]] = []
        self.submitted: list[tuple[str, str]] = []
        self.first_submit_at: float | None = None
        self.last_ingest_at = 0.0

    async def ingest(self, tenant, documents, timeout_s):
        for doc_id, path in documents:
            self.ingested.append((tenant, doc_id, path.read_bytes()))
        self.last_ingest_at = time.monotonic()

    async def submit(self, case, task_id, timeout_s):
        self.first_submit_at = self.first_submit_at or time.monotonic()
        self.submitted.append((case.id, task_id))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if case.id in self.hang:
                await asyncio.sleep(3600)
            await asyncio.sleep(self.delay)
            if case.id in self.explode:
                raise ConnectionResetError("broker went away")
            return Observed(completed(task_id=task_id, tenant=case.tenant), 0.5, ["s1", "s2"])
        finally:
            self.in_flight -= 1


def dataset_of(tmp_path: Path, n: int, **over: object) -> Dataset:
    (tmp_path / "d.md").write_text("durability")
    lines = [case(id=f"c{i}", documents=["d.md"], expect={"must_contain": ["391"]}, **over) for i in range(n)]
    lines[0]["documents"] = ["d.md", {"name": "inline.md", "text": "inline text"}]
    return load_dataset(write(tmp_path / "ds.jsonl", *lines))


async def test_the_runner_never_has_more_than_concurrency_tasks_in_flight(tmp_path):
    ds = dataset_of(tmp_path, 10)
    mesh = FakeMesh()
    cases = await Runner(mesh, concurrency=3, timeout_s=5).run(ds)
    assert mesh.max_in_flight == 3
    assert [c["id"] for c in cases] == [f"c{i}" for i in range(10)]  # dataset order
    assert all(c["passed"] for c in cases)
    run_ids = {tid.split("-")[1] for _, tid in mesh.submitted}
    assert len(run_ids) == 1 and re.fullmatch(r"[0-9a-f]{8}", run_ids.pop())
    one = await Runner(FakeMesh(), concurrency=1, timeout_s=5).run(ds)
    assert len(one) == 10


async def test_documents_are_ingested_once_before_any_task(tmp_path):
    ds = dataset_of(tmp_path, 4)
    mesh = FakeMesh()
    await Runner(mesh, concurrency=2, timeout_s=5).run(ds)
    assert sorted(mesh.ingested) == [("acme", "d.md", b"durability"), ("acme", "inline.md", b"inline text")]
    assert mesh.first_submit_at is not None and mesh.last_ingest_at <= mesh.first_submit_at


async def test_a_case_without_an_outcome_in_time_is_a_timeout_and_the_others_finish(tmp_path):
    ds = dataset_of(tmp_path, 4)
    mesh = FakeMesh(hang={"c1"}, explode={"c2"})
    cases = await Runner(mesh, concurrency=4, timeout_s=0.3, grace_s=0.0).run(ds)  # c1 hangs for ever
    by_id = {c["id"]: c for c in cases}
    assert by_id["c1"]["outcome"] == "timeout" and by_id["c1"]["passed"] is False
    assert by_id["c1"]["reason"] == "no outcome within 0.3s" and by_id["c1"]["latency_s"] >= 0.25
    assert by_id["c2"]["outcome"] == "error" and "broker went away" in by_id["c2"]["reason"]
    assert by_id["c0"]["passed"] and by_id["c3"]["passed"]
    assert mesh.in_flight == 0


async def test_progress_is_one_line_per_case_off_a_terminal_and_redrawn_on_one(tmp_path):
    ds = dataset_of(tmp_path, 3)
    log = io.StringIO()
    await Runner(FakeMesh(), concurrency=1, timeout_s=5, progress=log, tty=False).run(ds)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("ingesting 2 document(s) into 1 tenant(s)")
    assert re.fullmatch(r"\[1/3\] c0 PASS 0\.5s \$0\.0030", lines[1])
    assert len(lines) == 4 and "\r" not in log.getvalue()
    tty = io.StringIO()
    await Runner(FakeMesh(), concurrency=1, timeout_s=5, progress=tty, tty=True).run(ds)
    out = tty.getvalue()
    assert "\r" in out and "eval [" in out and "3/3  passed 3  failed 0" in out


async def test_run_cases_builds_a_report(tmp_path):
    ds = dataset_of(tmp_path, 2)
    report = await run_cases(ds, Runner(FakeMesh(), concurrency=2, timeout_s=5))
    assert report["dataset"] == ds.path and report["dataset_sha256"] == ds.sha256
    assert report["summary"]["pass_rate"] == 1.0 and report["concurrency"] == 2
    assert report["started_at"] <= report["finished_at"]
    json.dumps(report)


class FakeClient:
    """Stands in for a connected TenantClient (same submit/ingest signatures)."""

    def __init__(self, tenant: str) -> None:
        self.tenant, self.calls = tenant, []

    async def submit(self, goal, *, task_id=None, limits=None, policy=None, follow=True, timeout=120.0, on_event=None):
        from meshctl.submission import Followed

        self.calls.append((goal, task_id, limits, policy))
        seen = Followed(task_id, submitted_at=time.time())
        seen.outcome = completed(tenant=self.tenant, task_id=task_id)
        seen.finished_at = seen.submitted_at + 0.25
        return seen

    async def ingest(self, doc_id, data, media_type, *, title="", timeout=120.0):
        return type("Got", (), {"ok": True, "error": ""})()


async def test_run_dataset_with_clients_passes_limits_and_policy(tmp_path):
    path = write(
        tmp_path / "ds.jsonl",
        case(limits={"max_steps": 5}, policy={"forbidden_terms": ["guarantee"]}, tags=["x"]),
        case(id="c2", tenant="globex"),
    )
    clients = {"acme": FakeClient("acme"), "globex": FakeClient("globex")}
    report = await run_dataset(path, clients=clients, concurrency=2, progress=False, run_id="feedbeef")
    assert report["run_id"] == "feedbeef" and report["summary"]["passed"] == 2
    goal, task_id, limits, policy = clients["acme"].calls[0]
    assert goal == GOAL and task_id == "ev-feedbeef-c1" and limits.max_steps == 5
    assert policy.forbidden_terms == ("guarantee",)
    assert report["cases"][0]["latency_s"] == 0.25
    only = await run_dataset(path, clients=clients, progress=False, tags=["x"])
    assert [c["id"] for c in only["cases"]] == ["c1"]
    with pytest.raises(EvalError, match="no client for tenant 'globex'"):
        await run_dataset(path, clients={"acme": clients["acme"]}, progress=False)


def test_open_clients_names_a_tenant_without_an_identity(tmp_path):
    with pytest.raises(EvalError, match=r"tenant 'acme' has no client identity in .* \(known: none\)"):
        open_clients(tmp_path, ["acme"])


# --- judge calibration ------------------------------------------------------------------------


def test_calibration_statistics_on_a_hand_computed_matrix():
    labels = ["pass"] * 8 + ["fail"] * 4
    verdicts = ["pass"] * 6 + ["fail"] * 2 + ["pass"] * 1 + ["fail"] * 3
    s = calibration_stats(labels, verdicts, [0.9] * 8 + [0.3] * 4)
    assert s["n"] == 12 and s["judged"] == 12
    assert s["agreement"] == 0.75
    assert s["confusion"] == {"pass": {"pass": 6, "fail": 2, "error": 0}, "fail": {"pass": 1, "fail": 3, "error": 0}}
    # po = 9/12; pe = 8/12 * 7/12 + 4/12 * 5/12 = 76/144; kappa = (po - pe) / (1 - pe) = 32/68
    assert s["kappa"] == pytest.approx(32 / 68, abs=1e-4)
    fd = s["fail_detection"]
    assert fd["precision"] == 0.6 and fd["recall"] == 0.75 and fd["f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert fd["support"] == 4
    assert s["mean_score"] == {"pass": 0.9, "fail": 0.3}


def test_calibration_statistics_edge_cases():
    perfect = calibration_stats(["pass", "fail"], ["pass", "fail"])
    assert perfect["agreement"] == 1.0 and perfect["kappa"] == 1.0
    one_class = calibration_stats(["pass", "pass"], ["pass", "pass"])
    assert one_class["kappa"] is None and one_class["fail_detection"]["precision"] is None
    errors = calibration_stats(["pass", "fail", "fail"], ["pass", "error", "fail"])
    assert errors["agreement"] == round(2 / 3, 4) and errors["judged"] == 2 and errors["kappa"] == 1.0
    assert errors["confusion"]["fail"]["error"] == 1


GOOD = "AgentMesh avoids duplicate side effects with an idempotency key per side effect."
PASSAGE = "Each side effect carries an idempotency key so duplicates are avoided."


def calibration_file(path: Path, *, wrong_label: bool = False) -> Path:
    q = "How does AgentMesh avoid duplicate side effects?"
    return write(
        path,
        "// labelled by a human",
        {"id": "c01", "goal": q, "answer": GOOD, "passages": [PASSAGE], "label": "fail" if wrong_label else "pass",
         "note": "grounded"},
        {"id": "c02", "goal": q, "answer": "Bananas are yellow and grow in bunches.", "passages": [PASSAGE],
         "label": "fail", "note": "off topic"},
        {"id": "c03", "goal": "What is the refund window?", "answer": "The refund window is 30 days.",
         "passages": ["Refunds are accepted within 30 days."], "rubric": '- Must mention "30 days".', "label": "pass"},
    )  # fmt: skip


async def test_calibrate_end_to_end_with_the_scripted_judge(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_MODEL", "scripted")
    monkeypatch.delenv("MESH_MODEL_CONFIG", raising=False)
    report = await calibrate(calibration_file(tmp_path / "cal.jsonl"), concurrency=2)
    assert report["n"] == 3 and 0.0 <= report["agreement"] <= 1.0
    assert report["judge"]["model"] == "scripted/scripted-judge"
    assert report["judge"]["prompt_version"].startswith("checker.judge@")
    assert [c["id"] for c in report["cases"]] == ["c01", "c02", "c03"]
    assert all(c["judge"] in ("pass", "fail") and 0.0 <= c["score"] <= 1.0 for c in report["cases"])
    text = render_calibration(report)
    assert "agreement" in text and "scripted/scripted-judge" in text
    json.dumps(report)
    # a label the judge disagrees with is listed with the human's note
    wrong = await calibrate(calibration_file(tmp_path / "w.jsonl", wrong_label=True))
    d = next(d for d in wrong["disagreements"] if d["id"] == "c01")
    assert d["label"] == "fail" and d["judge"] == "pass" and d["note"] == "grounded"
    assert wrong["agreement"] < 1.0


async def test_calibrate_refuses_a_bad_file_and_a_bad_model_config(tmp_path, monkeypatch):
    path = write(tmp_path / "cal.jsonl", {"id": "c1", "goal": "g", "answer": "a", "label": "maybe"})
    with pytest.raises(DatasetError, match=r"cal\.jsonl:1: case 'c1': label: Input should be 'pass' or 'fail'"):
        await calibrate(path)
    monkeypatch.setenv("MESH_MODEL", "nonsense")
    monkeypatch.delenv("MESH_MODEL_CONFIG", raising=False)
    with pytest.raises(EvalError, match="judge model configuration: MESH_MODEL='nonsense' needs a model config"):
        await calibrate(calibration_file(tmp_path / "ok.jsonl"))


async def test_a_judge_error_is_a_disagreement_not_a_crash(tmp_path):
    async def broken(model, inp, *, min_score):
        raise ValueError("judge reply has no JSON object")

    report = await calibrate(calibration_file(tmp_path / "cal.jsonl"), model=object(), judge=broken)
    assert report["agreement"] == 0.0 and report["judged"] == 0 and len(report["disagreements"]) == 3
    assert report["disagreements"][0]["judge"] == "error"


# --- the CLI ----------------------------------------------------------------------------------


def meshctl(*args: str, home: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "meshctl", "--home", home, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "{tmp}/missing.jsonl"], "meshctl: no such dataset file: {tmp}/missing.jsonl"),
        (["eval", "{tmp}/bad.jsonl"], "meshctl: {tmp}/bad.jsonl:2: case 'c1': unknown field 'expect.must_cit'"),
        (["eval", "{tmp}/good.jsonl"], "meshctl: tenant 'acme' has no client identity in"),
        (["eval", "{tmp}/good.jsonl", "--case", "zz"], "no case with id 'zz'"),
        (
            ["eval", "{tmp}/good.jsonl", "--baseline", "{tmp}/none.json"],
            "baseline report {tmp}/none.json: no such file",
        ),
        (["eval", "{tmp}/good.jsonl", "--baseline", "{tmp}/good.jsonl"], "not an eval report"),
        (["eval", "a", "b"], "eval takes one DATASET, or: eval calibrate [FILE]"),
        (["eval", "calibrate", "{tmp}/good.jsonl", "--baseline", "x"], "--baseline is not an option of eval calibrate"),
        (["eval", "{tmp}/good.jsonl", "--min-agreement", "0.5"], "--min-agreement is not an option of eval DATASET"),
        (["eval", "{tmp}/good.jsonl", "--concurrency", "0"], "not a positive whole number: '0'"),
        (["eval", "{tmp}/good.jsonl", "--min-pass-rate", "1.5"], "must be between 0 and 1"),
        (["eval", "calibrate", "{tmp}/nothing.jsonl"], "meshctl: no such calibration file: {tmp}/nothing.jsonl"),
    ],
)
def test_eval_errors_are_one_line_with_exit_2(tmp_path, args, message):
    write(tmp_path / "bad.jsonl", case(id="c0"), case(expect={"must_cit": []}))
    write(tmp_path / "good.jsonl", case())
    tmp = str(tmp_path)
    result = meshctl(*(a.format(tmp=tmp) for a in args), home=str(tmp_path / "home"))
    assert result.returncode == 2, result
    assert message.format(tmp=tmp) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_eval_calibrate_cli_writes_a_report_and_gates_on_agreement(tmp_path):
    env = {"MESH_MODEL": "scripted", "MESH_MODEL_CONFIG": ""}
    cal = calibration_file(tmp_path / "cal.jsonl", wrong_label=True)
    ok = meshctl(
        "eval", "calibrate", str(cal), "--report", str(tmp_path / "r" / "cal.json"), home=str(tmp_path), env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert "agreement" in ok.stdout and "disagreements" in ok.stdout
    saved = json.loads((tmp_path / "r" / "cal.json").read_text())
    assert saved["n"] == 3 and saved["judge"]["model"] == "scripted/scripted-judge"
    gated = meshctl("eval", "calibrate", str(cal), "--min-agreement", "1", "--json", home=str(tmp_path), env=env)
    assert gated.returncode == 1
    assert json.loads(gated.stdout)["agreement"] < 1.0
    assert "judge agreement" in gated.stderr and "below --min-agreement 1" in gated.stderr
    bad = meshctl("eval", "calibrate", str(cal), home=str(tmp_path), env={"MESH_MODEL": "nonsense"})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "judge model configuration" in bad.stderr
