"""``meshctl replay``'s pure parts: which calls a replay answers from recordings, what it refuses,
how two tasks compare; a replay's prompt versions; a request's named gateway route."""

from __future__ import annotations

import asyncio

import pytest

from mesh_agent import prompts
from mesh_contracts.v1 import (
    CheckResult,
    CheckVerdict,
    PlanCreated,
    PlanStep,
    Replay,
    TaskCompleted,
    TaskRejected,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
    UsageRecorded,
)
from mesh_llm import Message, ModelRequest, ScriptedModel, UnknownRoute
from mesh_llm.gateway import Gateway
from meshctl import replay as rp

T = {"tenant": "acme", "task_id": "t1"}


def story(answer: str = "391", tool_result: str = "391", cost: float = 0.002, task_id: str = "t1") -> rp.Story:
    s = rp.Story("acme", task_id)
    t = {**T, "task_id": task_id}
    steps = (PlanStep(step_id="s1", instruction="compute", tools=("calculator",)),
             PlanStep(step_id="s2", kind="answer", instruction="answer", depends_on=("s1",)))  # fmt: skip
    for m in (
        TaskSubmitted(**t, goal="Compute 17 * 23."),
        PlanCreated(**t, steps=steps),
        ToolRequested(**t, step_id="s1", call_id="s1-a1-i0-c0", tool="calculator", arguments={"expression": "17*23"}),
        ToolCompleted(**t, step_id="s1", call_id="s1-a1-i0-c0", tool="calculator", ok=True, result=tool_result),
        UsageRecorded(
            **t,
            agent="worker",
            call_id="c1",
            provider="scripted",
            model="scripted-1",
            input_tokens=10,
            output_tokens=5,
            cost_usd=cost,
        ),
        CheckVerdict(**t, passed=True, checks=(CheckResult(name="judge", passed=True),), judge_score=0.8),
        TaskCompleted(**t, answer=answer),
    ):
        s.messages += 1
        rp._fold(s, m)
    return s


def test_a_replay_answers_everything_from_recordings_by_default_and_from_a_step_on_makes_calls_live():
    s = story()
    assert rp.replay_of(s).recorded == ("plan", "s1", "s2", "check")
    assert rp.replay_of(s, from_step="s2").recorded == ("plan", "s1")
    assert rp.replay_of(s, from_step="s1").recorded == ("plan",)
    assert rp.replay_of(s, live=True, route="judge").model_dump() == {"of": "t1", "recorded": (), "route": "judge",
                                                                      "prompts": {}}  # fmt: skip
    assert Replay(of="t1", recorded=("plan",)).answers("plan") and not Replay(of="t1").answers("plan")
    with pytest.raises(rp.ReplayError, match=r"no step 'nope' in the plan of t1 \(steps: s1, s2\)"):
        rp.replay_of(s, from_step="nope")


def test_a_replay_is_refused_for_a_task_it_cannot_repeat():
    with pytest.raises(rp.ReplayError, match="no stored message about acme/t9"):
        rp.replay_of(rp.Story("acme", "t9"))
    unfinished = rp.Story("acme", "t2", messages=1, submitted=TaskSubmitted(**T, goal="x"))
    with pytest.raises(rp.ReplayError, match="has not finished"):
        rp.replay_of(unfinished)
    unfinished.outcome = TaskRejected(**T, reason="over the limit", code="too_many_in_flight")
    with pytest.raises(rp.ReplayError, match=r"was rejected .*nothing ran"):
        rp.replay_of(unfinished)


def test_a_task_refused_then_resubmitted_and_run_is_replayed_by_its_end():
    """Its stored refusal comes first (a client resubmitted it under its id after the
    retry-after): the outcome is the end it reached, and it can be replayed."""
    s = rp.Story("acme", "t1")
    for m in (
        TaskSubmitted(**T, goal="Compute 17 * 23."),
        TaskRejected(**T, reason="over the limit", code="too_many_in_flight", retry_after_s=0.4),
        TaskSubmitted(**T, goal="Compute 17 * 23."),
        PlanCreated(**T, steps=(PlanStep(step_id="s1", kind="answer", instruction="answer"),)),
        TaskCompleted(**T, answer="391"),
        TaskRejected(**T, reason="late copy refused", code="rate_limited", retry_after_s=1.0),
    ):
        s.messages += 1
        rp._fold(s, m)
    assert isinstance(s.outcome, TaskCompleted) and rp.replay_of(s).recorded == ("plan", "s1", "check")


def test_compare_names_what_changed_and_behaviour_ignores_cost_and_models():
    a = story()
    same = rp.compare(a, story(cost=0.0, task_id="t1-r"))
    assert rp.behaves_the_same(same) and not same["cost"]["same"]
    changed = rp.compare(a, story(answer="392", tool_result="392", task_id="t1-r"))
    assert not rp.behaves_the_same(changed)
    assert [k for k, v in changed.items() if not v["same"]] == ["tools", "answer"]
    text = rp.render(a, story(answer="392", tool_result="392"), rp.replay_of(a), changed)
    assert "answer   CHANGED" in text and "-391" in text and "+392" in text and "behaviour: CHANGED" in text
    assert "plan     same: 2 steps" in text and "verdict  same: passed, judge 0.80" in text


def test_resubmission_carries_the_original_inputs():
    s = story()
    assert rp.resubmission(s)["goal"] == "Compute 17 * 23." and rp.resubmission(s)["priority"] == 5


def test_a_prompt_version_comes_from_its_file_or_the_error_names_the_file(tmp_path):
    served = prompts.load("mesh_planner", "plan")
    assert prompts.chosen(served, None, tmp_path) is served
    assert prompts.chosen(served, {served.id: served.version}, tmp_path) is served
    assert prompts.chosen(served, {"other.prompt": "3"}, tmp_path) is served
    with pytest.raises(prompts.PromptError, match=rf"put {served.id}/8.md in its MESH_PROMPTS_DIR"):
        prompts.chosen(served, {served.id: "8"}, tmp_path)
    (tmp_path / served.id).mkdir()
    (tmp_path / served.id / "8.md").write_text(f"---\nid: {served.id}\nversion: 8\n---\nPlan briefly.\n")
    got = prompts.chosen(served, {served.id: "8"}, tmp_path)
    assert got.version == "8" and got.text.strip() == "Plan briefly." and got.ref.startswith(f"{served.id}@8+")
    (tmp_path / served.id / "6.md").write_text(f"---\nid: {served.id}\nversion: 5\n---\nx\n")
    with pytest.raises(prompts.PromptError, match=r"declares .* version 5, its path says .* version 6"):
        prompts.chosen(served, {served.id: "6"}, tmp_path)


def test_a_request_naming_a_route_takes_it_and_an_unknown_route_fails_for_good():
    gw = Gateway({"default": [ScriptedModel()], "judge": [ScriptedModel("scripted-judge")]})
    request = ModelRequest((Message("user", "hi"),), agent="worker")
    assert gw.route_for(request)[0] == "default"
    assert gw.route_for(ModelRequest((Message("user", "hi"),), agent="worker", route="judge"))[0] == "judge"
    with pytest.raises(UnknownRoute, match=r"no model route 'nosuch' here \(routes: default, judge\)") as e:
        gw.route_for(ModelRequest((Message("user", "hi"),), route="nosuch"))
    assert e.value.retryable is False
    answer = asyncio.run(gw.complete(ModelRequest((Message("user", "hi"),), agent="worker", route="judge")))
    assert answer.model == "scripted-judge"
