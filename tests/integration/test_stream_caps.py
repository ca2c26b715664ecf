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
