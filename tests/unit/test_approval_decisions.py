"""Who may decide a held call, and what a decision after the task's end does (issue 36, items 3
and 4), in memory: the tool-executor's decision handler with a real approvals state machine."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_contracts.v1 import ApprovalDecided, Taint, ToolAudited, ToolCompleted, ToolRequested
from mesh_contracts.v1.records import TaskRecord
from mesh_identity import Principal, TrustBundle
from mesh_kit.delivery import Reject
from mesh_testing.fakes import FakeMesh
from mesh_testing.memkv import MemoryKV
from mesh_tool_executor.approvals import ApprovalRecord, Approvals
from mesh_tool_executor.service import ToolExecutor
from mesh_tool_executor.settings import ToolExecutorSettings

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate().public_key()
CONSOLE = Principal("approver", "approver", None, KEY)
ALICE = Principal("approver.acme.alice", "approver", "acme", KEY)
BOB = Principal("approver.globex.bob", "approver", "globex", KEY)


async def _executor(tmp_path, *principals: Principal, task_status: str = "running") -> tuple[FakeMesh, ToolExecutor]:
    settings = ToolExecutorSettings(
        service="tool-executor", signing_key_file=tmp_path / "k", trust_bundle_file=tmp_path / "b"
    )
    mesh = FakeMesh(service="tool-executor")
    mesh.settings = None  # type: ignore[attr-defined]
    mesh.verifier = SimpleNamespace(bundle=TrustBundle({p.name: p for p in principals}))  # type: ignore[attr-defined]
    ex = ToolExecutor(mesh, settings)  # type: ignore[arg-type]
    ex.tasks = MemoryKV()
    record = TaskRecord(tenant="acme", task_id="t1", goal="g", status=task_status)  # type: ignore[arg-type]
    await ex.tasks.put(TaskRecord.key("acme", "t1"), record.model_dump_json().encode())
    ex.approvals = Approvals(MemoryKV(), ex.held.settle)
    req = ToolRequested(tenant="acme", task_id="t1", step_id="s1", call_id="s1-c0", tool="note_write",
                        arguments={"note_id": "n", "text": "x"}, taint=Taint(untrusted=True, sources=("note_read:c",)))  # fmt: skip
    await ex.approvals.open(ApprovalRecord(approval_id="ap-1", tenant="acme", task_id="t1", step_id="s1",
                                           call_id=req.call_id, tool="note_write", request=req, requested_at=time.time(),
                                           deadline=time.time() + 60))  # fmt: skip
    return mesh, ex


def _decision(by: Principal, approved: bool = True) -> tuple[ApprovalDecided, SimpleNamespace]:
    m = ApprovalDecided(tenant="acme", task_id="t1", approval_id="ap-1", approved=approved, decided_by=by.name)
    return m, SimpleNamespace(sender=by, msg_id=f"m-{by.name}")


async def test_the_console_may_not_decide_for_a_tenant_that_names_approvers(tmp_path):
    mesh, ex = await _executor(tmp_path, CONSOLE, ALICE, BOB)
    with pytest.raises(Reject, match=r"tenant 'acme' names its own approvers \(approver\.acme\.alice\): approver may"):
        await ex.on_decision(*_decision(CONSOLE, approved=False))  # type: ignore[arg-type]
    assert (await ex.approvals.get("ap-1")).status == "pending", "the call still waits for alice"  # type: ignore[union-attr]
    ((tenant, task, kind, _, kw),) = mesh.audited
    assert (tenant, task, kind, kw["actor"]) == ("acme", "t1", "tool.decision-refused", "approver")
    assert kw["detail"]["approved"] is False and "names its own approvers" in kw["detail"]["reason"]
    assert not mesh.all(ToolCompleted), "nothing answered: nothing was decided"
    await ex.on_decision(*_decision(ALICE))  # type: ignore[arg-type]
    rec = await ex.approvals.get("ap-1")  # type: ignore[union-attr]
    assert (rec.status, rec.decided_by, rec.started, rec.done) == ("approved", "approver.acme.alice", True, True)


async def test_a_tenant_without_named_approvers_is_decided_by_the_console(tmp_path):
    _, ex = await _executor(tmp_path, CONSOLE, BOB)  # globex names bob; acme names nobody
    await ex.on_decision(*_decision(CONSOLE))  # type: ignore[arg-type]
    assert (await ex.approvals.get("ap-1")).decided_by == "approver"  # type: ignore[union-attr]


async def test_a_person_removed_from_the_newest_bundle_is_refused(tmp_path):
    """The bus verified alice under the bundle it held; the decision is judged under the newest
    published one, which no longer has her."""
    _, ex = await _executor(tmp_path, CONSOLE)
    with pytest.raises(Reject, match=r"approver\.acme\.alice is no longer an approver"):
        await ex.on_decision(*_decision(ALICE))  # type: ignore[arg-type]
    assert (await ex.approvals.get("ap-1")).status == "pending"  # type: ignore[union-attr]


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
async def test_a_decision_after_the_task_ended_is_recorded_void_and_performs_nothing(tmp_path, status):
    mesh, ex = await _executor(tmp_path, CONSOLE, task_status=status)
    ran: list[str] = []

    async def run_recorded(*a, **kw):
        ran.append("ran")
        return {"ok": True, "result": "saved", "error": ""}

    ex.runner.run_recorded = run_recorded  # type: ignore[method-assign]
    await ex.on_decision(*_decision(CONSOLE))  # type: ignore[arg-type]
    assert ran == [], "void: nothing performed"
    rec = await ex.approvals.get("ap-1")  # type: ignore[union-attr]
    assert (rec.status, rec.void, rec.decided, rec.decided_by, rec.done) == (
        "void", f"task ended ({status})", "approved", "approver", True)  # fmt: skip
    audit = mesh.last(ToolAudited)
    assert (audit.decision, audit.void, audit.decided_by) == ("blocked", f"task ended ({status})", "approver")
    assert audit.reasons[:2] == (f"void: task ended ({status})", "approved by approver after the task ended")
    done = mesh.last(ToolCompleted)
    assert (done.ok, done.stopped, done.error) == (
        False,
        "stopped",
        f"not run: approval ap-1 void: task ended ({status})",
    )
    assert [k for _, _, k, _, _ in mesh.audited] == ["tool.blocked"]


async def test_an_approval_whose_task_ends_before_it_is_started_is_void(tmp_path):
    """Approved while the task ran, but the end came before the effect was committed to (a crash
    in between, settled by the sweep later): void, not performed."""
    mesh, ex = await _executor(tmp_path, CONSOLE)
    await ex.approvals.decide("ap-1", "approved", "approver")  # type: ignore[union-attr]
    await ex.tasks.put(TaskRecord.key("acme", "t1"), TaskRecord(tenant="acme", task_id="t1", goal="g",
                                                                status="cancelled").model_dump_json().encode())  # fmt: skip
    await ex.held.settle(await ex.approvals.get("ap-1"))  # type: ignore[union-attr,arg-type]
    rec = await ex.approvals.get("ap-1")  # type: ignore[union-attr]
    assert (rec.status, rec.void, rec.decided, rec.started) == ("void", "task ended (cancelled)", "approved", False)
    assert mesh.last(ToolAudited).decision == "blocked"


async def test_a_started_call_is_performed_even_if_the_task_ended_since(tmp_path):
    """Started (committed while the task ran) and then a crash: the repair performs it under
    the ledger; it is never recorded void after it may have run."""
    mesh, ex = await _executor(tmp_path, CONSOLE)
    await ex.approvals.decide("ap-1", "approved", "approver")  # type: ignore[union-attr]
    await ex.approvals.commit("ap-1", None)  # type: ignore[union-attr]
    await ex.tasks.put(TaskRecord.key("acme", "t1"), TaskRecord(tenant="acme", task_id="t1", goal="g",
                                                                status="cancelled").model_dump_json().encode())  # fmt: skip
    await ex.held.settle(await ex.approvals.get("ap-1"))  # type: ignore[union-attr,arg-type]
    rec = await ex.approvals.get("ap-1")  # type: ignore[union-attr]
    assert (rec.status, rec.started, rec.void, rec.done) == ("approved", True, "", True)
    assert mesh.last(ToolCompleted).ok
