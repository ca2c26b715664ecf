"""Hostile input from a tenant's own credentials, on every subject the tenant may publish.

Hypothesis generates the corpus: bodies nested thousands deep, integers of thousands of digits,
strings past every limit, invalid UTF-8, wrong types, NaN and Infinity, duplicate keys, unknown
versions; headers that are huge, missing or carry tokens in every wrong format. Each message is
sent with the tenant's NATS credentials, at the door of its contract (a tenant writes to no
stream: ``mesh_tenancy.door``), and then accounted for: refused at the door with the reason (or by
the broker, for a subject the tenant may not use), or, if the door stored it, dead-lettered by
its consumer with a reason on its first delivery (an ingest whose content is unusable, not base64
or not text, is answered instead: ``ingest.completed`` with ``ok`` false and the reason). Nothing may
be acted on, nothing may vanish, no service may restart or lose readiness, a normal task
afterwards completes, and another tenant's tasks, submitted one after another while a flood of
1,000 such messages lasts, all complete (their median against their quiet median is reported).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_contracts.registry import open_body
from mesh_contracts.v1 import TaskCompleted
from mesh_identity import Signer
from mesh_kit import envelope as env
from mesh_testing.chaos import ChaosMesh, report, started
from mesh_testing.infra import Infra, running_infra
from meshctl.policy import client_permissions

pytestmark = pytest.mark.e2e
TENANT, OTHER = "acme", "globex"
FLOOD = 1000
ENV = {"MESH_LOG_LEVEL": "WARNING", "MESH_RAG_SEED_TENANTS": ""}
QUESTION = "What is 6 * 7?"


@dataclass
class Hostile:
    subject: str
    body: bytes
    headers: dict[str, str]
    kind: str


def tenant_subjects() -> list[str]:
    """Every subject the tenant's credentials may publish on (from the permission policy), with
    one concrete task id, plus the same subjects at a contract version that does not exist."""
    subjects = [s.replace("*", "fz") for s in client_permissions(TENANT).pub if not s.startswith(("$", "_"))]
    return subjects + [s.replace(".v1.", ".v7.") for s in subjects]


def _valid(subject: str) -> dict:
    kind = subject.rsplit(".", 1)[1]
    base = {"tenant": TENANT, "task_id": "fz"}
    return {
        "submitted": {**base, "type": "task.submitted", "goal": QUESTION},
        "ingest": {**base, "type": "ingest.requested", "doc_id": "a.md", "media_type": "text/plain",
                   "content_b64": "QQ=="},
        "halt": {**base, "type": "control.halt", "reason": "x"},
        "cancel": {**base, "type": "control.cancel", "reason": "x"},
        "resume": {**base, "type": "control.resume", "reason": "x"},
        # an author's change, over the tenant's connection (signed here by the client: refused)
        "change": {**base, "type": "workflow.change", "action": "publish", "name": "wf", "author": "author.acme.x",
                   "definition": {"name": "wf", "nodes": [{"id": "a", "kind": "agent", "instruction": "x"}]}},
        "signal": {**base, "type": "task.signal", "name": "go"},  # (its payload may be any JSON: no wrong type)
        # a person's release change, over the tenant's connection (signed here by the client: refused)
        "release": {**base, "type": "release.change", "action": "draft", "by": "author.acme.x",
                    "bundle": {"prompts": {"worker.system": {"version": "2", "text": "x"}}}},
        # a person's change to the tenant's tool servers, over the tenant's connection (refused likewise)
        "tools": {**base, "type": "tools.change", "action": "add", "server": "orders", "by": "author.acme.x",
                  "definition": {"endpoints": ["https://orders.acme.test/mcp"]}},
        # an author's change to the tenant's agent profiles, over the tenant's connection (refused likewise)
        "agent": {**base, "type": "agent.change", "action": "put", "name": "calc", "by": "author.acme.x",
                  "profile": {"name": "calc", "description": "Exact sums", "tools": ["calculator"]}},
    }.get(kind, {**base, "type": kind})  # fmt: skip


def _nest(n: int) -> bytes:
    return b'{"goal": ' + b"[" * n + b"]" * n + b"}"


def _wrong(value: object) -> object:
    """A value of another JSON type than ``value``'s."""
    return 42 if isinstance(value, str) else "lots" if isinstance(value, int | float) else [1]


@st.composite
def bodies(draw, subject: str) -> tuple[bytes, str]:
    """A hostile body for ``subject`` and what makes it hostile."""
    valid = _valid(subject)
    kind = draw(st.sampled_from(["nesting", "number", "string", "utf8", "types", "constant", "duplicate", "junk"]))
    if kind == "nesting":
        return _nest(draw(st.integers(65, 5000))), kind
    if kind == "number":
        digits = "9" * draw(st.integers(21, 6000))
        return json.dumps(valid).encode()[:-1] + f', "n": {digits}}}'.encode(), kind
    if kind == "string":  # a field of the contract, far past its limit (and past the body's, or the stream's)
        field = draw(st.sampled_from(sorted(k for k, v in valid.items() if isinstance(v, str) and k not in
                                            ("type", "tenant", "task_id"))))  # fmt: skip
        return json.dumps({**valid, field: "x" * draw(st.integers(300_000, 1_200_000))}).encode(), kind
    if kind == "utf8":
        raw = json.dumps(valid).encode()
        at = draw(st.integers(1, len(raw) - 2))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80"])) + raw[
            at:], kind  # fmt: skip
    if kind == "types":  # a field the contract has, with a value of the wrong type
        field = draw(st.sampled_from(sorted(k for k in valid if k != "type")))
        return json.dumps({**valid, field: _wrong(valid[field])}).encode(), kind
    if kind == "constant":
        return json.dumps(valid).encode()[:-1] + b', "x": ' + draw(st.sampled_from([b"NaN", b"Infinity",
                                                                                    b"-Infinity"])) + b"}", kind  # fmt: skip
    if kind == "duplicate":
        return json.dumps(valid).encode()[:-1] + b', "tenant": "globex"}', kind
    return draw(st.binary(min_size=0, max_size=512)), kind


@st.composite
def headers(draw, subject: str, body: bytes, signer: Signer, msg_id: str) -> tuple[dict[str, str], str]:
    """Headers: a valid token over the hostile body, or one of the wrong ones."""
    kind = draw(st.sampled_from(["signed", "signed", "missing", "garbage", "alg-none", "huge", "other-tenant",
                                 "no-schema", "wrong-schema"]))  # fmt: skip
    valid = signer.token(tenant=TENANT, msg_type=_valid(subject)["type"], body=body, msg_id=msg_id)
    token = {
        "signed": valid,
        "missing": None,
        "garbage": draw(st.text(max_size=200)).encode("utf-8", "ignore").decode("ascii", "ignore") or "x",
        "alg-none": base64.urlsafe_b64encode(b'{"alg":"none"}').decode() + "." + valid.split(".")[1] + ".",
        "huge": "a" * draw(st.integers(10_000, 60_000)),
        "other-tenant": signer.token(tenant=OTHER, msg_type=_valid(subject)["type"], body=body, msg_id=msg_id),
    }.get(kind, valid)
    out = {env.MSG_ID: msg_id, env.SCHEMA: f"{_valid(subject)['type']}/v1"}
    if kind == "no-schema":
        del out[env.SCHEMA]
    elif kind == "wrong-schema":
        out[env.SCHEMA] = "task.completed/v1"
    if token is not None:
        out[env.IDENTITY] = token
    return out, kind


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra([TENANT, OTHER], name="hostile", ack_wait_s=5.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


def corpus(infra: Infra, n: int) -> list[Hostile]:
    """``n`` hostile messages, generated by hypothesis across every subject the tenant may use."""
    signer = Signer.from_file(f"client.{TENANT}", infra.ids.signing_key(f"client.{TENANT}"))
    out: list[Hostile] = []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def generate(data: st.DataObject) -> None:
        subject = data.draw(st.sampled_from(tenant_subjects()))
        body, body_kind = data.draw(bodies(subject))
        msg_id = f"fz-{len(out)}"
        head, head_kind = data.draw(headers(subject, body, signer, msg_id))
        out.append(Hostile(subject, body, head, f"{body_kind}/{head_kind}"))

    generate()
    # Always in the corpus, whatever hypothesis draws (which favours the bounds, so it draws these
    # lengths too): an ingest whose content is not base64, and one whose base64 decodes to bytes
    # that are not text (well-formed requests, answered).
    # A third sends the first one's bytes again in the same task: a request of its own, answered.
    for n, content in enumerate(("x" * 300_001, "x" * 300_000, "x" * 300_001)):
        body = json.dumps({**_valid(f"door.rag.v1.{TENANT}.fz.ingest"), "content_b64": content}).encode()
        msg_id = f"fz-fixed-{n}"
        token = signer.token(tenant=TENANT, msg_type="ingest.requested", body=body, msg_id=msg_id)
        fixed = {env.MSG_ID: msg_id, env.IDENTITY: token, env.SCHEMA: "ingest.requested/v1"}
        out.append(Hostile(f"door.rag.v1.{TENANT}.fz.ingest", body, fixed, "content"))
    return out


async def publish(infra: Infra, messages: list[Hostile], concurrency: int = 64) -> tuple[dict, Counter]:
    """Send as the tenant (JetStream publishes to the doors: the door answers as the stream would);
    returns (stream seq -> message) for those stored and why the rest were refused, at the door or
    by the broker."""
    stored, refused = {}, Counter()
    nc = await nats.connect(infra.nats_url, **infra.ids.connect_options(f"client.{TENANT}"))
    js, gate = nc.jetstream(timeout=3), asyncio.Semaphore(concurrency)

    async def one(m: Hostile) -> None:
        async with gate:
            try:
                ack = await js.publish(m.subject, m.body, headers=m.headers)
                stored[(ack.stream, ack.seq)] = m
            except nats.errors.TimeoutError:
                refused["permissions (unknown version)"] += 1  # a denied publish is dropped: it times out
            except nats.errors.Error as exc:
                refused[str(exc).split(":")[-1].strip()[:60] or type(exc).__name__] += 1

    try:
        await asyncio.gather(*(one(m) for m in messages))
    finally:
        await nc.close()
    return stored, refused


async def dead_letters(infra: Infra) -> dict[tuple[str, int], str]:
    """(original stream, seq) -> the reason, for every dead letter."""
    return {
        ((m.headers or {}).get(env.DLQ_STREAM, ""), int((m.headers or {}).get(env.DLQ_SEQ, "0"))): (
            m.headers or {}).get(env.DLQ_REASON, "")
        for m in await infra.stored("DLQ", "dlq.>")
    }  # fmt: skip


async def answered(infra: Infra) -> dict[str, str]:
    """Message id -> the reason, for every ingest the rag service refused with an answer to the
    tenant (``ingest.completed`` with ``ok`` false: not base64, not text of its media type): a
    well-formed request whose content is unusable is answered, not dead-lettered."""
    out = {}
    for m in await infra.stored("RAG", f"rag.v1.{TENANT}.*.ingested"):
        body = open_body(m.subject, m.data)
        if not body.get("ok") and (cause := (m.headers or {}).get(env.CAUSATION)):
            out[cause] = "rag: " + body.get("error", "")
    return out


async def acted_on(infra: Infra) -> int:
    """Anything a hostile message could have caused: a task record or a document of the tenant."""
    nc = await infra.admin()
    try:
        js = nc.jetstream()
        n = 0
        for bucket, prefix in (("tasks", f"{TENANT}.fz"), ("rag", f"{TENANT}.")):
            try:
                keys = await (await js.key_value(bucket)).keys()
            except Exception:  # an empty bucket has no keys
                keys = []
            n += sum(1 for k in keys if k.startswith(prefix))
        return n
    finally:
        await nc.close()


async def latency(infra: Infra, task_id: str) -> float:
    async with infra.client(OTHER) as c:
        run = await c.submit(QUESTION, task_id=task_id, timeout=120)
    assert isinstance(run.outcome, TaskCompleted), run.outcome
    return run.latency_s


def test_hostile_input_is_refused_or_dead_lettered_and_never_acted_on_or_lost(infra, mesh):
    messages = corpus(infra, 300)
    asyncio.run(_suite(infra, mesh, messages))


async def _suite(infra: Infra, mesh: ChaosMesh, messages: list[Hostile]) -> None:
    quiet = statistics.median([await latency(infra, f"quiet-{i}") for i in range(5)])
    stored, refused = await publish(infra, messages)
    deadline, letters = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        letters = await dead_letters(infra)
        refusals = await answered(infra)
        letters |= {
            k: refusals[m.headers[env.MSG_ID]] for k, m in stored.items() if m.headers.get(env.MSG_ID) in refusals
        }
        if all(k in letters for k in stored):
            break
        await asyncio.sleep(0.5)
    vanished = [stored[k] for k in stored if k not in letters]
    reasons = Counter(letters[k].split(":")[0] + ": " + _kind(letters[k]) for k in stored if k in letters)

    # A flood of FLOOD of them from one tenant, and another tenant's task in the middle of it.
    flood = [messages[i % len(messages)] for i in range(FLOOD)]
    flood = [Hostile(m.subject, m.body, {**m.headers, env.MSG_ID: f"flood-{i}"}, m.kind) for i, m in enumerate(flood)]
    flooding = asyncio.create_task(publish(infra, flood))
    await asyncio.sleep(0.2)
    # Tasks one after another for as long as the flood lasts (at least three): their median, so
    # one scheduling hiccup on a shared machine is not read as an outage.
    samples: list[float] = []
    while not flooding.done() or len(samples) < 3:
        samples.append(await latency(infra, f"during-flood-{len(samples)}"))
    during = statistics.median(samples)
    await flooding
    after = await latency(infra, "after-flood")
    ready = [name for name, (_, proc) in mesh.procs.items() if proc.alive() and await _ready(proc)]
    acted = await acted_on(infra)

    report(
        "hostile input",
        sent=len(messages),
        refused_at_door_or_broker=sum(refused.values()),
        refused_why=dict(refused),
        dead_lettered=len(stored) - len(vanished),
        dead_lettered_why=dict(reasons.most_common()),
        acted_on=acted,
        vanished=len(vanished),
        flood=FLOOD,
        quiet_latency_s=round(quiet, 3),
        latency_during_flood_s=round(during, 3),
        tasks_during_flood=len(samples),
        ratio=round(during / quiet, 2),
        latency_after_s=round(after, 3),
        services_ready=f"{len(ready)}/{len(mesh.procs)}",
    )
    assert vanished == [], [(m.subject, m.kind) for m in vanished[:5]]
    assert acted == 0
    assert len(ready) == len(mesh.procs), "every service is alive and ready (the harness restarts nothing)"
    # Another tenant's tasks all completed while the flood lasted (``latency`` asserts each one);
    # how much longer they took is the report's ``ratio`` (and ``bench/bench_flood.py``'s), not a bound.
    assert len(samples) >= 1


async def _ready(proc) -> bool:
    import httpx

    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(f"http://127.0.0.1:{proc.http_port}/readyz")).status_code == 200


def _kind(reason: str) -> str:
    """A dead letter's reason without its particulars (``nesting deeper than N``)."""
    return " ".join(re.sub(r"(?<![\w-])\d[\d.]*", "N", reason.split(":", 1)[-1]).split()[:5])
