"""Which writes the broker syncs before it acknowledges them: every work stream and every bucket
that holds work, effects or money promised is synced per message; progress events, envelopes and
recorded model calls are written back asynchronously (the write budget, README). A stream made
before with another mode keeps it (the broker cannot change it) and provisioning says so."""

from __future__ import annotations

import pytest
from integration_helpers import connect
from nats.js import api

from mesh_contracts import topology as topo
from meshctl.provision import ProvisionReport, _keeping_persist_mode, provision

pytestmark = pytest.mark.integration


def mode(cfg: api.StreamConfig) -> str:
    return str(getattr(cfg.persist_mode, "value", cfg.persist_mode) or "default")


async def test_only_what_no_guarantee_rests_on_is_written_back_asynchronously(integration_infra):
    async with connect(integration_infra, "admin") as nc:
        js = nc.jetstream()
        report = await provision(nc)  # again, as every start of a mesh does: nothing to say
        assert report.notes == []
        replicated = (await js.stream_info("TASK")).config.num_replicas > 1
        unsynced = set()
        for si in await js.streams_info():
            if mode(si.config) == "async":
                unsynced.add(si.config.name)
        expected = set() if replicated else {"EVENTS", topo.ENVELOPES, f"KV_{topo.CALLS_BUCKET}"}
        assert expected == {*topo.UNSYNCED, *(f"KV_{b.name}" for b in topo.BUCKETS if not b.synced)}
        assert unsynced == expected
        assert {"TASK", "STEP", "TOOL", "USAGE", "AUDIT", "KV_ledger", "KV_steps", "KV_tasks"}.isdisjoint(unsynced)
        assert {f"KV_{b.name}" for b in topo.BUCKETS if not b.synced} == {f"KV_{topo.CALLS_BUCKET}"}


def test_a_stream_made_with_another_mode_keeps_it_and_provisioning_says_so():
    report = ProvisionReport([], [], [])
    synced = api.StreamConfig(name="EVENTS")
    wanted = api.StreamConfig(name="EVENTS", persist_mode=api.PersistMode.ASYNC)
    kept = _keeping_persist_mode(wanted, synced, report)
    assert kept.persist_mode is None and kept.name == "EVENTS"
    assert report.notes == [
        "EVENTS was made with persist mode default, not async, and the broker cannot change it: it stays default "
        "until the stream is made again (delete it and provision)"
    ]
    as_read = api.StreamConfig(name="EVENTS", persist_mode="async")  # type: ignore[arg-type]  (nats-py reads a string)
    assert _keeping_persist_mode(wanted, as_read, report) is wanted and len(report.notes) == 1
