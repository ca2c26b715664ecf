"""The notes tools' store in the mesh: KV ``notes``, key ``<tenant>.<note id>``, with a per-tenant quota.

``tools.Notes`` is what a notes tool reads and writes through; ``tools.MemoryNotes`` keeps them in
a dict, for in-memory tests and ``execute()`` without a mesh.
"""

from __future__ import annotations

from typing import Any

from mesh_durable.tail import Reader
from mesh_tool_executor.tools import Notes, ToolError


class KVNotes(Notes):
    """Notes in the ``notes`` bucket, key ``<tenant>.<note id>``: durable and tenant-scoped (the
    tenant comes from the verified message, never from the arguments)."""

    def __init__(self, kv: Any, nc: Any, max_per_tenant: int = 0) -> None:
        self.kv = kv
        self.reader = Reader(nc, "KV_notes")
        self.max_per_tenant = max_per_tenant
        """Most notes a tenant may keep (``MESH_NOTES_PER_TENANT``; 0: no limit): the bucket holds
        every tenant's, so one tenant's agents must not be able to fill it."""

    async def get(self, tenant: str, note_id: str) -> str | None:
        try:
            entry = await self.kv.get(f"{tenant}.{note_id}")
        except Exception:  # noqa: BLE001 - KeyNotFoundError and a deleted key both mean "no note"
            return None
        return entry.value.decode() if entry.value else None

    async def put(self, tenant: str, note_id: str, text: str) -> None:
        if self.max_per_tenant and await self.get(tenant, note_id) is None:
            held = len(await self.list(tenant))
            if held >= self.max_per_tenant:
                raise ToolError(
                    f"quota: tenant {tenant} keeps {held} notes, its limit of {self.max_per_tenant}; "
                    "replace or delete one first"
                )
        await self.kv.put(f"{tenant}.{note_id}", text.encode())

    async def delete(self, tenant: str, note_id: str) -> bool:
        if await self.get(tenant, note_id) is None:
            return False
        await self.kv.delete(f"{tenant}.{note_id}")
        return True

    async def list(self, tenant: str) -> list[str]:
        # The current value of every key under the tenant's own prefix, filtered by the server
        # (one direct get; nats-py's keys(filters=) would read every tenant's keys, and a watch
        # needs a consumer).
        current = await self.reader.current("notes", f"{tenant}.>")
        return sorted(key.split(".", 1)[1] for key in current)
