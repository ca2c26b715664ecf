"""The records services read of each other's, one accessor each: a task's record (the planner's),
its status (what every guard reads), a step's retrieval evidence, the tool catalogue (the
tool-executor's) and release bundles. Each is a contract (``mesh_contracts.v1.records``) in a KV
bucket, read with ``mesh_kit.state.load`` (a direct get); a service holds the right to read only
the buckets it needs.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any

from nats.js.errors import KeyNotFoundError

from mesh_contracts.v1.records import Evidence, ReleaseVersion, StatusRecord, TaskRecord, ToolCatalogue
from mesh_contracts.v1.release import GLOBAL, ReleaseBundle
from mesh_durable.errors import DurableError
from mesh_kit.state import KV, load

log = logging.getLogger("mesh.records")


async def task_record(kv: KV, tenant: str, task_id: str) -> TaskRecord | None:
    """The planner's record of a task (bucket ``tasks``), or None when there is none yet."""
    rec, _ = await load(kv, TaskRecord.key(tenant, task_id), TaskRecord)
    return rec


async def task_status(kv: KV, tenant: str, task_id: str) -> StatusRecord | None:
    """Whether a task was halted or ended, and why (bucket ``status``); None while it runs."""
    rec, _ = await load(kv, TaskRecord.key(tenant, task_id), StatusRecord)
    return rec


async def evidence(kv: KV, tenant: str, task_id: str, step_id: str, attempt: int) -> Evidence | None:
    """The retrieval records a step attempt read (bucket ``evidence``, the planner's own)."""
    rec, _ = await load(kv, Evidence.key(tenant, task_id, step_id, attempt), Evidence)
    return rec


async def tool_catalogue(kv: KV) -> ToolCatalogue | None:
    """Every tool the tool-executor serves (bucket ``tools``); None before it first wrote it. A
    catalogue written as a bare list (an executor from before the record) is read too."""
    try:
        entry = await kv.get(ToolCatalogue.KEY)
    except KeyNotFoundError:
        return None
    raw = json.loads(entry.value or b"null")
    if raw is None:
        return None
    return ToolCatalogue.model_validate({"tools": raw} if isinstance(raw, list) else raw)


class Catalogue:
    """The tool catalogue as last read (``tool_catalogue``): read again when older than
    ``refresh_s`` or when asked (``fresh``); a failed read (the broker away) keeps the last one."""

    def __init__(self, kv: KV | None, refresh_s: float = 1.0) -> None:
        self.kv, self.refresh_s = kv, refresh_s
        self.read_at = float("-inf")
        self.value: ToolCatalogue | None = None

    async def get(self, *, fresh: bool = False) -> ToolCatalogue | None:
        if self.kv is not None and (fresh or time.monotonic() - self.read_at > self.refresh_s):
            self.read_at = time.monotonic()
            try:
                self.value = await tool_catalogue(self.kv) or self.value
            except Exception as exc:  # noqa: BLE001 - the broker is away: the catalogue known so far
                log.debug("tool catalogue not read: %s", exc)
        return self.value


class TenantCatalogues:
    """The mesh's catalogue (KV ``tools``) joined with each tenant's own (KV ``toolservers``, key
    ``<tenant>.catalogue``: the approved tools of the servers it registered), each read again when
    older than ``refresh_s``. A tenant's catalogue is only ever joined for that tenant's tasks."""

    def __init__(self, tools: KV | None, servers: KV | None, refresh_s: float = 1.0, size: int = 10_000) -> None:
        self.mesh = Catalogue(tools, refresh_s)
        self.servers, self.refresh_s, self.size = servers, refresh_s, size
        self._own: dict[str, tuple[float, list[Any]]] = {}

    async def get(self, tenant: str, *, fresh: bool = False) -> ToolCatalogue | None:
        """The tools a task of ``tenant`` may be offered; None before the executor wrote any."""
        mesh = await self.mesh.get(fresh=fresh)
        own = await self.own(tenant, fresh=fresh)
        if not own:
            return mesh
        names = {t.name for t in own}
        return ToolCatalogue(tools=[*(t for t in (mesh.tools if mesh else []) if t.name not in names), *own])

    async def own(self, tenant: str, *, fresh: bool = False) -> list[Any]:
        """The tenant's own tools (its catalogue in KV ``toolservers``), read again when stale."""
        read_at, tools = self._own.get(tenant, (float("-inf"), []))
        if self.servers is None or (not fresh and time.monotonic() - read_at <= self.refresh_s):
            return tools
        try:
            entry = await self.servers.get(f"{tenant}.catalogue")
            tools = ToolCatalogue.model_validate_json(entry.value or b"{}").tools
        except KeyNotFoundError:
            tools = []
        except Exception as exc:  # noqa: BLE001 - the broker is away: the catalogue known so far
            log.debug("tool catalogue of %s not read: %s", tenant, exc)
        if len(self._own) >= self.size:
            self._own.pop(next(iter(self._own)))
        self._own[tenant] = (time.monotonic(), tools)
        return tools


class ReleaseMissing(LookupError, DurableError):
    """The release a message names is not in its tenant's releases nor the mesh's (never drafted)."""


class Bundles:
    """The bundles of the releases tasks run (``mesh_contracts.v1.release``), from the ``releases``
    bucket by tenant and version, each read once per process (a version never changes: its name
    is its digest). A version of the mesh's default (tenant ``_mesh``) serves every tenant. A
    bucket that cannot be read raises, and the handler retries: a task never silently runs on
    other behaviour than the one it was admitted with."""

    KEPT = 64

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self._kept: OrderedDict[tuple[str, str], ReleaseBundle] = OrderedDict()

    async def bundle(self, tenant: str, version: str) -> ReleaseBundle | None:
        """The bundle of ``version`` (None for '' : the packaged behaviour)."""
        if not version:
            return None
        key = (tenant, version)
        found = self._kept.get(key)
        if found is not None:
            self._kept.move_to_end(key)
            return found
        if self.kv is None:
            raise ReleaseMissing(f"release {version} of tenant {tenant}: this service has no releases bucket")
        rec, _ = await load(self.kv, ReleaseVersion.key(tenant, version), ReleaseVersion)
        if rec is None and tenant != GLOBAL:
            rec, _ = await load(self.kv, ReleaseVersion.key(GLOBAL, version), ReleaseVersion)
        if rec is None:
            raise ReleaseMissing(f"tenant {tenant} has no release {version}")
        found = ReleaseBundle.model_validate(rec.bundle)
        self._kept[key] = found
        while len(self._kept) > self.KEPT:
            self._kept.popitem(last=False)
        return found
