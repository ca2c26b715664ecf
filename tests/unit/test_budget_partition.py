"""Splitting the budget monitor's work by tenant (``MESH_BUDGET_PARTITIONS``): which replica
follows which tenant, how a replica learns its partition, and how ``meshctl`` adds the
partitions' status reports up."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from mesh_budget.accounts import Accounts
from mesh_budget.ledger import DayUsage, TaskUsage, today
from mesh_budget.partition import Partition, from_settings, mark_keys
from mesh_contracts.v1 import BudgetStatusReport, TenantTasks, UsageRecorded
from mesh_testing.memkv import MemoryKV
from meshctl.ask import merge_reports


def test_every_tenant_belongs_to_exactly_one_partition_and_the_split_is_even():
    tenants = [f"tenant-{i}" for i in range(4000)]
    for n in (1, 2, 3, 5):
        parts = [Partition(i, n) for i in range(n)]
        owners = Counter()
        for t in tenants:
            mine = [p.index for p in parts if p.owns(t)]
            assert len(mine) == 1, (t, n, mine)
            owners[mine[0]] += 1
        # a stable hash: each partition within 10% of its share
        assert all(abs(c - len(tenants) / n) < 0.1 * len(tenants) / n for c in owners.values()), owners


def test_the_one_partition_keeps_the_mark_it_always_had_and_each_of_several_has_its_own():
    assert Partition().mark_key == "accounts"
    keys = {Partition(i, 3).mark_key for i in range(3)}
    assert keys == {"accounts.0-of-3", "accounts.1-of-3", "accounts.2-of-3"}
    assert keys <= set(mark_keys()) and mark_keys()[0] == "accounts"


def test_the_partition_comes_from_the_setting_or_the_statefulset_ordinal():
    assert from_settings(1, None, hostname="anything") == Partition(0, 1)
    assert from_settings(3, None, hostname="budget-2") == Partition(2, 3)
    assert from_settings(3, 1, hostname="budget-2") == Partition(1, 3)  # the setting wins
    with pytest.raises(ValueError, match=r"needs MESH_BUDGET_PARTITION .* this host is 'laptop'"):
        from_settings(2, None, hostname="laptop")
    # A StatefulSet of 2N pods: two replicas of each partition (a standby each).
    assert [from_settings(2, None, hostname=f"budget-{i}").index for i in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="must be 0 to 1 with 2 partitions, not 2"):
        from_settings(2, 2, hostname="budget-0")


def _report(replica: str, partition: int, partitions: int, tenants: dict, trips: dict) -> BudgetStatusReport:
    return BudgetStatusReport(
        tenant="_mesh", task_id="status", replica=replica, started_at=100.0 + partition,
        tenants={t: TenantTasks(running=r, queued=q, queued_s=s) for t, (r, q, s) in tenants.items()},
        trips=trips, partition=partition, partitions=partitions,
    )  # fmt: skip


def test_status_reports_add_up_over_partitions_and_not_over_replicas_of_one():
    reports = [
        # partition 0, two replicas: the same tenants and trips (one acted on a trip the other not yet)
        _report("b-0", 0, 2, {"acme": (2, 1, 0.5)}, {"loop": 2, "stall": 1}),
        _report("b-0b", 0, 2, {"acme": (2, 1, 0.5)}, {"loop": 1, "stall": 1}),
        _report("b-1", 1, 2, {"globex": (0, 3, 4.0)}, {"loop": 1, "deadlock": 1}),
    ]
    merged = merge_reports(reports)
    assert {t: (v.running, v.queued) for t, v in merged.tenants.items()} == {"acme": (2, 1), "globex": (0, 3)}
    assert merged.trips == {"loop": 3, "stall": 1, "deadlock": 1}
    assert merged.partitions == 2 and merged.replica == "b-0, b-0b, b-1" and merged.started_at == 100.0
    # one partition, two replicas: as before, the numbers of either (not their sum)
    one = merge_reports([_report("a", 0, 1, {"acme": (1, 0, 0.0)}, {"loop": 1}),
                         _report("b", 0, 1, {"acme": (1, 0, 0.0)}, {"loop": 1})])  # fmt: skip
    assert one.trips == {"loop": 1} and one.tenants["acme"].running == 1


# --------------------------------------------------------------------------- spend records, partitioned


def _usage(tenant: str, task: str, call: str) -> UsageRecorded:
    return UsageRecorded(tenant=tenant, task_id=task, agent="worker", step_id="s1", call_id=call,
                         provider="scripted", model="scripted-1", input_tokens=60, output_tokens=40)  # fmt: skip


async def _no_labels(_tenant: str, _task: str) -> dict[str, str]:
    return {}


async def _fold_all(accounts: Accounts, stream: list[UsageRecorded], start: int, at: float) -> None:
    for seq, m in enumerate(stream, start=1):
        if seq > start:
            await accounts.fold(m, seq, at)
    accounts.position = max(accounts.position, len(stream))


async def test_partitions_write_only_their_tenants_records_and_carry_on_from_the_single_budgets_mark():
    kv, at = MemoryKV(), time.time()
    tenants = ["acme", "globex", "soylent", "wayne"]  # acme, globex: partition 0 of 2; soylent, wayne: 1
    stream = [_usage(t, f"{t}-t{i % 3}", f"c{i}") for i in range(60) for t in tenants[i % 4 : i % 4 + 1]]
    half = 30

    # One budget (one partition) folds the first half and checkpoints: the legacy mark.
    one = Accounts(kv, _no_labels)
    await one.start(lambda: _const(0))
    await _fold_all(one, stream[:half], 0, at)
    await one.checkpoint()
    assert json.loads((await kv.get("accounts")).value)["through"] == half

    # The budget is split in two. Each partition starts from the mark the single budget left,
    # folds the whole stream, and writes only its own tenants' records.
    parts = [Accounts(kv, _no_labels, partition=Partition(i, 2)) for i in range(2)]
    for p in parts:
        assert await p.start(lambda: _const(len(stream))) == half  # not the end of the stream: nothing skipped
    for p in parts:
        await _fold_all(p, stream, half, at)
    written = [await p.checkpoint() for p in parts]
    assert all(n > 0 for n in written)
    for i, p in enumerate(parts):
        assert json.loads((await kv.get(f"accounts.{i}-of-2")).value)["through"] == len(stream)
        owned = {k[0] for k in p.tasks}
        assert owned and all(Partition(i, 2).owns(t) for t in owned), owned

    # Every call counted exactly once, in its task's record and in its tenant's day.
    for t in tenants:
        for task in {m.task_id for m in stream if m.tenant == t}:
            rec = json.loads((await kv.get(TaskUsage.key(t, task))).value)
            assert rec["total"]["calls"] == sum(1 for m in stream if m.task_id == task)
        day = json.loads((await kv.get(DayUsage.key(t, today(at)))).value)
        assert day["total"]["calls"] == sum(1 for m in stream if m.tenant == t)


async def _const(n: int) -> int:
    return n
