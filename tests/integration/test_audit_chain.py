"""The audit chain on a real server, with the writers' own credentials: concurrent appenders
from three services make one linear chain per tenant; a retried decision is stored once; the
stream refuses deletes and purges; a reader without the right reads no chain."""

from __future__ import annotations

import asyncio
import contextlib
import random

import nats
import pytest
from integration_helpers import connect

from mesh_contracts import topology as topo
from mesh_durable.chain import AuditChain, chain_filter, verify
from mesh_identity import Signer, TrustBundle, Verifier
from meshctl import audit

pytestmark = pytest.mark.integration

WRITERS = {"tool-executor": "tool.allowed", "planner": "control.cancel", "budget": "budget.loop"}


async def test_concurrent_writers_make_one_linear_chain_per_tenant(integration_infra):
    ids = integration_infra.ids
    tenant = f"chain{random.randrange(10**6)}"  # a chain of its own on the shared server
    per_writer = 30
    async with contextlib.AsyncExitStack() as stack:
        chains = []
        for principal in WRITERS:
            nc = await stack.enter_async_context(connect(integration_infra, principal))
            signer = Signer.from_file(principal, ids.signing_key(principal))
            # two appenders per service: two replicas racing for the same head
            chains += [(principal, AuditChain(lambda nc=nc: nc, lambda s=signer: s)) for _ in range(2)]

        async def write(principal: str, chain: AuditChain, k: int) -> None:
            for i in range(per_writer // 2):
                await chain.append(tenant, f"t{i % 3}", WRITERS[principal], f"{principal}-{k}-{i}", actor=principal)

        await asyncio.gather(*(write(p, c, k) for k, (p, c) in enumerate(chains)))
        # the same decision again (a redelivered handler, another budget replica): stored once
        again = await chains[0][1].append(tenant, "t0", "tool.allowed", "tool-executor-0-0")
        conflicts = sum(c.conflicts for _, c in chains)

        admin = await stack.enter_async_context(connect(integration_infra, "admin"))
        stored = await audit.chain(admin, tenant)
    total = per_writer * len(WRITERS)
    assert again == 0
    assert [int(s.headers["Nats-Msg-Id"] != "") for s in stored] == [1] * total
    verdict = verify(tenant, stored, Verifier(TrustBundle.from_file(ids.trust_bundle)))
    assert verdict.ok, verdict.reason
    assert (verdict.records, verdict.head.n) == (total, total), "every append once, positions 1..N, no fork"
    assert conflicts > 0, "six appenders on one chain must have raced (else the test shows nothing)"


async def test_the_audit_stream_refuses_deletes_and_purges_even_to_the_admin(integration_infra):
    tenant = f"chain{random.randrange(10**6)}"
    async with connect(integration_infra, "admin") as admin:
        signer = Signer.from_file("admin", integration_infra.ids.signing_key("admin"))
        n = await AuditChain(lambda: admin, lambda: signer).append(tenant, "_tenant", "control.kill-switch-on", "k1")
        assert n == 1
        js = admin.jetstream()
        seq = (await audit.chain(admin, tenant))[0].seq
        with pytest.raises(nats.js.errors.Error, match="not permitted"):
            await js.delete_msg(topo.STREAMS["audit"], seq)
        with pytest.raises(nats.js.errors.Error, match="not permitted"):
            await js.purge_stream(topo.STREAMS["audit"], subject=chain_filter(tenant))
        info = await js.stream_info(topo.STREAMS["audit"])
        assert info.config.deny_delete and info.config.deny_purge
        assert info.config.max_age >= 365 * 24 * 3600 - 1


async def test_writers_read_a_chains_head_only_and_others_nothing(integration_infra):
    """The writers' right is the subject-form direct get (the last record matching a filter):
    not a read by sequence. A service that writes no record (the worker) reads no chain."""
    stream = topo.STREAMS["audit"]
    async with connect(integration_infra, "admin") as nc:  # the same requests answer the admin
        assert (await nc.request(f"$JS.API.DIRECT.GET.{stream}", b'{"seq": 1}', timeout=2)).headers
        assert (await nc.request(f"$JS.API.DIRECT.GET.{stream}.{chain_filter('acme')}", b"", timeout=2)).headers
    async with connect(integration_infra, "tool-executor") as nc:
        with pytest.raises(nats.errors.Error):  # the bare form (reads by sequence): denied
            await nc.request(f"$JS.API.DIRECT.GET.{stream}", b'{"seq": 1}', timeout=1)
    async with connect(integration_infra, "worker") as nc:
        with pytest.raises(nats.errors.Error):
            await nc.request(f"$JS.API.DIRECT.GET.{stream}.{chain_filter('acme')}", b"", timeout=1)
