"""The budget monitor's rules, exactly: pure folding of messages, a clock passed in."""

from __future__ import annotations

import pytest

from mesh_budget.monitor import Monitor, Rules
from mesh_contracts.v1 import (
    ApprovalDecided,
    ApprovalRequested,
    CheckRequested,
    PlanCreated,
    PlanStep,
    StepCompleted,
    StepRequested,
    TaskCompleted,
    TaskLimits,
    TaskRejected,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
    UsageRecorded,
)

pytestmark = pytest.mark.unit
T = {"tenant": "acme", "task_id": "t1"}


def plan(*steps: PlanStep) -> PlanCreated:
    return PlanCreated(**T, steps=steps)


def step(sid: str, deps: tuple[str, ...] = (), instruction: str = "do it") -> PlanStep:
    return PlanStep(step_id=sid, instruction=instruction, depends_on=deps)


def tool(sid: str, call: str, name: str = "calculator", **args) -> ToolRequested:
    return ToolRequested(**T, step_id=sid, call_id=call, tool=name, arguments=args or {"expression": "1+1"})


def usage(sid: str, call: str, error: str = "", model: str = "scripted-1") -> UsageRecorded:
    return UsageRecorded(
        **T, agent="worker", step_id=sid, call_id=call, provider="scripted", model=model, input_tokens=10,
        output_tokens=5, error=error,
    )  # fmt: skip


def test_two_steps_waiting_on_each_other_are_a_deadlock_naming_both():
    m = Monitor()
    m.observe(TaskSubmitted(**T, goal="g"), 0.0)
    m.observe(plan(step("s1"), step("s2", ("s1",))), 0.1)
    m.observe(StepRequested(**T, step=step("s1")), 0.2)
    trips = m.observe(tool("s1", "s1-a1-i0-c0", "await_step", step_id="s2"), 0.3)
    assert [t.kind for t in trips] == ["deadlock"]
    t = trips[0]
    assert set(t.members) == {"step:s1", "call:s1-a1-i0-c0", "step:s2"} and t.action == "cancel"
    assert "step:s2 waits on step:s1 (depends_on)" in t.reason and "(await_step)" in t.reason
    assert t.closed_at == 0.3, "latency is measured from the message that closed the cycle"


def test_a_wait_that_can_be_satisfied_is_no_deadlock_and_completion_releases_it():
    m = Monitor()
    m.observe(plan(step("s1"), step("s2")), 0.0)
    m.observe(StepRequested(**T, step=step("s1")), 0.1)
    assert m.observe(tool("s1", "c1", "await_step", step_id="s2"), 0.2) == []
    w = m.tasks[("acme", "t1")]
    assert "call:c1" in dict(w.edges()["step:s1"])
    m.observe(StepCompleted(**T, step_id="s2", output="x"), 0.3)
    m.observe(ToolCompleted(**T, step_id="s1", call_id="c1", tool="await_step", ok=True, result="x"), 0.4)
    assert w.edges() == {} and w.cycle() is None


def test_an_answer_arriving_before_its_request_is_not_an_open_wait():
    """The monitor reads several streams, so order across them is not guaranteed."""
    m = Monitor()
    m.observe(plan(step("s1"), step("s2", ("s1",))), 0.0)
    m.observe(ToolCompleted(**T, step_id="s1", call_id="c1", tool="await_step", ok=True), 0.1)
    assert m.observe(tool("s1", "c1", "await_step", step_id="s2"), 0.2) == []


def test_the_same_tool_call_repeated_is_a_loop_before_the_iteration_cap():
    m = Monitor(Rules(loop_repeats=3))
    m.observe(StepRequested(**T, step=step("s1"), max_iterations=6), 0.0)
    kinds = [[t.kind for t in m.observe(tool("s1", f"c{i}", expression="2+2"), i)] for i in range(1, 5)]
    assert kinds == [[], [], ["loop"], []], "tripped once, on the third identical call"


def test_planner_checker_ping_pong_is_a_loop():
    m = Monitor()
    kinds = [[t.kind for t in m.observe(CheckRequested(**T, attempt=i, goal="g", answer="same"), i)] for i in (1, 2, 3)]
    assert kinds == [[], [], ["loop"]]
    assert m.tasks[("acme", "t1")].tripped == {"loop"}


def test_iteration_cap_counts_model_calls_per_step_attempt():
    m = Monitor()
    m.observe(StepRequested(**T, step=step("s1"), max_iterations=2), 0.0)
    assert m.observe(usage("s1", "s1-a1-i0"), 0.1) == [] and m.observe(usage("s1", "s1-a1-i1"), 0.2) == []
    assert m.observe(usage("s1", "s1-a1-i1"), 0.25) == [], "a duplicate usage record is not a call"
    assert [t.kind for t in m.observe(usage("s1", "s1-a1-i2"), 0.3)] == ["iteration_cap"]
    m2 = Monitor()
    m2.observe(StepRequested(**T, step=step("s1"), max_iterations=2), 0.0)
    for i, call in enumerate(["s1-a1-i0", "s1-a1-i1", "s1-a2-i0", "s1-a2-i1"]):
        assert m2.observe(usage("s1", call), i) == [], "a new attempt has its own cap"


def test_failing_calls_trip_the_retry_storm_once():
    """(The provider circuit the same failures open is the Redis view's: test_provider_breaker.py.)"""
    m = Monitor(Rules(retry_storm_errors=5))
    kinds = []
    for i in range(6):
        kinds += [t.kind for t in m.observe(usage("s1", f"s1-a{i}-i0-x", error="ProviderError: 503"), float(i))]
    assert kinds == ["retry_storm"]


def test_errors_spread_beyond_the_window_are_no_storm():
    m = Monitor(Rules(retry_storm_errors=3, retry_storm_window_s=10, provider_min_calls=100))
    for i in range(6):
        assert m.observe(usage("s1", f"c{i}", error="boom"), i * 20.0) == []


def test_chatter_without_completed_work_trips():
    m = Monitor(Rules(chatter_min_messages=20, chatter_ratio=10, loop_repeats=100))
    kinds = []
    for i in range(30):
        kinds += [t.kind for t in m.observe(tool("s1", f"c{i}", expression=f"{i}+1"), i * 0.1)]
    assert kinds == ["chatter"]


def test_chatter_with_steady_completions_does_not_trip():
    m = Monitor(Rules(chatter_min_messages=20, chatter_ratio=10, loop_repeats=100))
    for i in range(60):
        msg = StepCompleted(**T, step_id=f"s{i}", output="x") if i % 3 == 0 else tool("s1", f"c{i}", expression=str(i))
        assert m.observe(msg, i * 0.1) == []


def test_a_client_resubmitting_a_task_is_not_chatter():
    """Found by the chaos suite: 50 copies of one submission tripped the chatter breaker."""
    m = Monitor(Rules(chatter_min_messages=20, chatter_ratio=10))
    for i in range(50):
        assert m.observe(TaskSubmitted(**T, goal="g"), i * 0.01) == []
    assert m.observe(plan(step("s1")), 1.0) == []
    assert len(m.tasks[("acme", "t1")].chatter) == 1, "only the plan counts as an inter-agent message"


def test_stall_excludes_time_waiting_for_a_human_and_obeys_the_policy():
    m = Monitor()
    m.observe(TaskSubmitted(**T, goal="g", limits=TaskLimits(stall_timeout_s=5, stall_policy="halt")), 0.0)
    m.observe(ApprovalRequested(**T, approval_id="a1", step_id="s1", tool="send_email"), 1.0)
    assert m.tick(100.0) == [], "waiting on an approval is not a stall"
    m.observe(ApprovalDecided(**T, approval_id="a1", approved=True, decided_by="approver"), 100.0)
    assert m.tick(104.0) == []
    trips = m.tick(105.5)
    assert [(t.kind, t.action) for t in trips] == [("stall", "halt")] and "5.5 s" in trips[0].reason
    assert m.tick(200.0) == [], "reported once"


def test_deadline_and_finished_tasks():
    m = Monitor()
    m.observe(TaskSubmitted(**T, goal="g", limits=TaskLimits(deadline_s=10, stall_timeout_s=1000)), 0.0)
    assert m.tick(9.0) == [] and [t.kind for t in m.tick(10.5)] == ["deadline"]
    m2 = Monitor()
    m2.observe(TaskSubmitted(**T, goal="g", limits=TaskLimits(deadline_s=10)), 0.0)
    m2.observe(TaskCompleted(**T, answer="a"), 1.0)
    assert m2.tick(500.0) == [] and m2.observe(tool("s1", "c1"), 2.0) == []


def test_a_task_refused_and_submitted_again_is_watched_from_its_new_submission():
    """A client resubmits a refused task under the same id (``Resubmit``): the refusal ended the
    watch, the new submission opens it again (deadline counted from it), a loop in it still trips;
    a second refusal ends it again. A task that ended otherwise is not reopened by a late copy."""
    m = Monitor(Rules(loop_repeats=2))
    limits = TaskLimits(deadline_s=10, stall_timeout_s=1000)
    m.observe(TaskSubmitted(**T, goal="g", limits=limits), 0.0)
    m.observe(TaskRejected(**T, reason="over", source_subject="s", code="too_many_in_flight", retry_after_s=1), 0.1)
    assert m.tick(50.0) == [], "refused: nothing to watch"
    m.observe(TaskSubmitted(**T, goal="g", limits=limits), 60.0)
    assert m.per_tenant(60.5) == {"acme": {"running": 0, "queued": 1, "queued_s": 0.5}}, "queued for the planner"
    m.observe(plan(step("s1")), 61.0)
    m.observe(StepRequested(**T, step=step("s1")), 61.1)
    assert [t.kind for t in m.observe(StepRequested(**T, step=step("s1"), attempt=2), 61.2)] == ["loop"]
    assert m.tick(69.0) == [] and [t.kind for t in m.tick(70.5)] == ["deadline"], "ten seconds from the resubmission"

    again = Monitor()
    again.observe(TaskSubmitted(**T, goal="g", limits=limits), 0.0)
    again.observe(TaskRejected(**T, reason="over", source_subject="s", code="rate_limited", retry_after_s=1), 0.1)
    again.observe(TaskSubmitted(**T, goal="g", limits=limits), 1.5)
    again.observe(TaskRejected(**T, reason="over", source_subject="s", code="rate_limited", retry_after_s=1), 1.6)
    assert again.tick(100.0) == [] and again.per_tenant(100.0) == {}, "refused again: ended again"

    done = Monitor()
    done.observe(TaskSubmitted(**T, goal="g", limits=limits), 0.0)
    done.observe(TaskCompleted(**T, answer="a"), 1.0)
    done.observe(TaskSubmitted(**T, goal="g", limits=limits), 2.0)  # a late copy of a finished task
    assert done.tick(100.0) == [] and done.per_tenant(100.0) == {}


def test_a_gateway_retrying_one_call_is_one_failure():
    """A primary returning 503s, retried three times and then answered by a fallback model, is
    one failed logical call, not a retry storm."""
    m = Monitor(Rules(retry_storm_errors=3))
    trips = []
    for n in range(1, 4):
        trips += m.observe(usage("s1", f"s1-a1-i0-x1n{n}", error="ProviderError: 503"), 0.1 * n)
    trips += m.observe(usage("s1", "s1-a1-i0"), 0.5)
    assert trips == []
    for i in range(1, 3):  # two more logical calls failing: three in all, the storm threshold
        trips = m.observe(usage("s1", f"s1-a1-i{i}-x1n1", error="ProviderError: 503"), 1.0 + i)
    assert [t.kind for t in trips] == ["retry_storm"]


def test_failures_the_gateway_handed_on_never_make_a_retry_storm():
    m = Monitor(Rules(retry_storm_errors=2, provider_min_calls=50))
    trips = []
    for i in range(6):  # six calls, each failing on the primary and answered by the fallback
        failed = usage("s1", f"s1-a1-i{i}-x1n1", error="server_error: 503").model_copy(update={"handed_on": True})
        trips += m.observe(failed, 0.1 * i)
        trips += m.observe(usage("s1", f"s1-a1-i{i}", model="spare"), 0.1 * i + 0.05)
    assert trips == []
    trips = m.observe(usage("s1", "s1-a1-i6-x1n2", error="server_error: 503"), 1.0)
    trips += m.observe(usage("s1", "s1-a1-i7-x1n2", error="server_error: 503"), 1.1)
    assert [t.kind for t in trips] == ["retry_storm"], "failures that reached the task still count"


def test_queue_time_is_not_a_stall_and_the_stall_clock_starts_when_the_work_is_taken_up():
    """A task waiting behind other tenants' work (submitted but not yet planned, or every
    dispatched step still waiting for a worker) is queued, not stalled; once its work is taken
    up (a reservation reaching the budget, or any message about the step) the stall clock runs."""
    m = Monitor()
    m.observe(TaskSubmitted(**T, goal="g", limits=TaskLimits(stall_timeout_s=5)), 0.0)
    w = m.tasks[("acme", "t1")]
    assert m.tick(100.0) == [] and w.queued_since == 0.0, "waiting for the planner: queue time"
    m.started("acme", "t1", "plan", 100.0)  # the planner reserves for its plan call
    assert w.queued_since is None and w.queue_s == 100.0
    assert m.tick(104.0) == []
    assert [t.kind for t in m.tick(105.5)] == ["stall"], "a planner stuck after taking the task up is a stall"

    m = Monitor()
    m.observe(TaskSubmitted(**T, goal="g", limits=TaskLimits(stall_timeout_s=5)), 0.0)
    m.observe(plan(step("s1"), step("s2")), 0.5)
    m.observe(StepRequested(**T, step=step("s1")), 0.6)
    m.observe(StepRequested(**T, step=step("s2")), 0.6)
    assert m.tick(60.0) == [], "both steps wait for a worker"
    m.started("acme", "t1", "s1", 60.0)
    assert m.tick(64.0) == [] and [t.kind for t in m.tick(65.5)] == ["stall"], (
        "s1 is being worked on, s2 waits: not queued, and nothing moved for 5.5 s"
    )
    w = m.tasks[("acme", "t1")]
    assert w.queue_s == pytest.approx(0.5 + 59.4), "waiting for the planner, then for a worker"


def test_a_step_taken_up_by_any_message_about_it_leaves_the_queue_on_every_replica():
    """A replica that did not serve the step's reservation learns it started from the stream
    (its usage, a tool call, its end), and a redispatched step queues again."""
    m = Monitor()
    m.observe(TaskSubmitted(**T, goal="g", limits=TaskLimits(stall_timeout_s=5)), 0.0)
    m.observe(plan(step("s1")), 0.5)
    m.observe(StepRequested(**T, step=step("s1")), 0.6)
    assert m.tick(30.0) == []
    m.observe(usage("s1", "s1-a1-i0"), 30.0)
    assert m.tasks[("acme", "t1")].queued_since is None
    assert [t.kind for t in m.tick(35.5)] == ["stall"]

    m = Monitor()
    m.observe(TaskSubmitted(**T, goal="g", limits=TaskLimits(stall_timeout_s=5)), 0.0)
    m.observe(plan(step("s1")), 0.5)
    m.observe(StepRequested(**T, step=step("s1")), 0.6)
    m.observe(tool("s1", "s1-a1-i0-c0"), 1.0)
    m.observe(StepRequested(**T, step=step("s1"), attempt=2), 2.0)  # redispatched: back in the queue
    assert m.tick(50.0) == [] and m.tasks[("acme", "t1")].queued_since == 2.0


def test_a_task_queued_longer_than_its_max_queue_s_is_cancelled_and_queue_time_is_reported():
    m = Monitor()
    m.observe(TaskSubmitted(**T, goal="g", limits=TaskLimits(stall_timeout_s=5, max_queue_s=30)), 0.0)
    m.observe(plan(step("s1"), step("s2")), 10.0)  # 10 s waiting for the planner
    m.observe(StepRequested(**T, step=step("s1")), 10.1)
    m.observe(StepRequested(**T, step=step("s2")), 10.1)
    assert m.per_tenant(20.0) == {"acme": {"running": 0, "queued": 1, "queued_s": 19.9}}
    m.started("acme", "t1", "s1", 20.0)  # s1 taken up: running, 19.9 s of queue time so far
    assert m.per_tenant(25.0) == {"acme": {"running": 1, "queued": 0, "queued_s": 19.9}}
    m.observe(StepCompleted(**T, step_id="s1", output="x"), 24.0)  # s2 alone still waits: queued again
    assert m.tick(33.0) == [], "28.9 s queued in all: under 30, and queue time is no stall"
    trips = m.tick(35.5)
    assert [(t.kind, t.action) for t in trips] == [("queue", "cancel")]
    assert trips[0].reason == "queued too long: 31.4 s waiting to be taken up (max_queue_s 30)"
    assert m.tick(60.0) == [], "once"


def test_without_max_queue_s_a_task_may_queue_until_its_deadline():
    m = Monitor()
    m.observe(TaskSubmitted(**T, goal="g", limits=TaskLimits(stall_timeout_s=5, deadline_s=100)), 0.0)
    assert m.tick(99.0) == []
    assert [t.kind for t in m.tick(100.5)] == ["deadline"]


def test_an_ended_task_keeps_only_what_is_read_after_its_end():
    """A finished task is remembered ten minutes (``forget``), so what only the breakers and
    the wait-for graph read goes at its end: a budget following 8 tasks a second holds 4,800
    finished ones. Its labels (late usage is counted under them), trips and end stay; a late
    message folds nothing in."""
    m = Monitor(Rules(loop_repeats=2))
    m.observe(TaskSubmitted(**T, goal="g", labels={"team": "search"}), 0.0)
    m.observe(plan(step("s1"), step("s2", ("s1",))), 0.1)
    m.observe(StepRequested(**T, step=step("s1")), 0.2)
    for i in range(2):
        m.observe(tool("s1", f"s1-c{i}"), 0.3 + i)
        m.observe(usage("s1", f"s1-m{i}"), 0.35 + i)
    w = m.tasks[("acme", "t1")]
    assert w.tripped == {"loop"} and w.seen_usage and w.signatures and w.deps and w.calls
    m.observe(TaskCompleted(**T, answer="a"), 3.0)
    assert w.terminal and w.labels == {"team": "search"} and w.tripped == {"loop"} and w.trip_reasons
    left = (w.waiting, w.approvals, w.deps, w.step_status, w.step_attempt, w.step_cap, w.calls, w.done_calls,
            w.approval_of, w.signatures, w.llm_calls, w.seen_usage, w.failed_calls, w.chatter, w.completions,
            w.errors)  # fmt: skip
    assert not any(left), left
    assert m.observe(tool("s1", "s1-late"), 4.0) == [] and not w.calls, "nothing of it is folded after its end"
    assert m.per_tenant(5.0) == {}, "an ended task is neither running nor queued"
    m.forget(2.9)  # ended at 3.0: kept until it is older than what forget is given
    assert ("acme", "t1") in m.tasks and w.last_progress == 3.0
    m.forget(3.5)
    assert ("acme", "t1") not in m.tasks
