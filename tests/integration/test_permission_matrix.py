"""Every identity can do exactly what the policy allows, checked against a real nats-server.

Expectations are computed from the contracts (who produces what, who consumes what) and
from the topology, independently of the generated permission lists; the broker's answer
for each case is then observed. Allowed and denied cases are both asserted.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import nats
import nats.js.errors
import pytest

from mesh_contracts import APPROVER, AUTHOR, CLIENT, SERVICES
from mesh_contracts import topology as topo
from mesh_contracts.registry import VERSIONS
from mesh_kit.settings import inbox_prefix
from mesh_testing.infra import Infra, running_infra

pytestmark = pytest.mark.integration
TENANTS = ["acme", "globex"]
PRINCIPALS = [*SERVICES, *(f"{CLIENT}.{t}" for t in TENANTS), APPROVER]


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(TENANTS, name="matrix") as infra:
        yield infra


def role_of(principal: str) -> tuple[str, str | None]:
    return (CLIENT, principal.split(".", 1)[1]) if principal.startswith(f"{CLIENT}.") else (principal, None)


def expected_publish(principal: str) -> dict[str, bool]:
    """subject -> may this principal publish it, derived from the contract declarations."""
    role, own_tenant = role_of(principal)
    cases: dict[str, bool] = {}
    for major, contracts in VERSIONS.items():
        for c in contracts:
            if c.spec.transport == "reply":
                continue  # replies go to the requester's inbox, covered by allow_responses
            door = topo.door_of(c) if c.spec.transport == "stream" else None
            for tenant in TENANTS:
                subject = f"{c.spec.domain}.v{major}.{tenant}.pm-task.{c.spec.event}"
                allowed = role in c.spec.producers and (own_tenant is None or own_tenant == tenant)
                if door is not None:
                    # A tenant writes to no stream: it hands the message in at the door, whose
                    # keeper stores it (for any tenant) on the stream subject. An author's change
                    # travels over its tenant's client connection (signed by the author).
                    hands_in = bool({CLIENT, AUTHOR} & set(c.spec.producers)) and own_tenant == tenant
                    cases[topo.door_subject(subject)] = hands_in and role == CLIENT
                    allowed = (allowed and role != CLIENT) or principal == door.service
                cases[subject] = allowed
    for d in topo.durables():
        mine = d.service == principal
        cases[f"$JS.API.CONSUMER.INFO.{d.stream}.{d.name}"] = mine
        cases[f"$JS.API.CONSUMER.MSG.NEXT.{d.stream}.{d.name}"] = mine
        cases[f"$JS.ACK.{d.stream}.{d.name}.1.7.7.1700000000000000000.0"] = mine
    for admin_api in (
        "$JS.API.STREAM.CREATE.EVIL",
        "$JS.API.STREAM.DELETE.TASK",
        "$JS.API.STREAM.PURGE.TASK",
        "$JS.API.CONSUMER.CREATE.TASK.spy.task.>",
        "$JS.API.CONSUMER.DELETE.TASK.planner--task-submitted",
        "$JS.API.STREAM.LIST",
        "$JS.API.INFO",
    ):
        cases[admin_api] = False
    for b in topo.BUCKETS:
        cases[f"$KV.{b.name}.acme.pm-task"] = principal == b.writer
        cases[f"$JS.API.DIRECT.GET.KV_{b.name}.$KV.{b.name}.acme.pm-task"] = (
            principal == b.writer or principal in b.readers or principal in b.scanners
            or (b.tenant_keys and role == CLIENT and own_tenant == "acme")
        )  # fmt: skip
        cases[f"$JS.API.STREAM.MSG.GET.KV_{b.name}"] = principal in b.leader_readers
    for svc in SERVICES:
        cases[topo.dlq_subject(svc, "task.v1.acme.pm-task.submitted")] = svc == principal
    for prefix, writer in topo.SINKS.values():
        cases[f"{prefix}.acme.pm-task.c1"] = principal == writer
    # A workflow timer's schedule: the planner's alone; its wake-up: the broker's alone (it fires it).
    cases[topo.timer_subject("acme", "pm-task", "fire-1-w", "at")] = principal == topo.TIMER_KEEPER
    cases[topo.timer_subject("acme", "pm-task", "fire-1-w", "due")] = False
    # Whole-stream reads (a bare direct get reads anything the stream holds): the budget, on its
    # usage records and on the envelopes (headers, no body) only; nobody on a stream of content.
    for stream in [*topo.STREAMS.values(), topo.ENVELOPES]:
        cases[f"$JS.API.DIRECT.GET.{stream}"] = principal == "budget" and stream in ("USAGE", topo.ENVELOPES)
    # Where the content streams deliver envelopes to ENVELOPES: a publish there would be stored as
    # one (a replayed envelope counts twice in a loop breaker). The server's sourcing alone.
    cases["$MESH.ENVELOPES.TASK"] = False
    cases["$MESH.WATCH.ENVELOPES.task.v1.acme.pm-task.submitted"] = False
    return cases


def expected_subscribe(principal: str) -> dict[str, bool]:
    role, own_tenant = role_of(principal)
    cases = {f"{inbox_prefix(p)}.x": p == principal for p in [*PRINCIPALS, "admin"]}
    cases |= {">": False, "$JS.>": False, "_INBOX.>": False, "task.v1.>": False, "step.v1.>": False}
    for tenant in TENANTS:
        mine = role == CLIENT and tenant == own_tenant
        cases[f"event.v1.{tenant}.>"] = mine
        cases[f"task.v1.{tenant}.>"] = mine
        cases[f"usage.v1.{tenant}.>"] = mine  # its own tasks' model calls, live; no service subscribes
    cases["budget.v1.acme.pm-task.reserve"] = principal == "budget"  # request/reply: only the budget serves
    cases["$KV.trust.bundle"] = principal in SERVICES  # the trust bundle's doorbell: every service
    cases["$KV.approvals.ap-1"] = principal == "tool-executor"  # it follows approvals' writes
    # The envelopes' republished feed (no bodies) and the usage records' (its own), the budget's
    # alone; the content streams republish nothing, and their sourcing deliveries nobody's.
    cases["$MESH.WATCH.ENVELOPES.task.v1.acme.t.submitted"] = principal == "budget"
    cases["$MESH.WATCH.USAGE.usage.v1.acme.t.recorded"] = principal == "budget"
    cases["$MESH.WATCH.TASK.task.v1.acme.t.submitted"] = False
    cases["$MESH.WATCH.RAG.rag.v1.acme.t.ingest"] = False
    cases["$MESH.ENVELOPES.RAG"] = False
    cases["$MESH.WATCH.>"] = False
    cases["$KV.ledger.planner.k"] = False
    cases["approval.v1.acme.pm-task.requested"] = principal == APPROVER
    for d in topo.doors():
        cases[d.pattern] = principal == d.service  # only the keeper hears what tenants hand in
    cases["door.>"] = False
    return cases


class Probe:
    """A connection as one principal that records the broker's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def connect(self, infra: Infra, principal: str) -> None:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e).lower())

        self.nc = await nats.connect(
            infra.nats_url,
            **infra.ids.connect_options(principal),
            error_cb=on_error,
            max_reconnect_attempts=0,
            name=f"matrix-{principal}",
        )

    async def denied(
        self, action: str, subjects: list[str], expect: set[str], quiet_s: float = 0.5, deadline_s: float = 15.0
    ) -> set[str]:
        """Try every subject, then collect which ones the broker refused.

        The server's -ERR for a violation is not ordered before the PONG of a later flush
        (measured: ~10% arrive after it), so this waits until every ``expect``-ed denial has
        arrived (bounded by ``deadline_s``), then until no new error arrives for ``quiet_s``
        to catch denials nobody expected.
        """
        assert self.nc is not None
        subs = []
        for subject in subjects:
            if action == "publish":
                await self.nc.publish(subject, b"{}")
            else:
                subs.append(await self.nc.subscribe(subject))
        await self.nc.flush(timeout=5)
        verb = "publish to" if action == "publish" else "subscription to"
        loop = asyncio.get_running_loop()

        def refused() -> set[str]:
            return {
                x for x in subjects if any(f'permissions violation for {verb} "{x.lower()}"' in e for e in self.errors)
            }

        give_up = loop.time() + deadline_s
        while not expect <= refused() and loop.time() < give_up:
            await asyncio.sleep(0.05)
        seen, quiet_since = len(self.errors), asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - quiet_since < quiet_s:
            await asyncio.sleep(0.05)
            if len(self.errors) != seen:
                seen, quiet_since = len(self.errors), asyncio.get_running_loop().time()
        for sub in subs:
            await sub.unsubscribe()
        return refused()


@pytest.mark.parametrize("principal", PRINCIPALS)
async def test_publish_and_subscribe_rights_match_the_policy_exactly(infra, principal):
    probe = Probe()
    await probe.connect(infra, principal)
    wrong = []
    try:
        pub, sub = expected_publish(principal), expected_subscribe(principal)
        for action, cases in (("publish", pub), ("subscribe", sub)):
            refused = await probe.denied(action, list(cases), expect={x for x, ok in cases.items() if not ok})
            for subject, allowed in cases.items():
                if (subject in refused) == allowed:
                    wrong.append(f"{action} {subject}: expected {'allowed' if allowed else 'denied'}")
        assert probe.nc is not None and probe.nc.is_connected, "violations must not cost the connection"
    finally:
        assert probe.nc is not None
        await probe.nc.close()
    assert not wrong, f"{principal}: {len(wrong)} mismatch(es) of {len(pub) + len(sub)}:\n" + "\n".join(wrong)
    # both kinds of case were exercised for every principal
    assert any(pub.values()) and not all(pub.values())


async def test_a_service_can_bind_and_fetch_its_own_durable_but_not_anothers(infra):
    planner = await nats.connect(
        infra.nats_url,
        **infra.ids.connect_options("planner"),
        max_reconnect_attempts=0,
    )
    await planner.jetstream().publish("step.v1.acme.pm-fetch.requested", b"{}", headers={"Nats-Msg-Id": "pm-fetch"})
    await planner.close()
    nc = await nats.connect(
        infra.nats_url,
        **infra.ids.connect_options("worker"),
        max_reconnect_attempts=0,
    )
    try:
        js = nc.jetstream(timeout=2)
        own = await js.pull_subscribe_bind("worker--step-requested", "STEP", inbox_prefix=b"_INBOX_worker.")
        subjects = set()
        while "step.v1.acme.pm-fetch.requested" not in subjects:  # earlier cases stored messages too
            for msg in await own.fetch(10, timeout=2):
                subjects.add(msg.subject)
                await msg.ack()
        with pytest.raises(nats.errors.TimeoutError):  # denied requests are dropped: they time out
            await js.consumer_info("TASK", "planner--task-submitted")
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_stream(name="EVIL", subjects=["evil.>"])
    finally:
        await nc.close()


async def test_a_tenant_client_can_only_hand_its_tasks_in_at_their_door(infra):
    """The broker stores nothing a tenant publishes: onto the stream subject it is denied (a
    denied request times out) and nothing is stored; at its own tenant's door it is delivered (no
    planner runs in this test, so nobody answers: "no responders", not a denial); at another
    tenant's door it is denied."""
    nc = await nats.connect(
        infra.nats_url,
        **infra.ids.connect_options("client.acme"),
        max_reconnect_attempts=0,
    )
    try:
        js = nc.jetstream(timeout=2)
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish("task.v1.acme.pm-ack.submitted", b"{}", headers={"Nats-Msg-Id": "pm-ack"})
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request("door.task.v1.acme.pm-ack.submitted", b"{}", timeout=2)
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request("door.task.v1.globex.pm-ack.submitted", b"{}", timeout=2)
    finally:
        await nc.close()
    admin = await infra.admin()
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await admin.jetstream().get_last_msg("TASK", "task.v1.acme.pm-ack.submitted")
    finally:
        await admin.close()


async def test_credentials_from_another_operator_are_refused(infra, tmp_path):
    """Run in a child process: nats-py leaks the refused connection's socket, which would be
    reported (as an error, warnings being errors) in whichever later test collects it."""
    from meshctl.identity import Identities

    other = Identities(tmp_path / "other-operator")
    other.mint(["acme"])  # a different operator: its users are not trusted by this server
    script = (
        "import asyncio, nats, sys\n"
        "from mesh_kit.settings import tls_context\n"
        "async def main():\n"
        "    try:\n"
        f"        await nats.connect({infra.nats_url!r}, user_credentials=sys.argv[1], allow_reconnect=False,"
        f" max_reconnect_attempts=0, connect_timeout=3, tls=tls_context({str(infra.ids.tls_ca)!r}))\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e); sys.exit(3)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(other.creds("worker")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 3, out
    assert "authorization violation" in out.decode().lower()
