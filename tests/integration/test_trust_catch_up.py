"""A message signed with a key from a bundle this process has not seen yet is judged again under
the newest published bundle, not dead-lettered (the race behind a failed rotation chaos run: a
planner switched to its new key while a worker, reconnecting, had missed the bundle's write).

A forged token (a key in no bundle) is still refused, and a flood of them costs a few bundle reads
a second, not one read each."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from integration_helpers import eventually, running, settings_for

from mesh_checker.service import Checker
from mesh_contracts import topology as topo
from mesh_contracts.v1 import (
    CheckRequested,
    RetrievalCompleted,
    RetrievalHit,
    SignedRecord,
    StepResult,
    ToolRequested,
)
from mesh_host import Mesh
from mesh_identity import Signer, TrustBundle, new_signing_key
from mesh_kit import envelope as env
from mesh_kit import telemetry as tel
from mesh_kit.trust import TRUST_RECHECK_S
from mesh_testing.infra import Infra, running_infra
from meshctl.rotation import overlap_bundle, publish_bundle

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    # its own infrastructure: the test publishes trust bundles, which every later process reads
    with running_infra(["acme"], name="trust-catch-up") as infra:
        yield infra


class CountingReads:
    """The consumer's handle on the ``trust`` bucket, counting the reads made through it."""

    def __init__(self, kv: object) -> None:
        self.kv, self.reads = kv, 0

    async def get(self, key: str) -> object:
        self.reads += 1
        return await self.kv.get(key)  # type: ignore[attr-defined]


def missed_writes(mesh: Mesh) -> CountingReads:
    """As if ``mesh`` were reconnecting when a rotation wrote the bundle: it follows no more
    writes (and re-reads only on an unknown key, through the counter returned)."""
    for task in mesh.trust._tasks:
        task.cancel()
    reads = mesh.trust._trust_kv = CountingReads(mesh.trust._trust_kv)
    return reads


async def publish_overlap(infra: Infra, before: TrustBundle, principal: str) -> tuple[TrustBundle, Any]:
    """A rotation's overlap bundle for ``principal`` (its old key and a new one), published."""
    new_key = new_signing_key()
    overlap = overlap_bundle(before, {principal: new_key.public_key()})
    await publish_bundle(infra.ids, overlap, infra.nats_url)
    return overlap, new_key


async def test_a_key_from_a_bundle_published_after_the_consumer_last_read_is_accepted(infra):
    got: list[tuple[str, str]] = []

    async def handler(m: ToolRequested, d) -> None:
        got.append((m.task_id, d.sender.name))

    consumer = Mesh(settings_for(infra, "tool-executor", identity_refresh_s=3600.0))
    consumer.consume(ToolRequested, handler)
    async with running(consumer):
        reads = missed_writes(consumer)
        before = consumer.verifier.bundle

        # the rotation's overlap bundle: the worker's old key and a new one
        overlap, new_key = await publish_overlap(infra, before, "worker")
        assert consumer.verifier.bundle is before, "the consumer missed the write (the race under test)"

        worker = Mesh(settings_for(infra, "worker"), signer=Signer("worker", new_key))
        async with running(worker):
            await worker.publish(ToolRequested(tenant="acme", task_id="signed-new", step_id="s1", call_id="c1",
                                               tool="calculator"), key="c1")  # fmt: skip
            await eventually(lambda: got, what="the message signed with the new key handled")

            # forged: a key no bundle holds, many at once
            forger = Mesh(settings_for(infra, "worker"), signer=Signer("worker", new_signing_key()))
            async with running(forger):
                reads_before, t0 = reads.reads, time.monotonic()
                for i in range(40):
                    await forger.publish(ToolRequested(tenant="acme", task_id=f"forged-{i}", step_id="s1",
                                                       call_id="c1", tool="calculator"), key="c1")  # fmt: skip
                refused = await eventually(
                    lambda: _all_refused(infra, 40), timeout=30, what="the 40 forged messages dead-lettered"
                )
                spent = time.monotonic() - t0
                forged_reads = reads.reads - reads_before

    assert got == [("signed-new", "worker")]
    assert consumer.verifier.bundle.revision == overlap.revision
    assert consumer.stats.counters[tel.M_TRUST_CAUGHT_UP] == 1
    assert reads.reads - forged_reads == 1, "one read caught the consumer up"
    assert all("signature invalid for worker (forged?)" in r for r in refused), refused[:3]
    # reads are spaced TRUST_RECHECK_S apart and coalesced: not one per forged message
    assert 1 <= forged_reads <= spent / TRUST_RECHECK_S + 2, (forged_reads, spent)
    assert forged_reads < 40


async def _all_refused(infra: Infra, n: int) -> list[str] | None:
    """The reasons of the forged messages' dead letters, once all ``n`` are there."""
    stored = await infra.stored("DLQ", topo.dlq_subject("tool-executor", "tool.v1.acme.*.requested"))
    reasons = [(m.headers or {}).get(env.DLQ_REASON, "") for m in stored if ".forged-" in m.subject]
    return reasons if len(reasons) >= n else None


async def test_a_retrieval_record_signed_with_a_key_the_checker_has_not_seen_yet_resolves(infra):
    """What a message carries is judged the same way: the check request's retrieval records,
    signed by rag, which switched keys before the checker saw the bundle."""
    mesh = Mesh(settings_for(infra, "checker", identity_refresh_s=3600.0))
    checker = Checker(mesh)
    async with running(mesh):
        missed_writes(mesh)
        before = mesh.verifier.bundle
        overlap, new_key = await publish_overlap(infra, before, "rag")
        started = time.time() - 5
        hit = RetrievalHit(doc_id="a.md", version="v1", chunk_id="3", chunk_hash="h3", score=1.0, text="Blue.")
        found = RetrievalCompleted(tenant="acme", task_id="t1", step_id="s1", call_id="c1", hits=(hit,))
        body = found.to_bytes()
        token = Signer("rag", new_key).token(tenant="acme", msg_type=found.type, body=body, msg_id="m-1")
        forged = Signer("rag", new_signing_key()).token(tenant="acme", msg_type=found.type, body=body, msg_id="m-1")
        req = CheckRequested(
            tenant="acme", task_id="t1", goal="g", answer="a [a.md#3]", started_at=started, answer_step="s1",
            steps=(StepResult(step_id="s1", output="o", retrievals=(SignedRecord(body=body.decode(), token=token),)),),
        )  # fmt: skip
        passages = await checker.retrieved(req)
        assert mesh.verifier.bundle.revision == overlap.revision
        bad = req.model_copy(update={"steps": (StepResult(step_id="s1", output="o", retrievals=(
            SignedRecord(body=body.decode(), token=forged),)),)})  # fmt: skip
        refused = await checker.retrieved(bad)
    assert set(passages) == {("a.md", "3")}
    assert refused == {}
