"""Where a tenant's data lives (``mesh_contracts.lifecycle``): every stream and bucket is placed in
a data class or named as holding none, and each class's filters match the keys the services
really write, for that tenant only."""

from __future__ import annotations

import pytest

from mesh_budget.ledger import DayUsage, TaskUsage
from mesh_contracts import lifecycle
from mesh_contracts import topology as topo
from mesh_contracts.v1.records import Evidence, TaskRecord
from mesh_testing.rights import matches
from mesh_worker.checkpoint import StepRun

pytestmark = pytest.mark.unit


def test_every_stream_and_bucket_is_placed_in_a_class_or_named_as_holding_no_task_data():
    domains = [d for c in lifecycle.DATA_CLASSES for d in c.domains]
    assert sorted(domains) == sorted(topo.STREAMS), "each domain in exactly one class"
    in_classes = {b for c in lifecycle.DATA_CLASSES for b, _ in c.keys}
    assert in_classes.isdisjoint(lifecycle.NOT_TASK_DATA)
    assert in_classes | set(lifecycle.NOT_TASK_DATA) == {b.name for b in topo.BUCKETS}


def places(tenant: str) -> dict[str, list[str]]:
    return {c.name: [f"{p.stream} {p.of(tenant)}" for p in c.places()] for c in lifecycle.DATA_CLASSES}


def where(stream: str, subject: str, tenant: str) -> list[str]:
    """The classes whose places of ``tenant`` hold ``subject`` in ``stream``."""
    out = [c.name for c in lifecycle.DATA_CLASSES for p in c.places() if p.stream == stream
           and matches(p.of(tenant), subject)]  # fmt: skip
    if lifecycle.STATUS.stream == stream and matches(lifecycle.STATUS.of(tenant), subject):
        out.append("status")
    return out


@pytest.mark.parametrize(
    ("stream", "subject", "cls"),
    [
        ("TASK", "task.v1.acme.t1.submitted", "tasks"),
        ("ENVELOPES", "step.v1.acme.t1.requested", "tasks"),
        ("DLQ", "dlq.worker.step.v1.acme.t1.requested", "tasks"),
        ("EVENTS", "event.v1.acme.t1.progress", "tasks"),
        ("TOOL", "tool.v1.acme.t1.requested", "tools"),
        ("DLQ", "dlq.tool-executor.tool.v1.acme.t1.requested", "tools"),
        ("APPROVAL", "approval.v1.acme.t1.decided", "tools"),
        ("USAGE", "usage.v1.acme.t1.recorded", "usage"),
        ("AUDIT", "audit.v1.acme.t1.recorded", "audit"),
        ("KV_tasks", f"$KV.tasks.{TaskRecord.key('acme', 't1')}", "tasks"),
        ("KV_steps", f"$KV.steps.{StepRun.key('acme', 't1', 's1')}", "tasks"),
        ("KV_evidence", f"$KV.evidence.{Evidence.key('acme', 't1', 's1', 1)}", "tasks"),
        ("KV_calls", "$KV.calls.worker.acme.t1.llm.c1", "tasks"),
        ("KV_ledger", "$KV.ledger.worker.acme.t1.llm.c1", "tasks"),
        ("KV_ledger", "$KV.ledger.tool-executor.acme.t1.c1", "tools"),
        ("KV_budget", f"$KV.budget.{TaskUsage.key('acme', 't1')}", "usage"),
        ("KV_budget", f"$KV.budget.{DayUsage.key('acme', '20261128')}", "usage"),
        ("KV_reservations", "$KV.reservations.acme.t1.c1", "usage"),  # Durable.put's key
        ("KV_status", f"$KV.status.{TaskRecord.key('acme', 't1')}", "status"),
    ],
)
def test_each_place_holds_the_keys_the_services_write_for_that_tenant_only(stream, subject, cls):
    assert where(stream, subject, "acme") == [cls]
    assert where(stream, subject, "globex") == [], "another tenant's filters never match"
    assert where(stream, subject, "acm") == [], "nor a tenant whose name is a prefix"


def erased(stream: str, subject: str, tenant: str) -> bool:
    return any(p.stream == stream and matches(p.of(tenant), subject) for p in lifecycle.erasure_places())


def test_an_erasure_reaches_every_stream_and_bucket_but_the_few_it_keeps_and_says_why():
    reached = {p.stream for p in lifecycle.erasure_places()}
    every = {*topo.STREAMS.values(), topo.DLQ_STREAM, topo.ENVELOPES, topo.TIMERS, *topo.SINKS}
    every |= {f"KV_{b.name}" for b in topo.BUCKETS}
    assert reached | set(lifecycle.KEPT_ON_ERASURE) == every, every - reached - set(lifecycle.KEPT_ON_ERASURE)
    assert reached.isdisjoint(lifecycle.KEPT_ON_ERASURE), "a kept place is not purged"
    assert topo.STREAMS["audit"] in lifecycle.KEPT_ON_ERASURE, "the chain refuses purges: it is shredded instead"


@pytest.mark.parametrize(
    ("stream", "subject"),
    [
        ("TASK", "task.v1.acme.t1.submitted"),
        ("DLQ", "dlq.planner.audit.v1.acme.t1.recorded"),
        ("DLQ", "dlq.planner.timer.v1.acme.t1.w1.due"),
        ("TIMERS", "timer.v1.acme.t1.w1.at"),
        ("OUTBOX", "outbox.acme.t1.email"),
        ("KV_rag", "$KV.rag.acme.manifest"),
        ("KV_rag", "$KV.rag.acme.doc.0123456789abcdef.v1"),
        ("KV_notes", "$KV.notes.acme.n1"),
        ("KV_admission", "$KV.admission.acme"),
        ("KV_tenants", "$KV.tenants.acme"),
        ("KV_quotas", "$KV.quotas.planner.acme.TASK"),
        ("KV_workflows", "$KV.workflows.acme.wf.triage.3"),
        ("KV_releases", "$KV.releases.acme.v.7"),
        ("KV_control", "$KV.control.kill.tenant.acme"),
        ("KV_status", "$KV.status.acme.t1"),
        ("KV_calls", "$KV.calls.checker.acme.t1.llm.c1"),
    ],
)
def test_an_erasure_of_one_tenant_matches_its_keys_and_no_other_tenants(stream, subject):
    assert erased(stream, subject, "acme")
    assert not erased(stream, subject, "globex") and not erased(stream, subject, "acm")
    assert not erased(stream, subject.replace("acme", "globex"), "acme"), "nor another tenant's"
