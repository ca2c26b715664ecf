"""People's changes to a tenant's tool servers (``tools.change``), applied to KV ``toolservers``.

``add`` (again: a change of the server) and ``remove`` are an author's right, ``approve`` an
approver's (``ACTIONS``), each judged under the newest trust bundle for the signer's own tenant.
An approval pins exactly the definitions the approver read (their hashes, from ``meshctl tools
list``): if the server lists something else by the time the approval arrives, it is refused, so
nobody approves a description they never saw. Every change, refused ones too, goes on the tenant's
audit chain (``tools.<action>`` or ``tools.change-refused``) and is answered on the change's id.
Records are written compare-and-set, so two replicas handling two changes of one server at once
cannot lose one.
"""

from __future__ import annotations

import time
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from mesh_contracts.base import AUTHOR
from mesh_contracts.v1.tool_servers import (
    ACTIONS,
    Pin,
    ToolsChange,
    ToolsChanged,
    ToolServerRecord,
    ToolServerState,
    field_hash,
)
from mesh_durable.chain import Appender
from mesh_guardrails.injection import THRESHOLD
from mesh_host import Mesh
from mesh_identity import Principal, TrustBundle
from mesh_kit import Delivery
from mesh_kit.delivery import Reject
from mesh_tool_executor import metrics as tool_executor_metrics
from mesh_tool_executor.errors import ToolExecutorError
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_tool_executor.tool_servers import TenantServers
from mesh_tool_executor.tools import Registry

_CAS_TRIES = 5


class Refused(ToolExecutorError):
    """A change that cannot be applied; the message says why, for the person who asked."""


def may_change(bundle: TrustBundle, sender: Principal, tenant: str, action: str) -> str | None:
    """Why ``sender`` may not make ``action`` to ``tenant``'s tool servers under ``bundle``, or None."""
    now = bundle.principals.get(sender.name)
    role = ACTIONS[action]
    if now is None or now.role != role:
        who = "an author (author.<tenant>.<person>)" if role == AUTHOR else "an approver (approver.<tenant>.<person>)"
        return f"{sender.name} may not {action} a tool server: that is {who}'s right (trust bundle revision {bundle.revision})"
    if now.tenant != tenant:
        return f"{sender.name} acts for tenant {now.tenant!r}, not {tenant!r}"
    return None


class ToolChanges:
    """Applies ``tools.change`` (bound to the bucket and the tenant servers once started)."""

    def __init__(self, mesh: Mesh, settings: ToolExecutorSettings, audit: Appender, builtins: Registry,
                 servers: TenantServers) -> None:  # fmt: skip
        self.mesh, self.settings, self.audit = mesh, settings, audit
        self.builtins, self.servers = builtins, servers

    async def on_change(self, m: ToolsChange, d: Delivery) -> None:
        if m.by != d.sender.name:
            raise Reject(f"by {m.by!r} is not the signer {d.sender.name!r}")
        why = may_change(await self.mesh.newest_trust(), d.sender, m.tenant, m.action)
        answer: ToolsChanged | None = None
        if why is None:
            try:
                answer = await self.apply(m)
            except Refused as exc:
                why = str(exc)
        if answer is None:
            answer = ToolsChanged(tenant=m.tenant, task_id=m.task_id, action=m.action, server=m.server,
                                  accepted=False, reason=why or "")  # fmt: skip
        self.mesh.count(tool_executor_metrics.M_SERVER_CHANGES, {"action": m.action, "accepted": str(answer.accepted)})
        detail: dict[str, Any] = {"server": m.server, "reason": m.reason, "version": answer.version,
                                  "changed": answer.changed}  # fmt: skip
        if m.definition is not None:
            detail["definition"] = m.definition.model_dump(mode="json")
        if m.action == "approve":
            detail.update(pins=dict(m.pins), approved=answer.approved, forced=m.force)
        if answer.accepted:
            kind, key = f"tools.{m.action}", f"{m.task_id}:{m.action}"
        else:
            kind, key, detail = "tools.change-refused", f"{m.task_id}:refused", {**detail, "refused": answer.reason}
        await self.audit.append(m.tenant, m.task_id, kind, key, actor=d.sender.name, source=d.msg_id, detail=detail)
        await self.mesh.publish(answer, key="changed", causation=d.msg_id)

    async def apply(self, m: ToolsChange) -> ToolsChanged:
        kv = self.servers.kv
        if kv is None:
            raise RuntimeError("the toolservers bucket is not open yet")  # retried: the service is starting
        key = ToolServerRecord.key(m.tenant, m.server)
        for _ in range(_CAS_TRIES):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                entry = None
            rec = ToolServerRecord.from_bytes(entry.value, key) if entry is not None and entry.value else None
            new, answer = await self._decide(m, rec)
            if new is None:
                return answer
            try:
                if new == "delete":
                    assert entry is not None
                    await kv.delete(key, last=entry.revision)
                elif entry is None or not entry.value:
                    await kv.create(key, new.to_bytes())
                else:
                    await kv.update(key, new.to_bytes(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # changed meanwhile: decide again on what is there now
            return answer
        raise Refused(f"{m.server}: changed by someone else {_CAS_TRIES} times meanwhile; try again")

    async def _decide(self, m: ToolsChange, rec: ToolServerRecord | None) -> tuple[Any, ToolsChanged]:
        """(what to write: a record, ``"delete"`` or None, the answer)."""

        def answer(changed: bool, version: int, approved: list[str] | None = None) -> ToolsChanged:
            return ToolsChanged(tenant=m.tenant, task_id=m.task_id, action=m.action, server=m.server, accepted=True,
                                changed=changed, version=version, approved=approved or [])  # fmt: skip

        now = time.time()
        if m.action == "remove":
            if rec is None:
                raise Refused(f"tenant {m.tenant} has no tool server {m.server!r}")
            return "delete", answer(True, rec.version)
        if m.action == "add":
            if m.definition is None:
                raise Refused("add needs the server's definition (endpoints, auth, rules)")
            if rec is None:
                self._may_add(m)
                new = ToolServerRecord(tenant=m.tenant, server=m.server, definition=m.definition, added_by=m.by,
                                       changed_by=m.by, changed_at=now)  # fmt: skip
                return new, answer(True, 1)
            if rec.definition == m.definition:
                return None, answer(False, rec.version)
            # Endpoints, auth or rules changed: the approved definitions of its tools stay approved
            # (they are about what the tools say, which the next listing checks again).
            new = rec.model_copy(update={"definition": m.definition, "version": rec.version + 1, "changed_by": m.by,
                                         "changed_at": now})  # fmt: skip
            return new, answer(True, new.version)
        if rec is None:
            raise Refused(f"tenant {m.tenant} has no tool server {m.server!r}: add it first")
        pins = await self._pins(m, rec)
        if all(rec.pins.get(t) is not None and rec.pins[t].sha256 == p.sha256 for t, p in pins.items()):
            return None, answer(False, rec.version, sorted(pins))
        new = rec.model_copy(update={"pins": {**rec.pins, **pins}, "version": rec.version + 1, "changed_by": m.by,
                                     "changed_at": now})  # fmt: skip
        return new, answer(True, new.version, sorted(pins))

    def _may_add(self, m: ToolsChange) -> None:
        taken = {t.split("__", 1)[0] for t in self.builtins.tools if "__" in t}
        if m.server in taken:
            raise Refused(f"{m.server!r} is the name of a tool server the mesh mounts for every tenant: choose another")
        limit = self.settings.tool_servers_per_tenant
        have = sum(1 for t, _ in self.servers.mounted if t == m.tenant)
        if limit and have >= limit:
            raise Refused(f"quota: tenant {m.tenant} has {have} tool servers, the most it may register "
                          "(MESH_TOOL_SERVERS_PER_TENANT)")  # fmt: skip

    async def _pins(self, m: ToolsChange, rec: ToolServerRecord) -> dict[str, Pin]:
        """The pins of an approval, each checked against the server's latest listing."""
        if not m.pins:
            raise Refused("approve names the tools and the hashes of the definitions read (meshctl tools list)")
        try:
            entry = await self.servers.kv.get(ToolServerState.key(m.tenant, m.server))
            state = ToolServerState.from_bytes(entry.value, ToolServerState.key(m.tenant, m.server))
        except KeyNotFoundError:
            raise Refused(
                f"{m.server} has not been listed yet: wait for its first listing (meshctl tools list)"
            ) from None
        listed = {t.name: t for t in state.tools}
        pins: dict[str, Pin] = {}
        for tool, sha in sorted(m.pins.items()):
            t = listed.get(tool)
            if t is None:
                raise Refused(
                    f"{m.server} does not list a tool {tool!r}" + (f" ({state.error})" if state.error else "")
                )
            if t.sha256 != sha:
                raise Refused(f"{m.server}__{tool}: the server now lists a definition other than the one approved "
                              f"({sha[:12]}...; listed now {t.sha256[:12]}...): read it again (meshctl tools list)")  # fmt: skip
            if t.injection_score >= THRESHOLD and not m.force:
                raise Refused(f"{m.server}__{tool}: its description is flagged by the injection detector "
                              f"(score {t.injection_score:.2f}: {', '.join(t.signals)}): approve with --force and a "
                              "reason if you have read it")  # fmt: skip
            pins[tool] = Pin(sha256=sha, description_sha256=field_hash(t.description),
                             schema_sha256=field_hash(t.input_schema), approved_by=m.by, approved_at=time.time())  # fmt: skip
        return pins
