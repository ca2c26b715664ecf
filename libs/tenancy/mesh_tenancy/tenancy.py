"""A service's tenants held to their share: its doors and its quota book, on its mesh's seam.

``install(mesh)`` gives a service's mesh its ``Tenancy`` (``mesh_kit.tenants`` says when the bus
calls it). Every service installs one: its dead letters and what it stores of its own accord are
charged to the tenant they are for, and a service that consumes a contract tenants write keeps
its door (the mesh refuses to start a service with doors and no tenancy).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from mesh_tenancy.door import Door
from mesh_tenancy.quota import Quotas, Refusal, limits_from
from mesh_tenancy.registry import Registry

if TYPE_CHECKING:
    from mesh_host import Mesh


class Tenancy:
    """What one service's tenants are held to (``mesh_kit.tenants.Tenancy``)."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.quotas: Quotas | None = None
        """What each tenant made this service store (``mesh_tenancy.quota``): set by ``prepare``."""
        self.door: Door | None = None
        self.registry = Registry(mesh.trust, lambda: mesh.nc)
        """The tenants added at runtime (``mesh_tenancy.registry``): their records, read when met."""
        self._flushing: asyncio.Task[None] | None = None

    async def prepare(self) -> None:
        mesh, s = self.mesh, self.mesh.settings
        await self.registry.follow()  # the tenants added at runtime, read as they are met
        limits = limits_from(s.quota_share, s.quota_mib_per_min, s.quota_tenants, mesh.verifier.tenants.quotas)
        self.quotas = Quotas(lambda: mesh.nc, await mesh.kv("quotas"), mesh.service, limits)

    async def open(self) -> None:
        assert self.quotas is not None, "prepare() first"
        if self.mesh.doors:
            self.door = Door(self.mesh, self.mesh.doors, self.quotas)
            await self.door.start()
        self._flushing = asyncio.create_task(self.quotas.run(), name="quota-flush")

    async def close(self) -> None:
        await self.registry.stop()
        if self.door is not None:
            await self.door.stop()
        if self._flushing is not None:
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing

    async def flush(self) -> None:
        if self.quotas is not None:
            await self.quotas.flush()

    def stored(self, tenant: str, stream: str, size: int) -> None:
        if self.quotas is not None:
            self.quotas.induced(tenant, stream, size)

    async def charge(self, tenant: str, stream: str, size: int) -> tuple[Refusal | None, float]:
        if self.quotas is None:
            return None, 0.0
        return await self.quotas.charge(tenant, stream, size)

    async def refund(self, tenant: str, stream: str, size: int, charged_at: float) -> None:
        if self.quotas is not None:
            await self.quotas.refund(tenant, stream, size, charged_at)


def install(mesh: Mesh) -> Tenancy:
    """Hold ``mesh``'s tenants to their share (before ``mesh.start``); the same one if installed."""
    if isinstance(mesh.tenancy, Tenancy):
        return mesh.tenancy
    tenancy = Tenancy(mesh)
    mesh.tenancy = tenancy
    return tenancy
