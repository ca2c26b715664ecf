"""The policy derived from the contracts: least privilege by construction."""

from __future__ import annotations

import pytest

from mesh_contracts import SERVICES
from mesh_contracts import topology as topo
from meshctl.policy import policy

pytestmark = pytest.mark.unit

POLICY = policy(["acme", "globex"])


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_holds_admin_or_wildcard_rights(service):
    p = POLICY[service]
    ephemeral_watch = {f"$JS.API.CONSUMER.CREATE.{topo.STREAMS[d]}" for d in topo.WATCHERS.get(service, ())}
    ephemeral_watch |= {f"$JS.API.CONSUMER.CREATE.KV_{b.name}" for b in topo.BUCKETS if service in b.watchers}
    for subject in p.pub:
        if subject in ephemeral_watch:
            continue  # an ephemeral, read-only ordered consumer (no name token: no durable)
        assert not subject.startswith(
            (
                "$JS.API.STREAM.CREATE",
                "$JS.API.STREAM.UPDATE",
                "$JS.API.STREAM.DELETE",
                "$JS.API.CONSUMER.CREATE",
                "$JS.API.CONSUMER.DELETE",
            )
        )
        assert subject not in (">", "$JS.API.>", "_INBOX.>")
    assert p.sub[0] == f"_INBOX_{service.replace('-', '_')}.>"
    assert all(not s.startswith("_INBOX_") or s == p.sub[0] for s in p.sub), "only its own inbox"


def test_each_durable_is_reachable_by_its_owner_only():
    for d in topo.durables():
        fetch = f"$JS.API.CONSUMER.MSG.NEXT.{d.stream}.{d.name}"
        holders = [name for name, p in POLICY.items() if fetch in p.pub]
        assert holders == [d.service]


def test_clients_are_confined_to_their_tenant():
    acme = POLICY["client.acme"]
    assert acme.pub[0] == "task.v1.acme.*.submitted"
    assert all(".acme." in s for s in acme.pub + acme.sub if not s.startswith("_INBOX_"))
    assert not any("globex" in s for s in acme.pub + acme.sub)


def test_only_the_budget_service_answers_requests():
    assert [name for name, p in POLICY.items() if p.allow_responses] == ["budget"]


def test_only_the_budget_watches_whole_streams_and_only_with_ephemeral_consumers():
    watchers = {name for name, p in POLICY.items() if any(s.startswith("$JS.API.CONSUMER.CREATE") for s in p.pub)}
    assert watchers == {*SERVICES, "approver"}, "every service follows the published trust bundle"
    for name in watchers:
        creates = [s for s in POLICY[name].pub if s.startswith("$JS.API.CONSUMER.CREATE")]
        assert creates and all(s.count(".") == 4 for s in creates), creates
        assert not [s for s in POLICY[name].pub if "CONSUMER.DELETE" in s]
    # the tool-executor and approvers watch KV buckets only (approvals; notes for note_list), never a stream
    creates = {n: [s for s in POLICY[n].pub if s.startswith("$JS.API.CONSUMER.CREATE")] for n in watchers}
    assert creates["approver"] == ["$JS.API.CONSUMER.CREATE.KV_approvals"]
    assert sorted(creates["tool-executor"]) == [
        "$JS.API.CONSUMER.CREATE.KV_approvals",
        "$JS.API.CONSUMER.CREATE.KV_notes",
        "$JS.API.CONSUMER.CREATE.KV_trust",
    ]
    for name in set(SERVICES) - {"budget", "tool-executor"}:
        assert creates[name] == ["$JS.API.CONSUMER.CREATE.KV_trust"], name
