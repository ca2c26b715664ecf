"""Least privilege at the verb level, probed as an attacker holding one principal's credentials.

The subject-level matrix (``test_permission_matrix``) checks what each identity may publish and
subscribe to. This one checks what the JetStream API verbs it holds can *do*: with every
principal's credentials it tries to update, pause, delete or steal from every durable on the
broker (every subject form of consumer create: no name, name, name and filter, legacy
durable; and reset, which moves a consumer back to any sequence), to create push consumers delivering into another principal's inbox, to change,
purge or delete every stream, and the account-wide verbs. Every attempt must be refused by the
broker, and afterwards the broker's consumers, streams and message counts must be exactly
what they were. Then the verbs each principal *is* granted (read from the hand-written table
``mesh_testing.rights.INTENDED``, not from the policy generator) are abused with hostile
request bodies: a key-scoped direct get must not return a key outside its scope.

Targets (streams, durables) are listed live from the broker by the admin, so a durable added
later is attacked too without editing this file.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from mesh_contracts import APPROVER, CLIENT, SERVICES
from mesh_kit.settings import inbox_prefix
from mesh_testing.infra import Infra, running_infra
from mesh_testing.rights import INTENDED, matches

pytestmark = pytest.mark.integration
TENANTS = ["acme", "globex"]
PRINCIPALS = [*SERVICES, *(f"{CLIENT}.{t}" for t in TENANTS), APPROVER, "keeper"]
FAR_FUTURE = "2099-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(TENANTS, name="verbs") as infra:
        yield infra


async def connect(infra: Infra, principal: str, errors: list[str] | None = None) -> nats.NATS:
    async def on_error(e: Exception) -> None:
        if errors is not None:
            errors.append(str(e).lower())

    return await nats.connect(
        infra.nats_url,
        **infra.ids.connect_options(principal),
        error_cb=on_error,
        max_reconnect_attempts=0,
        name=f"verbs-{principal}",
    )


async def broker_state(infra: Infra) -> dict[str, Any]:
    """Everything an attack could change: each stream's config and message count, each
    consumer's config (and that no other consumer exists)."""
    nc = await connect(infra, "admin")
    try:
        js = nc.jetstream(timeout=5)
        out: dict[str, Any] = {}
        for si in await js.streams_info():
            name = si.config.name
            consumers = {}
            for ci in await js.consumers_info(name):
                cfg = ci.config.as_dict()
                consumers[ci.name] = (cfg, ci.paused if hasattr(ci, "paused") else None)
            out[name] = {"config": si.config.as_dict(), "messages": si.state.messages, "consumers": consumers}
        return out
    finally:
        await nc.close()


def consumer_body(stream: str, config: dict[str, Any], **changes: Any) -> bytes:
    return json.dumps({"stream_name": stream, "config": {**config, **changes}}).encode()


def attacks(principal: str, state: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(subject, body) of every attempt; none is something the hand-written table grants."""
    victim_inbox = inbox_prefix("client.globex" if principal != "client.globex" else "client.acme") + ".spy"
    tag = principal.replace(".", "-")
    out: list[tuple[str, bytes]] = []
    for stream, s in state.items():
        for name, (cfg, _) in s["consumers"].items():
            changed = consumer_body(stream, cfg, description=f"changed by {principal}", max_deliver=1)
            redirect = consumer_body(stream, cfg, deliver_subject=victim_inbox)
            out += [
                (f"$JS.API.CONSUMER.CREATE.{stream}", changed),
                (f"$JS.API.CONSUMER.CREATE.{stream}.{name}", changed),
                (f"$JS.API.CONSUMER.CREATE.{stream}.{name}", redirect),
                (f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}", changed),
                (f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b""),
                (f"$JS.API.CONSUMER.PAUSE.{stream}.{name}", json.dumps({"pause_until": FAR_FUTURE}).encode()),
                (f"$JS.API.CONSUMER.UNPIN.{stream}.{name}", json.dumps({"group": "g"}).encode()),
                (f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{name}", b""),
                # nats-server 2.14: move a consumer back to any sequence (a durable's reader would
                # see everything again; ENVELOPES' sourcing durables would re-deliver a stream)
                (f"$JS.API.CONSUMER.RESET.{stream}.{name}", json.dumps({"seq": 1}).encode()),
            ]
            filt = cfg.get("filter_subject") or ""
            if filt and "*" not in filt and ">" not in filt:
                out.append((f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{filt}", changed))
            own = any(matches(g, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}") for g in INTENDED[principal])
            if not own:  # fetching, inspecting or acking its own durable is its job
                out += [
                    (f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", json.dumps({"batch": 1, "no_wait": True}).encode()),
                    (f"$JS.API.CONSUMER.INFO.{stream}.{name}", b""),
                    (f"$JS.ACK.{stream}.{name}.1.1.1.{time.time_ns()}.0", b""),
                ]
        push = {"deliver_subject": victim_inbox, "ack_policy": "none", "deliver_policy": "all"}
        out += [
            (f"$JS.API.CONSUMER.CREATE.{stream}", consumer_body(stream, push)),
            (f"$JS.API.CONSUMER.CREATE.{stream}.spy-{tag}", consumer_body(stream, push, name=f"spy-{tag}")),
            (
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.spy-{tag}",
                consumer_body(stream, push, durable_name=f"spy-{tag}"),
            ),
            (f"$JS.API.CONSUMER.CREATE.{stream}", consumer_body(stream, {"ack_policy": "none"})),  # a pull one
            (f"$JS.API.STREAM.UPDATE.{stream}", json.dumps({**s["config"], "max_msgs": 1}).encode()),
            (f"$JS.API.STREAM.DELETE.{stream}", b""),
            *(  # the keeper's job (issue 42); everyone else's attack
                []
                if any(matches(g, f"$JS.API.STREAM.PURGE.{stream}") for g in INTENDED[principal])
                else [(f"$JS.API.STREAM.PURGE.{stream}", b"{}")]
            ),
            (f"$JS.API.STREAM.MSG.DELETE.{stream}", json.dumps({"seq": 1, "no_erase": True}).encode()),
            (f"$JS.API.STREAM.SNAPSHOT.{stream}", json.dumps({"deliver_subject": victim_inbox}).encode()),
            (f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b""),
            (f"$JS.API.STREAM.PEER.REMOVE.{stream}", json.dumps({"peer": "x"}).encode()),
            (f"$JS.API.CONSUMER.LIST.{stream}", b"{}"),
            (f"$JS.API.CONSUMER.NAMES.{stream}", b"{}"),
        ]
        read = f"$JS.API.STREAM.MSG.GET.{stream}"
        if not any(matches(g, read) for g in INTENDED[principal]):  # a read granted by design (the
            out.append((read, json.dumps({"seq": 1}).encode()))  # budget's, of KV_status' leader) is no attack
    out += [
        ("$JS.API.STREAM.CREATE.EVIL", json.dumps({"name": "EVIL", "subjects": ["evil.>"]}).encode()),
        ("$JS.API.STREAM.RESTORE.EVIL", b"{}"),
        ("$JS.API.INFO", b""),
        ("$JS.API.STREAM.LIST", b"{}"),
        ("$JS.API.STREAM.NAMES", b"{}"),
        ("$JS.API.ACCOUNT.PURGE.MESH", b""),
        ("$JS.API.META.LEADER.STEPDOWN", b""),
        ("$JS.API.SERVER.REMOVE", b"{}"),
    ]
    granted = [s for s, _ in out if any(matches(g, s) for g in INTENDED[principal])]
    assert not granted, f"the attack list must hold only what {principal} is not meant to do: {granted}"
    return out


@pytest.mark.parametrize("principal", PRINCIPALS)
async def test_no_granted_verb_changes_deletes_or_redirects_anything(infra, principal):
    before = await broker_state(infra)
    assert sum(len(s["consumers"]) for s in before.values()) >= 17, "every durable is provisioned"
    probes = attacks(principal, before)
    errors: list[str] = []
    nc = await connect(infra, principal, errors)
    answers: list[str] = []
    try:
        inbox = nc.new_inbox()

        async def answered(msg: Any) -> None:
            answers.append(msg.data.decode(errors="replace")[:200])

        await nc.subscribe(f"{inbox}.>", cb=answered)
        for i, (subject, body) in enumerate(probes):
            await nc.publish(subject, body, reply=f"{inbox}.{i}")
        await nc.flush(timeout=10)

        def refused() -> set[str]:
            return {
                s for s, _ in probes if any(f'permissions violation for publish to "{s.lower()}"' in e for e in errors)
            }

        deadline = time.monotonic() + 20
        want = {s for s, _ in probes}
        while refused() != want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a stray answer to an attack that got through would arrive by now
        missing = sorted(want - refused())
        assert not missing, f"{principal}: the broker did not refuse {len(missing)} attempt(s): {missing[:10]}"
        assert not answers, f"{principal}: JetStream answered an attack: {answers[:3]}"
        assert nc.is_connected, "refusals do not cost the connection"
    finally:
        await nc.close()
    after = await broker_state(infra)
    assert after == before, f"{principal}: the broker's streams or consumers changed"


async def direct_get(nc: nats.NATS, subject: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Every answer to one direct get request (one message, or a batch ending in a status)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out: list[tuple[dict[str, str], bytes]] = []
    try:
        await nc.publish(subject, body, reply=inbox)
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                break
            out.append((dict(msg.headers or {}), msg.data))
            if msg.headers and msg.headers.get("Status"):
                break
    finally:
        await sub.unsubscribe()
    return out


@pytest.mark.parametrize(
    "principal", ["planner", "worker", "checker", "tool-executor", "client.acme"], ids=lambda p: f"as-{p}"
)
async def test_a_key_scoped_direct_get_returns_nothing_outside_its_scope(infra, principal):
    """A granted subject-form direct get (``$JS.API.DIRECT.GET.<stream>.<subject>``) with a
    request body asking for a sequence, another subject or a batch must not hand out anything
    outside the granted subject: another service's ledger keys, another tenant's task."""
    admin = await connect(infra, "admin")
    try:
        js = admin.jetstream()
        secret_ledger = await js.publish("$KV.ledger.budget-probe.secret", b"SECRET-LEDGER")
        secret_task = await js.publish("task.v1.globex.probe-task.submitted", b'{"goal":"SECRET-TASK"}')
    finally:
        await admin.close()
    scoped = sorted(
        g for g in INTENDED[principal] if g.startswith("$JS.API.DIRECT.GET.") and g.count(".") > 4 and (
            "KV_ledger" in g or g.startswith("$JS.API.DIRECT.GET.TASK."))
    )  # fmt: skip
    assert scoped, f"{principal} holds a key-scoped direct get"
    errors: list[str] = []
    nc = await connect(infra, principal, errors)
    leaked = []
    try:
        for grant in scoped:
            subject = grant.replace(">", "x").replace("*", "v1")  # a concrete subject inside the grant
            seq = secret_ledger.seq if "KV_ledger" in grant else secret_task.seq
            for body in (
                json.dumps({"seq": seq}),
                json.dumps({"last_by_subj": "$KV.ledger.budget-probe.secret"}),
                json.dumps({"last_by_subj": "task.v1.globex.probe-task.submitted"}),
                json.dumps({"seq": 1, "next_by_subj": ">", "batch": 1000}),
                json.dumps({"multi_last": [">"]}),
            ):
                for _, data in await direct_get(nc, subject, body.encode()):
                    if b"SECRET" in data:
                        leaked.append((subject, body))
        assert not leaked, f"{principal}: a scoped direct get returned data outside its scope: {leaked}"
        assert nc.is_connected
    finally:
        await nc.close()


async def test_the_checker_cannot_read_a_tenants_documents_or_tasks(infra):
    """The checker holds no read right on the RAG stream (it gets rag's signed records in the
    check request) nor on task records or the planner's evidence (its guard reads the ``status``
    bucket, which says whether a task may go on and nothing else): no stored-message get, direct
    get or key read reaches another tenant's document, task or retrieved passages."""
    admin = await connect(infra, "admin")
    try:
        js = admin.jetstream()
        ack = await js.publish("rag.v1.globex.probe-doc.ingest", b'{"text":"SECRET-DOCUMENT"}')
        await js.publish("$KV.tasks.globex.probe-task", b'{"goal":"SECRET-GOAL"}')
        await js.publish("$KV.evidence.globex.probe-task.s1.1", b'{"records":"SECRET-PASSAGES"}')
    finally:
        await admin.close()
    errors: list[str] = []
    nc = await connect(infra, "checker", errors)
    try:
        got = []
        for subject, body in (
            ("$JS.API.STREAM.MSG.GET.RAG", {"seq": ack.seq}),
            ("$JS.API.STREAM.MSG.GET.RAG", {"last_by_subj": "rag.v1.globex.probe-doc.ingest"}),
            ("$JS.API.DIRECT.GET.RAG", {"seq": ack.seq}),
            ("$JS.API.DIRECT.GET.RAG.rag.v1.globex.probe-doc.ingest", {}),
            ("$JS.API.DIRECT.GET.KV_tasks.$KV.tasks.globex.probe-task", {}),
            ("$JS.API.DIRECT.GET.KV_tasks.$KV.tasks.globex.>", {}),
            ("$JS.API.DIRECT.GET.KV_evidence.$KV.evidence.globex.>", {}),
        ):
            got += [d for _, d in await direct_get(nc, subject, json.dumps(body).encode() if body else b"")]
        assert not any(b"SECRET" in d for d in got)
        deadline = time.monotonic() + 30  # returns as soon as it holds
        while sum("permissions violation for publish" in e for e in errors) < 7 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sum("permissions violation for publish" in e for e in errors) == 7, errors
    finally:
        await nc.close()
