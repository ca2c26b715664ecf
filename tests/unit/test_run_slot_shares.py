"""Run slots (``mesh_planner.admission.may_start``): the mesh runs at most so many tasks at once,
shared fairly among the tenants that want them; a tenant under its share is never kept waiting."""

from __future__ import annotations

import random

from mesh_contracts.v1.records import AdmissionRecord
from mesh_planner.admission import may_start


def rec(running: int, waiting: int = 0, prefix: str = "t") -> AdmissionRecord:
    ids = [f"{prefix}{i}" for i in range(running + waiting)]
    return AdmissionRecord(in_flight=dict.fromkeys(ids, 1e12), running=dict.fromkeys(ids[:running], 1e12))


def test_alone_a_tenant_takes_every_slot_and_no_more():
    assert may_start("a", {"a": rec(3, 5)}, slots=4)
    assert not may_start("a", {"a": rec(4, 5)}, slots=4)


def test_a_tenant_under_its_share_starts_even_when_another_holds_every_slot():
    view = {"burst": rec(4, 100), "quiet": rec(0, 1)}
    assert may_start("quiet", view, slots=4), "its share is 2: it is not kept behind the burst"
    assert not may_start("burst", view, slots=4)


def test_a_free_slot_goes_to_the_tenant_under_its_share():
    # 3 of 4 slots taken: burst holds 3 (over its share of 2), quiet 0 and waits
    view = {"burst": rec(3, 50), "quiet": rec(0, 2)}
    assert not may_start("burst", view, slots=4), "quiet waits under its share: the slot is quiet's"
    assert may_start("quiet", view, slots=4)
    # nobody else waits: the burst may use the free slot beyond its share
    assert may_start("burst", {"burst": rec(3, 50), "quiet": rec(1, 0)}, slots=5)


def test_woken_tasks_count_as_running():
    view = {"a": rec(1, 3)}
    assert may_start("a", view, slots=2)
    assert not may_start("a", view, slots=2, woken={"a": 1})


def test_idle_tasks_hold_no_slot_and_do_not_make_their_tenant_want_one():
    """Tasks waiting for the world (``AdmissionRecord.idle``) are in flight but neither run nor queue."""
    waiting_on_approvals = AdmissionRecord(
        in_flight=dict.fromkeys(["a", "b", "c"], 1e12), idle=dict.fromkeys("abc", 1e12)
    )
    view = {"approvals": waiting_on_approvals, "other": rec(1, 1, prefix="o")}
    assert may_start("other", view, slots=2), "alone in wanting slots: both are its"
    assert may_start("approvals", view, slots=2), "its share: one of two"
    # Were they queued instead, the other tenant would be held to its share (1) while they wait.
    queued = AdmissionRecord(in_flight=dict.fromkeys(["a", "b", "c"], 1e12))
    assert not may_start("other", {"approvals": queued, "other": rec(1, 1, prefix="o")}, slots=2)


def test_a_share_is_at_least_one_so_every_tenant_can_run():
    view = {f"t{i}": rec(0, 1, prefix=f"t{i}-") for i in range(10)}
    assert all(may_start(t, view, slots=2) for t in view)


def test_property_drained_fairly_every_tenant_within_its_share_and_the_cap_passed_only_by_tenants_under_it():
    """Random arrivals and ends: a tenant at its share never starts past the cap, and while
    tasks wait every tenant that waits holds at least min(share, what it wants)."""
    rnd = random.Random(7)
    for _ in range(200):
        slots = rnd.randint(1, 8)
        tenants = [f"t{i}" for i in range(rnd.randint(1, 5))]
        view = {t: rec(0, rnd.randint(0, 20), prefix=f"{t}-") for t in tenants}
        for _ in range(100):
            t = rnd.choice(tenants)
            r = view[t]
            waiting = [x for x in r.in_flight if x not in r.running]
            if waiting and rnd.random() < 0.6:
                before = sum(len(v.running) for v in view.values())
                active = [u for u, v in view.items() if v.in_flight]
                share = max(1, slots // len(active))
                if may_start(t, view, slots):
                    assert before < slots or len(r.running) < share, (slots, t, view)
                    r.running[waiting[0]] = 1e12
            elif r.running and rnd.random() < 0.5:
                done = next(iter(r.running))
                del r.running[done], r.in_flight[done]
            # Work conserving: a slot is never left free while some waiting task may take it.
            total = sum(len(v.running) for v in view.values())
            wanting = [u for u, v in view.items() if len(v.in_flight) > len(v.running)]
            if total < slots and wanting:
                assert any(may_start(u, view, slots) for u in wanting), (slots, view)


def test_a_tenant_really_alone_may_run_more_and_one_between_two_tasks_still_counts():
    """``MESH_RUN_SLOTS_ALONE``: a lone tenant keeps its throughput; a tenant with a task in flight,
    or one that ended within ``RECENT_S`` (it sends one task after another), makes it not alone."""
    from mesh_planner.admission import RECENT_S

    now = 1_000_000.0
    assert may_start("burst", {"burst": rec(7, 90)}, slots=1, alone=8, now=now)
    assert not may_start("burst", {"burst": rec(8, 90)}, slots=1, alone=8, now=now)
    between = AdmissionRecord(last_ended_at=now - RECENT_S / 2)  # nothing in flight, ended a moment ago
    assert not may_start("burst", {"burst": rec(1, 90), "steady": between}, slots=1, alone=8, now=now)
    assert may_start("steady", {"burst": rec(1, 90), "steady": between}, slots=1, alone=8, now=now)
    gone = AdmissionRecord(last_ended_at=now - RECENT_S * 2)
    assert may_start("burst", {"burst": rec(1, 90), "steady": gone}, slots=1, alone=8, now=now)
    assert not may_start("burst", {"burst": rec(1, 90), "steady": rec(1)}, slots=1, alone=8, now=now)
