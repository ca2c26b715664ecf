"""Credentials rotate and are revoked while the mesh works (issue 21).

Rotation: every service gets a new NATS user and a new signing key while 100 tasks run. Nothing
may be lost and nothing refused for identity; after the grace period the old NATS credentials
are refused by the server and a message signed with an old key is refused by its consumer.

Revocation: a tenant's client is revoked; its connection is dropped within seconds, it cannot
reconnect, and a message it signed that was still waiting in a stream is refused when consumed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator

import nats
import pytest

from mesh_contracts import SERVICES
from mesh_contracts.v1 import TaskCompleted, TaskSubmitted, ToolRequested
from mesh_identity import CLOCK_LEEWAY_S, Signer
from mesh_kit import envelope as env
from mesh_kit.settings import inbox_prefix, nats_servers
from mesh_testing.chaos import ChaosMesh, report
from mesh_testing.infra import Infra, running_infra
from meshctl import local
from meshctl.rotation import revoke, rotate

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
TASKS = 100
GRACE_S = 6.0
ENV = {"MESH_ACK_WAIT_S": "2.0", "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]", "MESH_LOG_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    # binaries: the test reloads the servers' configs (revocations) by signal
    with running_infra(["acme", "globex"], name="identity", ack_wait_s=2.0, mode="binaries") as infra:
        yield infra


async def identity_rejections(infra: Infra) -> list[str]:
    """Reasons of every dead letter refused for identity, anywhere in the mesh."""
    return [
        (m.headers or {}).get(env.DLQ_REASON, "")
        for m in await infra.stored("DLQ", "dlq.>")
        if (m.headers or {}).get(env.DLQ_REASON, "").startswith("identity")
    ]


async def connect_as(infra: Infra, creds: str, principal: str, **kw: object) -> nats.NATS:
    return await nats.connect(
        nats_servers(infra.nats_url), user_credentials=creds, allow_reconnect=False, connect_timeout=3,
        inbox_prefix=inbox_prefix(principal), tls=infra.ids.tls_context(), **kw,
    )  # fmt: skip


def reload(infra: Infra) -> None:
    assert local.reload_nats(infra.nodes) == len(infra.nodes)


async def test_rotating_every_service_under_load_loses_nothing_and_the_old_credentials_stop_working(infra, tmp_path):
    mesh = ChaosMesh(infra, env=ENV)
    mesh.start()
    await mesh.ready()
    old_creds = {s: str(shutil.copy(infra.ids.creds(s), tmp_path / f"{s}.creds")) for s in SERVICES}
    old_worker_key = Signer.from_file("worker", infra.ids.signing_key("worker"))
    dropped: list[float] = []

    async def on_disconnect() -> None:
        dropped.append(time.monotonic())

    # a connection with the old worker credentials, held open across the rotation
    held = await connect_as(infra, old_creds["worker"], "worker", disconnected_cb=on_disconnect)
    try:
        async with infra.client("acme") as c:
            t0 = time.monotonic()
            runs = [asyncio.create_task(c.submit(GOAL, task_id=f"rot-{i}", timeout=240)) for i in range(TASKS)]
            await asyncio.sleep(1.0)  # tasks in every stage when the rotation starts
            rotation = await rotate(infra.ids, SERVICES, nats_servers(infra.nats_url), grace_s=GRACE_S,
                                    reload=lambda: reload(infra), say=lambda _: None)  # fmt: skip
            revoked_at = time.monotonic()
            done = await asyncio.gather(*runs)
            wall = time.monotonic() - t0
            after = await c.submit(GOAL, task_id="rot-after", timeout=60)

        completed = [r for r in done if isinstance(r.outcome, TaskCompleted)]
        lost = [(r.task_id, getattr(r.outcome, "reason", r.outcome)) for r in done if r not in completed]
        refused = await identity_rejections(infra)

        # the old NATS user is refused by the server, and its held connection was dropped
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect_as(infra, old_creds["worker"], "worker")
        deadline = time.monotonic() + 10
        while not dropped and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        # every service has the final bundle in force (re-read every second; said here, not
        # left to show as a message accepted under the overlap bundle)
        deadline, behind = time.monotonic() + 15, {}
        while time.monotonic() < deadline:
            now = {name: (await mesh_status(proc)).get("trust_revision") for name, (_, proc) in mesh.procs.items()}
            behind = {name: r for name, r in now.items() if r != rotation.revision_final}
            if not behind:
                break
            await asyncio.sleep(0.2)
        assert not behind, f"still on an older trust bundle than revision {rotation.revision_final}: {behind}"

        # a message signed with the retired worker key, published (with the worker's new
        # credentials) once the clock leeway after its retirement has passed, is refused by its
        # consumer. Within the leeway it still verifies: a message stored then may have been
        # signed just before (the mesh now finishes the 100 tasks that soon after the rotation).
        await asyncio.sleep(max(0.0, revoked_at + CLOCK_LEEWAY_S + 0.5 - time.monotonic()))
        req = ToolRequested(tenant="acme", task_id="rot-old-key", step_id="s1", call_id="c1", tool="calculator",
                            arguments={"expression": "1+1"})  # fmt: skip
        body, mid = req.to_bytes(), env.message_id(req.type, "acme", "rot-old-key", "c1")
        nc = await connect_as(infra, str(infra.ids.creds("worker")), "worker")
        try:
            await nc.jetstream().publish(req.subject(), body, headers={
                env.IDENTITY: old_worker_key.token(tenant="acme", msg_type=req.type, body=body, msg_id=mid),
                env.MSG_ID: mid})  # fmt: skip
        finally:
            await nc.close()
        deadline, late = time.monotonic() + 15, []
        while not late and time.monotonic() < deadline:
            late = [r for r in await identity_rejections(infra) if "retired" in r]
            await asyncio.sleep(0.2)
        statuses = {name.rsplit("-", 1)[0]: await mesh_status(proc) for name, (_, proc) in mesh.procs.items()}
        admin = await infra.admin()
        try:
            tool_durable = await admin.jetstream().consumer_info("TOOL", "tool-executor--tool-requested")
        finally:
            await admin.close()
    finally:
        await held.close()
        await mesh.stop()

    switched = {name: s.get("counters", {}).get("mesh.identity.key_rotated", 0) for name, s in statuses.items()}
    report(
        "rotate every service under load",
        tasks=TASKS,
        completed=len(completed),
        lost=len(lost),
        rejected_for_identity=len(refused),
        services_rotated=len(SERVICES),
        services_switched_keys=sum(1 for v in switched.values() if v),
        grace_s=GRACE_S,
        rotation_s=rotation.seconds,
        old_connection_dropped_after_revocation_s=round(dropped[0] - revoked_at, 3) if dropped else None,
        wall_s=round(wall, 1),
        bundle_revisions=[rotation.revision_overlap, rotation.revision_final],
    )
    assert lost == [], lost[:5]
    assert refused == [], refused[:5]
    assert isinstance(after.outcome, TaskCompleted), "the mesh works on the new credentials"
    assert all(switched.values()), switched
    assert dropped, "the held connection with the old credentials was dropped"
    assert late and "signature invalid for worker (forged, or signed with a retired key)" in late[0], (
        late, statuses.get("tool-executor", {}).get("counters"), tool_durable,
    )  # fmt: skip


async def mesh_status(proc: local.Proc) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(f"http://127.0.0.1:{proc.http_port}/status")).json()


async def test_a_revoked_client_is_dropped_within_seconds_and_its_waiting_messages_are_refused(infra, tmp_path):
    mesh = ChaosMesh(infra, env=ENV)
    mesh.start()
    await mesh.ready()
    creds = str(shutil.copy(infra.ids.creds("client.globex"), tmp_path / "globex.creds"))
    signer = Signer.from_file("client.globex", infra.ids.signing_key("client.globex"))
    dropped: list[float] = []

    async def on_disconnect() -> None:
        dropped.append(time.monotonic())

    try:
        # a task the client handed in waits in the stream: the door stored it (as it does, with the
        # client's own token) and the planner died before it took the task up
        mesh.kill("planner-0")
        client = await connect_as(infra, creds, "client.globex", disconnected_cb=on_disconnect)
        msg = TaskSubmitted(tenant="globex", task_id="waiting", goal="What is 6 * 7?")
        body, mid = msg.to_bytes(), env.message_id(msg.type, "globex", "waiting", "1")
        door = await connect_as(infra, str(infra.ids.creds("planner")), "planner")
        try:
            await door.jetstream().publish(msg.subject(), body, headers={
                env.IDENTITY: signer.token(tenant="globex", msg_type=msg.type, body=body, msg_id=mid),
                env.MSG_ID: mid, env.SCHEMA: msg.schema_id()})  # fmt: skip
        finally:
            await door.close()
        t0 = time.monotonic()
        await revoke(infra.ids, "client.globex", nats_servers(infra.nats_url), reload=lambda: reload(infra))
        while not dropped and time.monotonic() - t0 < 60:  # a deadline to give up at, not a bound
            await asyncio.sleep(0.05)
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect_as(infra, creds, "client.globex")
        await mesh.replace("planner-0")
        deadline, refused = time.monotonic() + 20, []
        while not refused and time.monotonic() < deadline:
            refused = [r for r in await identity_rejections(infra) if "client.globex" in r]
            await asyncio.sleep(0.2)
        async with infra.client("acme") as c:  # everyone else carries on
            other = await c.submit("What is 6 * 7?", task_id="after-revoke", timeout=60)
    finally:
        await client.close()
        await mesh.stop()
    report(
        "revoke a tenant client",
        connection_dropped_s=round(dropped[0] - t0, 3) if dropped else None,
        waiting_message_refused=bool(refused),
    )
    # The server closes the open connection because of the revocation (its credentials never
    # expire by themselves): how soon is reported above (0.01-0.03 s here), not bounded.
    assert dropped, "the revoked client's open connection was closed by the server"
    assert refused and "unknown principal 'client.globex'" in refused[0], refused
    assert isinstance(other.outcome, TaskCompleted)
    assert json.loads(infra.ids.trust_bundle.read_text())["principals"].get("client.globex") is None
