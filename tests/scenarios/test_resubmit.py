"""Resubmission after a refusal, through the real mesh (issue 37): a client that opts in
(``Resubmit``, ``meshctl submit --retry N``) waits each refusal's retry-after and submits the same
task again under the same task id. A burst far over a tenant's tasks in flight ends with every
task completed exactly once: one plan, one outcome, one admission per task id, however many
submissions each took. Refusals that waiting cannot cure, or whose wait is past the client's
bounds, are not retried. ``meshctl submit`` without ``--follow`` says when it was refused."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from mesh_contracts.v1 import TaskCompleted, TaskRejected, TaskSubmitted
from mesh_contracts.v1.records import AdmissionRecord
from mesh_kit import envelope as env
from mesh_testing.chaos import ChaosMesh, started
from mesh_testing.infra import Infra, running_infra
from meshctl.cli import main
from meshctl.submission import Resubmit

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
LIMITS = {
    "acme": {"max_in_flight": 3, "rate_per_s": 0},
    "initech": {"max_in_flight": 0, "rate_per_s": 0.1, "burst": 1},  # a token every 10 s
    "umbrella": {"max_in_flight": 0, "rate_per_s": 0.1, "burst": 1},
}
ENV = {
    "MESH_ACK_WAIT_S": "2",
    "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]",
    "MESH_LOG_LEVEL": "WARNING",
    "MESH_ADMISSION_TENANTS": json.dumps(LIMITS),
    # hooli's whole TASK quota is smaller than one submission: refused for good, retry-after 0
    "MESH_QUOTA_TENANTS": json.dumps({"hooli": {"TASK": {"mib": 0.0004}}}),
}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex", "hooli", "initech", "umbrella"], name="resubmit", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


async def _task_messages(infra: Infra, tenant: str) -> tuple[Counter[tuple[str, str]], dict[str, set[str]]]:
    """(task id, event) -> messages stored in TASK, and each task's submissions' message ids."""
    counts: Counter[tuple[str, str]] = Counter()
    ids: dict[str, set[str]] = {}
    for m in await infra.stored("TASK", f"task.*.{tenant}.>"):
        _, _, _, task, event = m.subject.split(".")
        counts[(task, event)] += 1
        if event == "submitted":
            ids.setdefault(task, set()).add((m.headers or {}).get(env.MSG_ID, ""))
    return counts, ids


async def _admission(infra: Infra, tenant: str) -> AdmissionRecord:
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value(AdmissionRecord.bucket)
        return AdmissionRecord.model_validate_json((await kv.get(tenant)).value)
    finally:
        await nc.close()


async def test_a_burst_with_resubmission_completes_every_task_exactly_once(infra, mesh):
    """12 tasks at once against 3 in flight: most are refused at first (too_many_in_flight) and
    come back when told, spread over the tenant's drain; every one completes, and each task id
    has one plan, one completion, one admission, and as many stored submissions (each under its
    own message id) and refusals as its client saw."""
    n = 12
    async with infra.client("acme") as c:
        seen = await asyncio.gather(*(
            c.submit(GOAL, task_id=f"again-{i}", progress=False, timeout=300,
                     resubmit=Resubmit(attempts=40, max_wait_s=240))
            for i in range(n)
        ))  # fmt: skip

    outcomes = {s.task_id: s.outcome for s in seen}
    assert all(isinstance(o, TaskCompleted) for o in outcomes.values()), {
        t: getattr(o, "reason", None) for t, o in outcomes.items() if not isinstance(o, TaskCompleted)
    }
    refused = [r for s in seen for r in s.refusals]
    assert len([s for s in seen if s.refusals]) >= n - 3, "all but the first three were refused at first"
    assert {r.code for r in refused} == {"too_many_in_flight"}
    first = sorted(s.refusals[0].retry_after_s or 0 for s in seen if s.refusals)
    assert len(set(first)) == len(first), f"the burst's first refusals were told different waits: {first}"

    counts, msg_ids = await _task_messages(infra, "acme")
    for s in seen:
        t = s.task_id
        assert counts[(t, "planned")] == 1 and counts[(t, "completed")] == 1, (t, counts)
        assert counts[(t, "failed")] == 0
        assert counts[(t, "submitted")] == s.attempts == len(s.refusals) + 1, (t, counts, s.attempts)
        assert counts[(t, "rejected")] == len(s.refusals), (t, counts)
        assert len(msg_ids[t]) == s.attempts, "each attempt under a message id of its own: none deduplicated away"
    record = await _admission(infra, "acme")
    assert record.admitted == n and record.in_flight == {}, "each task admitted once, and released"


async def test_a_resubmission_of_a_task_already_admitted_is_the_same_task(infra, mesh):
    """The guarantee does not rest on the client: an attempt of a task in flight joins it, and a
    late attempt of a task that ended (under a message id of its own, so the stream keeps it) is
    taken for a copy: admitted and released at once, never planned again."""
    async with infra.client("globex") as c:
        first, second = await asyncio.gather(
            c.submit(GOAL, task_id="twice", progress=False, timeout=120),
            c.submit(GOAL, task_id="twice", progress=False, timeout=120, resubmit=Resubmit(1)),
        )
        assert isinstance(first.outcome, TaskCompleted) and isinstance(second.outcome, TaskCompleted)
        before = (await _admission(infra, "globex")).admitted
        await c.publish(TaskSubmitted(tenant="globex", task_id="twice", goal=GOAL), key="7")
    deadline = time.monotonic() + 60
    while (await _admission(infra, "globex")).admitted == before:  # the planner has handled it
        assert time.monotonic() < deadline, "the planner never took the late attempt up"
        await asyncio.sleep(0.2)
    counts, _ = await _task_messages(infra, "globex")
    assert counts[("twice", "planned")] == 1 and counts[("twice", "completed")] == 1, counts
    assert counts[("twice", "submitted")] == 2, "the first two were one message (the same id); then the late one"
    assert (await _admission(infra, "globex")).in_flight == {}, "the copy was released"


async def test_refusals_that_waiting_cannot_cure_or_that_are_past_the_bounds_are_not_retried(infra, mesh):
    async with infra.client("hooli") as c:
        big = await c.submit(GOAL, task_id="too-big", progress=False, timeout=30, resubmit=Resubmit(5, 60))
    assert isinstance(big.outcome, TaskRejected) and big.outcome.code == "quota_exceeded", big.outcome
    assert not big.outcome.retry_after_s and big.attempts == 1 and not big.refusals
    assert "larger than the tenant's whole quota" in big.outcome.reason

    async with infra.client("umbrella") as c:  # a token every 10 s: the second waits longer than 1 s
        spent = await c.submit(GOAL, task_id="spent", follow=False, refusal_wait_s=60)
        late = await c.submit(GOAL, task_id="late", progress=False, timeout=60, resubmit=Resubmit(5, max_wait_s=1))
    assert spent.taken_up and spent.outcome is None, spent.outcome
    assert isinstance(late.outcome, TaskRejected) and late.outcome.code == "rate_limited", late.outcome
    assert (late.outcome.retry_after_s or 0) > 1 and late.attempts == 1 and not late.refusals
    counts, _ = await _task_messages(infra, "hooli")
    assert counts[("too-big", "submitted")] == 0, "refused at the door: nothing stored"
    counts, _ = await _task_messages(infra, "umbrella")
    assert counts[("late", "submitted")] == 1 and counts[("late", "rejected")] == 1, counts


def _ctl(infra: Infra, *args: str) -> int:
    return main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


async def test_meshctl_submit_retry_resubmits_and_without_follow_says_it_was_refused(infra, mesh, capsys):
    async with infra.client("initech") as c:  # its one token spent: the next is 10 s away
        assert (await c.submit(GOAL, task_id="spend", follow=False, refusal_wait_s=60)).taken_up

    # Without --follow: the planner's refusal comes shortly after the submission is stored.
    code = await asyncio.to_thread(_ctl, infra, "submit", GOAL, "--tenant", "initech", "--task-id", "nofollow",
                                   "--refusal-wait", "60")  # fmt: skip
    out = capsys.readouterr()
    assert code == 4 and out.out == "", (code, out)
    assert "refused nofollow (rate_limited)" in out.err and "retry after" in out.err, out.err

    # --retry: refused, waits its turn of the bucket, resubmitted, completed; exit 0.
    code = await asyncio.to_thread(_ctl, infra, "submit", GOAL, "--tenant", "initech", "--task-id", "retried",
                                   "--follow", "--retry", "3", "--timeout", "120")  # fmt: skip
    out = capsys.readouterr()
    assert code == 0 and "completed retried" in out.out, (code, out)
    assert "refused before: rate_limited" in out.out, out.out

    # Not refused: the id alone, once the planner took it up.
    code = await asyncio.to_thread(_ctl, infra, "submit", GOAL, "--tenant", "globex", "--task-id", "quiet",
                                   "--refusal-wait", "60")  # fmt: skip
    out = capsys.readouterr()
    assert code == 0 and out.out == "quiet\n" and out.err == "", out
