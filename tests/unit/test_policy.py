"""The policy derived from the contracts: least privilege by construction."""

from __future__ import annotations

import pytest

from mesh_contracts import topology as topo
from mesh_testing.rights import INTENDED, matches
from meshctl.policy import policy

pytestmark = pytest.mark.unit

POLICY = policy(["acme", "globex"])


ADMIN_ONLY = [
    # consumers: every subject form of create/update (no name, name, name+filter, legacy durable)
    "$JS.API.CONSUMER.CREATE.TASK",
    "$JS.API.CONSUMER.CREATE.TASK.planner--task-submitted",
    "$JS.API.CONSUMER.CREATE.TASK.planner--task-submitted.task.*.*.*.submitted",
    "$JS.API.CONSUMER.CREATE.KV_trust",
    "$JS.API.CONSUMER.CREATE.KV_approvals.spy.$KV.approvals.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.STEP.worker--step-requested",
    "$JS.API.CONSUMER.DELETE.USAGE.budget--usage-recorded",
    "$JS.API.CONSUMER.PAUSE.STEP.worker--step-requested",
    "$JS.API.CONSUMER.UNPIN.STEP.worker--step-requested",
    "$JS.API.CONSUMER.LEADER.STEPDOWN.STEP.worker--step-requested",
    "$JS.API.CONSUMER.LIST.TASK",
    "$JS.API.CONSUMER.NAMES.TASK",
    # streams
    "$JS.API.STREAM.CREATE.EVIL",
    "$JS.API.STREAM.UPDATE.TASK",
    "$JS.API.STREAM.DELETE.TASK",
    "$JS.API.STREAM.PURGE.TASK",
    "$JS.API.STREAM.MSG.DELETE.TASK",
    "$JS.API.STREAM.MSG.GET.RAG",
    "$JS.API.STREAM.SNAPSHOT.TASK",
    "$JS.API.STREAM.RESTORE.TASK",
    "$JS.API.STREAM.LEADER.STEPDOWN.TASK",
    "$JS.API.STREAM.PEER.REMOVE.TASK",
    "$JS.API.STREAM.INFO.KV_ledger",  # lists every service's ledger keys
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.NAMES",
    # account and cluster
    "$JS.API.INFO",
    "$JS.API.ACCOUNT.PURGE.MESH",
    "$JS.API.META.LEADER.STEPDOWN",
    "$JS.API.SERVER.REMOVE",
    # flow control of push consumers (there are none)
    "$JS.FC.TASK.x.y",
]


@pytest.mark.parametrize("principal", [p for p in POLICY if p != "admin"])
def test_jetstream_rights_are_exactly_the_hand_written_table(principal):
    got = {s for s in POLICY[principal].pub if s.startswith("$JS")}
    assert got == INTENDED[principal], (
        f"{principal}: granted but not intended {sorted(got - INTENDED[principal])}, "
        f"intended but not granted {sorted(INTENDED[principal] - got)}"
    )


KEEPERS = {"$JS.API.STREAM.PURGE.TASK", "$JS.API.STREAM.INFO.KV_ledger"}
"""Admin verbs the keeper holds: it purges a tenant's old data (and reads stream states to)."""


@pytest.mark.parametrize("principal", [p for p in POLICY if p != "admin"])
def test_no_grant_reaches_an_admin_verb(principal):
    """Checked by subject matching, so a wildcard grant that happened to cover one is caught."""
    p = POLICY[principal]
    verbs = [s for s in ADMIN_ONLY if principal != "keeper" or s not in KEEPERS]
    hits = [(g, s) for s in verbs for g in p.pub if matches(g, s)]
    assert not hits, hits
    assert not any(matches(g, s) for g in p.pub for s in ("$JS.API.X", "x", "_INBOX.x")), "no catch-all grant"
    assert p.sub[0].startswith("_INBOX_") and all(not s.startswith("_INBOX_") or s == p.sub[0] for s in p.sub), (
        "only its own inbox"
    )


def test_each_durable_is_reachable_by_its_owner_only():
    for d in topo.durables():
        fetch = f"$JS.API.CONSUMER.MSG.NEXT.{d.stream}.{d.name}"
        holders = [name for name, p in POLICY.items() if fetch in p.pub]
        assert holders == [d.service]


def test_clients_are_confined_to_their_tenant():
    acme = POLICY["client.acme"]
    assert acme.pub[0] == "door.task.v1.acme.*.submitted"
    assert all(".acme." in s for s in acme.pub + acme.sub if not s.startswith("_INBOX_"))
    assert not any("globex" in s for s in acme.pub + acme.sub)


def test_clients_write_to_no_stream_only_to_doors():
    """A tenant's client publishes nothing a stream captures: every message it writes goes through
    the door of its contract (issue 36: a client publishing on a stream subject filled TASK)."""
    stream_subjects = [f"{d}.>" for d in topo.STREAMS] + ["dlq.>", "outbox.>"]
    for name in ("client.acme", "client.globex"):
        pub = [s for s in POLICY[name].pub if not s.startswith("$JS.API.DIRECT.GET.")]
        assert pub and all(s.startswith("door.") for s in pub)
        assert not [s for s in pub for f in stream_subjects if matches(f, s.replace("*", "x"))]


def test_only_the_budget_and_the_door_keepers_answer_requests():
    keepers = {d.service for d in topo.doors()}
    assert keepers == {"planner", "rag", "tool-executor"}  # the tool-executor's: tools.change
    assert [name for name, p in POLICY.items() if p.allow_responses] == [
        s for s in POLICY if s == "budget" or s in keepers
    ]


def test_only_the_budget_reads_whole_streams_and_only_with_direct_gets():
    readers = {n for n, p in POLICY.items() if n != "admin" and any(
        s.startswith("$JS.API.DIRECT.GET.") and s.count(".") == 4 and not s.startswith("$JS.API.DIRECT.GET.KV_")
        for s in p.pub)}  # fmt: skip
    # the keeper: one message at a time, where a tenant's data is cut; the edge and the A2A gateway:
    # one task's stored events in order (its tenants' content is what it streams to their people)
    assert readers == {"budget", "keeper", "edge", "a2a"}
    assert {s.rsplit(".", 1)[1] for s in POLICY["budget"].pub if s.startswith("$JS.API.DIRECT.GET.")
            and s.count(".") == 4 and not s.startswith("$JS.API.DIRECT.GET.KV_")} == {
        topo.STREAMS[d] for d in topo.WATCHERS["budget"]} | {topo.ENVELOPES}  # fmt: skip


def test_the_budget_reads_no_stream_that_holds_tenant_content():
    """Issue 36: a bare direct get reads anything its stream holds. The budget holds one only on
    its usage records and on ENVELOPES (headers, never a body), and follows no content stream's
    republished feed."""
    budget = POLICY["budget"]
    content = [topo.STREAMS[d] for d in topo.ENVELOPED]
    assert not [s for s in budget.pub if any(s.startswith(f"$JS.API.DIRECT.GET.{c}") for c in content)]
    assert not [s for s in budget.sub if any(s == topo.watch_feed(c) for c in content)]
    assert topo.watch_feed(topo.ENVELOPES) in budget.sub


def test_the_checker_reads_no_stream():
    # (STREAM.INFO is caps, max_age and counts, never a message: what it stores for a tenant, its
    # dead letters too, counts against the tenant's quota, a share of those caps)
    assert not [s for s in POLICY["checker"].pub if s.startswith(("$JS.API.STREAM.", "$JS.API.DIRECT.GET.")) and
                not s.startswith(("$JS.API.DIRECT.GET.KV_", "$JS.API.STREAM.INFO."))]  # fmt: skip
    # Besides STREAM.INFO, one read of a key from its stream's leader: the budget's, on the
    # content-free status bucket (a direct get may be answered by a replica still catching up).
    assert [
        (p.principal, s)
        for p in POLICY.values()
        for s in p.pub
        if s.startswith("$JS.API.STREAM.")
        and p.principal not in ("admin", "keeper")
        and not s.startswith("$JS.API.STREAM.INFO.")
    ] == [("budget", "$JS.API.STREAM.MSG.GET.KV_status")], "STREAM.INFO is the only other stream verb anyone holds"
    # (the keeper's purges: test_only_the_keeper_purges_and_never_the_audit_chain)


def test_the_door_keepers_and_only_they_read_the_whole_quota_book():
    quotas = next(b for b in topo.BUCKETS if b.name == "quotas")
    assert set(quotas.scanners) == {d.service for d in topo.doors()}


def test_only_the_keeper_purges_and_never_the_audit_chain():
    purgers = {n for n, p in POLICY.items() if n != "admin" and any("STREAM.PURGE" in s for s in p.pub)}
    assert purgers == {"keeper"}
    keeper = POLICY["keeper"]
    assert not any(matches(g, "$JS.API.STREAM.PURGE.AUDIT") for g in keeper.pub)
    messages = [s for s in keeper.pub if not s.startswith("$JS.API.")]
    assert messages == ["audit.v1.*.*.recorded"], "it publishes nothing but its links of the audit chain"
    assert keeper.sub == ["_INBOX_keeper.>"]
