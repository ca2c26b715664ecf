"""The seam a service's tenants are held to: ``Tenancy``, which ``mesh_tenancy`` installs.

The bus moves messages; how much of the mesh's streams each tenant may fill, and the doors a
tenant hands its messages in at, are policy above it (``mesh_tenancy``). The bus calls that
policy at four moments of a service's life and for two kinds of write it makes itself, and
nothing else: so a mesh without a tenancy (a test, a tool) is the same bus, with no doors and
nothing charged.
"""

from __future__ import annotations

from typing import Protocol


class Refused(Protocol):
    """Why a charge was refused (``code``: ``quota_exceeded``, ``rate_limited``; ``reason``: one line)."""

    @property
    def code(self) -> str: ...

    @property
    def reason(self) -> str: ...


class Tenancy(Protocol):
    """What the bus asks of the tenants' policy (``Mesh.tenancy``)."""

    async def prepare(self) -> None:
        """After provisioning, before the start hooks: what they store for tenants counts already."""

    async def open(self) -> None:
        """Once requests are answered and before messages are consumed: the doors open."""

    async def close(self) -> None:
        """First when stopping: the doors take nothing more and finish what they queued."""

    async def flush(self) -> None:
        """Once the consumers stopped, still connected: the last of what was counted is written."""

    def stored(self, tenant: str, stream: str, size: int) -> None:
        """The service stored ``size`` bytes for ``tenant`` in ``stream`` of its own accord."""

    async def charge(self, tenant: str, stream: str, size: int) -> tuple[Refused | None, float]:
        """Charge a write the service is about to make for ``tenant`` (a dead letter): a refusal,
        or None and the charge's time (for ``refund``)."""

    async def refund(self, tenant: str, stream: str, size: int, charged_at: float) -> None:
        """Give back a charge whose write the stream did not keep (failed, or a duplicate)."""
