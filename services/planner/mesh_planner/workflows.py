"""The workflow registry (issue 40): a tenant's workflow versions, immutable, named by content.

An author (``author.<tenant>.<person>``, a key of their own in the trust bundle) signs a
``workflow.change`` and hands it in at the tenant's door; the planner applies it here:

- ``publish``: the definition is validated (strictly: ``WorkflowDefinition``), its version is its
  digest; the version's record is created (never overwritten: a version cannot change) and the
  tenant's catalogue lists it last, so ``name@latest`` names it. Publishing a version again
  changes nothing and says so.
- ``deprecate`` / ``restore``: no new task may start the version / they may again (tasks that
  started it run on with it either way). ``@latest`` is the last published version still active.
- ``delete``: as deprecate, for good (``restore`` refuses), and the version leaves ``list``; its
  definition stays for the tasks that ran it and for the audit.

Each right is judged under the newest trust bundle (an author removed a moment ago is refused),
and for the message's tenant only (the verifier already refuses an author speaking for another).
Every change, applied or refused, is a link of the tenant's audit chain.

Writes are ordered so that a crash anywhere is finished by the redelivery: the version's record
first (create-only, or compare-and-set of its status), then the catalogue (compare-and-set,
idempotent), then the audit link (stored once under the change's id), then the answer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jsonschema
from pydantic import ValidationError

from mesh_contracts.base import AUTHOR
from mesh_contracts.v1.records import CatalogEntry, WorkflowCatalog, WorkflowEvent, WorkflowVersion
from mesh_contracts.v1.workflow import WorkflowDefinition
from mesh_contracts.v1.workflow_versions import WorkflowChange, WorkflowChanged, parse_ref
from mesh_identity import Principal, TrustBundle
from mesh_kit import state as st
from mesh_planner.errors import PlannerError

KEPT = 256
"""Parsed definitions this process keeps (by version: a version never changes)."""


class Refused(PlannerError):
    """A change or a task's workflow the registry will not take; the message says why."""


@dataclass(frozen=True)
class Resolved:
    """The version a task runs: its record and its parsed definition."""

    record: WorkflowVersion
    definition: WorkflowDefinition

    @property
    def ref(self) -> str:
        return f"{self.record.workflow}@{self.record.version}"


def may_change(bundle: TrustBundle, sender: Principal, tenant: str) -> str | None:
    """Why ``sender`` may not change ``tenant``'s workflows under ``bundle``, or None."""
    now = bundle.principals.get(sender.name)
    if now is None or now.role != AUTHOR:
        return f"{sender.name} is not an author of workflows (trust bundle revision {bundle.revision})"
    if now.tenant != tenant:
        return f"{sender.name} authors workflows of tenant {now.tenant!r}, not {tenant!r}"
    return None


def parse_definition(raw: dict[str, Any] | None) -> WorkflowDefinition:
    if raw is None:
        raise Refused("publish needs a definition")
    try:
        return WorkflowDefinition.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'workflow'}: {e['msg']}" for e in exc.errors())
        raise Refused(f"not a valid workflow: {problems}"[:1500]) from None


class Registry:
    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self._parsed: OrderedDict[str, WorkflowDefinition] = OrderedDict()

    async def catalog(self, tenant: str) -> WorkflowCatalog:
        rec, _ = await st.load(self.kv, WorkflowCatalog.key(tenant), WorkflowCatalog)
        return rec or WorkflowCatalog()

    async def version(self, tenant: str, name: str, version: str) -> WorkflowVersion | None:
        rec, _ = await st.load(self.kv, WorkflowVersion.key(tenant, name, version), WorkflowVersion)
        return rec

    # --- changes ------------------------------------------------------------------------------

    async def apply(self, m: WorkflowChange, change_id: str) -> WorkflowChanged:
        """Apply an author's change (their right already judged); ``Refused`` says why not."""
        if m.action == "publish":
            return await self._publish(m, change_id)
        return await self._set_status(m, change_id)

    async def _publish(self, m: WorkflowChange, change_id: str) -> WorkflowChanged:
        wf = parse_definition(m.definition)
        if wf.name != m.name:
            raise Refused(f"the definition is named {wf.name!r}, the change publishes {m.name!r}")
        version = wf.digest()
        if m.version and m.version != version:
            raise Refused(
                f"the definition's version here is {version}, the author computed {m.version} "
                "(a different definition than the author saw, or another canonical form)"
            )
        now = time.time()
        event = WorkflowEvent(action="publish", by=m.author, at=now, reason=m.reason, change_id=change_id)

        def create(rec: WorkflowVersion | None) -> WorkflowVersion | None:
            if rec is not None:
                return None  # the same definition, published before: a version cannot change
            return WorkflowVersion(
                tenant=m.tenant, workflow=m.name, version=version, definition=_canonical(wf),
                published_by=m.author, published_at=now, history=[event],
            )  # fmt: skip

        rec, created = await st.update(self.kv, WorkflowVersion.key(m.tenant, m.name, version), WorkflowVersion, create)
        assert rec is not None
        if not created and change_id not in {e.change_id for e in rec.history}:
            # Published before by another change: nothing is written (not even its catalogue).
            catalog = await self.catalog(m.tenant)
            return self._answer(m, rec, catalog, changed=False)
        catalog = await self._list(m.tenant, rec)
        return self._answer(m, rec, catalog, changed=True)

    async def _set_status(self, m: WorkflowChange, change_id: str) -> WorkflowChanged:
        if not m.version:
            raise Refused(f"{m.action} names a version (NAME@VERSION)")
        target = {"deprecate": "deprecated", "restore": "active", "delete": "deleted"}[m.action]
        key = WorkflowVersion.key(m.tenant, m.name, m.version)
        event = WorkflowEvent(action=m.action, by=m.author, at=time.time(), reason=m.reason, change_id=change_id)

        def change(rec: WorkflowVersion | None) -> WorkflowVersion | None:
            if rec is None:
                raise Refused(f"tenant {m.tenant} has no workflow {m.name}@{m.version}")
            if change_id in {e.change_id for e in rec.history} or rec.status == target:
                return None  # applied already (a redelivery), or already so
            if rec.status == "deleted":
                raise Refused(
                    f"{m.name}@{m.version} was deleted: it stays deleted (a changed definition, even only its "
                    "description, publishes as a new version)"
                )
            rec.status = target  # type: ignore[assignment]
            rec.history.append(event)
            return rec

        rec, changed = await st.update(self.kv, key, WorkflowVersion, change)
        assert rec is not None
        catalog = await self._list(m.tenant, rec)
        return self._answer(m, rec, catalog, changed=changed or change_id in {e.change_id for e in rec.history})

    async def _list(self, tenant: str, rec: WorkflowVersion) -> WorkflowCatalog:
        """The catalogue with ``rec`` in it as it is now (appended when new)."""

        def put(cat: WorkflowCatalog | None) -> WorkflowCatalog | None:
            cat = cat or WorkflowCatalog()
            versions = cat.workflows.setdefault(rec.workflow, [])
            entry = next((e for e in versions if e.version == rec.version), None)
            if entry is None:
                versions.append(
                    CatalogEntry(
                        version=rec.version, status=rec.status, published_at=rec.published_at,
                        published_by=rec.published_by,
                    )
                )  # fmt: skip
            elif entry.status != rec.status:
                entry.status = rec.status
            else:
                return None
            return cat

        cat, _ = await st.update(self.kv, WorkflowCatalog.key(tenant), WorkflowCatalog, put)
        return cat or WorkflowCatalog()

    @staticmethod
    def _answer(m: WorkflowChange, rec: WorkflowVersion, catalog: WorkflowCatalog, *, changed: bool) -> WorkflowChanged:
        return WorkflowChanged(
            tenant=m.tenant, task_id=m.task_id, action=m.action, name=m.name, version=rec.version, accepted=True,
            changed=changed, status=rec.status, latest=catalog.latest(m.name),
        )  # fmt: skip

    # --- tasks --------------------------------------------------------------------------------

    async def resolve(self, tenant: str, ref: str, inputs: dict[str, Any]) -> Resolved:
        """The version a task of ``tenant`` naming ``ref`` runs, its inputs checked against the
        workflow's ``inputs`` schema; ``Refused`` says why it cannot (no such workflow, no active
        version, a version withdrawn, inputs that do not fit)."""
        try:
            name, version = parse_ref(ref)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        if version == "latest":
            catalog = await self.catalog(tenant)
            if name not in catalog.workflows:
                raise Refused(f"tenant {tenant} has no workflow {name!r} (publish it: meshctl workflow publish)")
            version = catalog.latest(name)
            if not version:
                raise Refused(f"workflow {name!r} of tenant {tenant} has no active version (all deprecated or deleted)")
        rec = await self.version(tenant, name, version)
        if rec is None:
            raise Refused(f"tenant {tenant} has no workflow {name}@{version}")
        if rec.status != "active":
            last = rec.history[-1] if rec.history else None
            why = f" by {last.by}" + (f": {last.reason}" if last and last.reason else "") if last else ""
            raise Refused(f"workflow {name}@{version} is {rec.status}{why}; no new task may start it")
        wf = self.definition(rec)
        if wf.inputs is not None:
            try:
                jsonschema.validate(inputs, wf.inputs)
            except jsonschema.ValidationError as exc:
                where = ".".join(str(p) for p in exc.absolute_path) or "inputs"
                raise Refused(f"inputs of {name}@{version}: {where}: {exc.message}"[:1000]) from None
            except jsonschema.SchemaError as exc:
                raise Refused(
                    f"workflow {name}@{version} has an unusable inputs schema: {exc.message}"[:1000]
                ) from None
        return Resolved(rec, wf)

    async def pinned(self, tenant: str, ref: str) -> WorkflowDefinition:
        """The definition of the version a task pinned (``name@version``), whatever its status now."""
        name, version = parse_ref(ref)
        rec = await self.version(tenant, name, version)
        if rec is None:
            raise Refused(f"workflow {ref} is gone from the registry")
        return self.definition(rec)

    def cached(self, ref: str) -> WorkflowDefinition | None:
        """The definition of ``name@version`` if this process has read it (``pinned``), else None."""
        return self._parsed.get(ref.rpartition("@")[2])

    def definition(self, rec: WorkflowVersion) -> WorkflowDefinition:
        wf = self._parsed.get(rec.version)
        if wf is None:
            wf = WorkflowDefinition.model_validate(rec.definition)
            if wf.digest() != rec.version:
                raise Refused(
                    f"workflow {rec.workflow}@{rec.version}: the stored definition does not match its version"
                )
            self._parsed[rec.version] = wf
            while len(self._parsed) > KEPT:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(rec.version)
        return wf


def _canonical(wf: WorkflowDefinition) -> dict[str, Any]:
    """What is stored: the definition with its defaults filled in (its digest is of this)."""
    out: dict[str, Any] = wf.model_dump(mode="json")
    return out
