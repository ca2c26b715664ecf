"""The release a task runs, as a service reads it (issue 41).

Every message of a task carries the version of its tenant's behaviour it runs
(``Contract.release``; '' : the packaged behaviour). A service that makes model calls or tool
calls for the task reads that version's bundle here, once per version per process (a version
never changes: its name is its digest), and takes from it

- the prompt of an id (``prompt``): the bundle's text in place of the packaged prompt, with the
  bundle's version label and the release in its ref, so every model call records which;
- the model route of an agent at a difficulty (``route``);
- the tools no step may call (``denied``).

A version that cannot be read (the bucket is unreachable) raises, and the handler retries
like any other transient fault: a task never silently runs on other behaviour than the one it
was admitted with.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from nats.js.errors import KeyNotFoundError

from mesh_agent.prompts import Prompt
from mesh_contracts.v1.records import ReleaseVersion
from mesh_contracts.v1.release import GLOBAL, ReleaseBundle

KEPT = 64
"""Bundles one process keeps parsed (by tenant and version)."""


class ReleaseMissing(LookupError):
    """The version a message names is not in the tenant's releases (deleted, or never drafted)."""


class Releases:
    """Reads a tenant's release bundles from the ``releases`` bucket, by version."""

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
        entry = await self._get(ReleaseVersion.key(tenant, version))
        if entry is None and tenant != GLOBAL:  # the mesh's default release, which every tenant may run
            entry = await self._get(ReleaseVersion.key(GLOBAL, version))
        if entry is None:
            raise ReleaseMissing(f"tenant {tenant} has no release {version}")
        rec = ReleaseVersion.model_validate(json.loads(entry.value))
        found = ReleaseBundle.model_validate(rec.bundle)
        self._kept[key] = found
        while len(self._kept) > KEPT:
            self._kept.popitem(last=False)
        return found

    async def _get(self, key: str) -> Any:
        try:
            return await self.kv.get(key)
        except KeyNotFoundError:  # (a deleted key too)
            return None


def prompt(packaged: Prompt, bundle: ReleaseBundle | None, release: str) -> Prompt:
    """The prompt of ``packaged``'s id a task on ``release`` uses: the bundle's, or the packaged one."""
    if bundle is None or packaged.id not in bundle.prompts:
        return packaged
    p = bundle.prompts[packaged.id]
    return Prompt(packaged.id, p.version, p.text, f"release {release}", packaged.description)


def route(bundle: ReleaseBundle | None, agent: str, difficulty: str = "") -> str:
    """The route a task's ``agent`` calls take under ``bundle`` ('' : the gateway's own routing)."""
    return bundle.route_for(agent, difficulty) if bundle is not None else ""


def denied(bundle: ReleaseBundle | None) -> frozenset[str]:
    return frozenset(bundle.tools.deny) if bundle is not None else frozenset()
