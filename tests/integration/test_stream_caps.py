"""Every stream of the mesh is bounded and, full, refuses new messages rather than forget old
ones; lowering a cap below what a stream holds keeps all of it."""

from __future__ import annotations

import nats
import pytest
from integration_helpers import connect

from mesh_contracts import topology as topo
from mesh_kit.settings import StreamFull
from meshctl.cli import main
from meshctl.provision import AUDIT_MAX_BYTES, STREAM_MAX_BYTES, Caps, provision, store_levels


async def test_every_stream_is_capped_and_refuses_new_messages_when_full(integration_infra):
    async with connect(integration_infra, "admin") as nc:
        js = nc.jetstream()
        for stream in [*topo.STREAMS.values(), topo.DLQ_STREAM]:
            cfg = (await js.stream_info(stream)).config
            assert cfg.discard == nats.js.api.DiscardPolicy.NEW, stream
            assert cfg.max_bytes == (AUDIT_MAX_BYTES if stream == "AUDIT" else STREAM_MAX_BYTES), stream


async def test_a_cap_below_what_a_stream_holds_keeps_every_message(integration_infra, unique):
    subject = f"event.v1.capped.{unique('t')}.progress"
    async with connect(integration_infra, "admin") as nc:
        js = nc.jetstream()
        for i in range(3):
            await js.publish(subject, b"{}", headers={"Nats-Msg-Id": f"{subject}:{i}"})
        before = (await js.stream_info("EVENTS")).state
        try:
            await provision(nc, caps=Caps(max_msgs=max(1, before.messages - 2)))
            after = (await js.stream_info("EVENTS")).state
            assert (after.messages, after.first_seq) == (before.messages, before.first_seq), "nothing forgotten"
            with pytest.raises(nats.js.errors.APIError) as refused:
                await js.publish(subject, b"{}", headers={"Nats-Msg-Id": f"{subject}:late"})
            full = StreamFull.of(refused.value, "EVENTS")
            assert full is not None and str(full) == (
                "stream EVENTS is full (maximum messages exceeded): nothing was stored"
            )
            levels = await store_levels(nc)
            assert levels["EVENTS"]["full"] >= 1.0 and levels["EVENTS"]["max_msgs"] == max(1, before.messages - 2)
        finally:
            await provision(nc)
        await js.publish(subject, b"{}", headers={"Nats-Msg-Id": f"{subject}:room"})  # room again
        assert (await js.stream_info("EVENTS")).config.max_msgs == -1


@pytest.mark.parametrize("flag", ["--stream-max-mib", "--audit-max-mib", "--stream-max-msgs"])
def test_a_bad_cap_is_one_line(capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["provision", flag, "-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "is 0 (no cap) or more" in err[0], err


async def test_task_records_are_kept_as_long_as_provisioning_says_and_never_less_than_their_messages(
    integration_infra,
):
    day = 86400.0
    records = {b.name for b in topo.BUCKETS if b.records}
    assert records == {"tasks", "steps", "status"}
    async with connect(integration_infra, "admin") as nc:
        js = nc.jetstream()
        try:
            await provision(nc, record_retention_s=90 * day)
            for b in topo.BUCKETS:
                max_age = (await js.stream_info(f"KV_{b.name}")).config.max_age
                want = 90 * day if b.name in records else b.ttl_s
                assert max_age == pytest.approx(want), (b.name, max_age)
            with pytest.raises(ValueError, match="less than the 7 days task messages are kept"):
                await provision(nc, record_retention_s=3 * day)
        finally:
            await provision(nc)  # the shared servers' defaults again: records kept until deleted
        for name in records:
            assert (await js.stream_info(f"KV_{name}")).config.max_age == 0, name


def test_a_record_retention_shorter_than_the_messages_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["provision", "--retention-days", "10", "--record-retention-days", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert "--record-retention-days 5 is shorter than the 10 days task messages are kept" in err[0], err
