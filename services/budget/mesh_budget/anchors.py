"""Anchoring the tenants' audit chains: the budget's signed statement of each chain's length and
head hash, in KV ``anchors`` (key: the tenant; ``_mesh`` for the mesh-wide chain).

Every ``MESH_BUDGET_AUDIT_ANCHOR_S`` each chain that grew since its last anchor is anchored
again. ``meshctl audit verify`` holds a chain to every anchor the bucket retains: a chain later
cut short, or rewritten, no longer reaches its anchor.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mesh_contracts.v1.audit import ANCHOR, ANCHOR_TTL_S, MESH_WIDE
from mesh_durable import chain
from mesh_host import Mesh
from mesh_kit import tasks

log = logging.getLogger("mesh.budget")


class Anchors:
    """One replica's anchoring loop (every replica runs one, from ``start``)."""

    def __init__(self, mesh: Mesh, every_s: float) -> None:
        self.mesh = mesh
        self.audit = chain.of(mesh)
        self.every_s = every_s
        self.kv: Any = None
        self._anchored: dict[str, int] = {}  # tenant -> the chain length last anchored
        self._anchorer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.kv = await self.mesh.kv("anchors")
        self._anchorer = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await tasks.stop(self._anchorer)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.anchor_all()
            except Exception as exc:  # noqa: BLE001 - broker away: the next round anchors
                log.warning("anchoring the audit chains failed: %s", exc)

    async def anchor_all(self) -> int:
        """Sign each chain's length and head hash into KV ``anchors`` (key: the tenant) when it
        grew: a chain later cut short, or rewritten, no longer reaches its anchor. Returns how
        many chains were anchored."""
        # The bundle's tenants, and those added at runtime that this budget has met since it started
        # (``mesh_tenancy.registry``): a tenant's chain grows with its tasks, which the budget meets.
        met = set(self.mesh.verifier.tenants.entries)
        tenants = sorted(
            {p.tenant for p in self.mesh.verifier.bundle.principals.values() if p.tenant} | met | {MESH_WIDE}
        )
        done = 0
        for tenant in tenants:
            head = await self.audit.head(tenant)
            if head.n == 0 or self._anchored.get(tenant) == head.n:
                continue
            statement = self.mesh.signer.statement(
                ANCHOR, {"ten": tenant, "n": head.n, "head": head.hash, "seq": head.seq}, ttl_s=ANCHOR_TTL_S
            )
            await self.kv.put(tenant, statement.encode())
            self._anchored[tenant] = head.n
            done += 1
        return done
