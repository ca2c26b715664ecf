"""The approver's side of human approvals: list the calls waiting, approve or deny one.

An approver is a separate identity (``approver``): the only principal the contracts allow to
produce ``approval.decided``, and the only one besides the tool-executor that may read the
``approvals`` bucket. A decision is signed with the approver's key and names the approver,
and the tool-executor checks both.

A person (``meshctl approvers add alice --tenant acme``, see :mod:`meshctl.approvers`) decides
with their own key: ``Approver.of(ids, url, person="approver.acme.alice")`` connects as the
console's ``approver`` user but signs as alice, who is believed for ``acme`` only. Once a tenant
has named approvers they alone decide its calls: the console's own identity is refused for that
tenant (here, before anything is sent, from the mesh home's trust bundle; and by the
tool-executor, under the newest published one).

A decision that comes after the call's task ended is recorded and void: nothing is performed
(``decide`` raises ``ApprovalError`` saying so). The tool-executor voids a wait by itself
within a second or so of its task's end, so ``list`` shows only calls a decision can still
perform.
"""

from __future__ import annotations

import asyncio
import builtins
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client as NATS

from mesh_contracts.stored import APPROVAL_RECORD, open_stored
from mesh_contracts.v1 import ApprovalDecided, PlanReviewed
from mesh_durable.tail import Reader
from mesh_identity import Signer
from mesh_kit import envelope as env
from mesh_kit.settings import inbox_prefix, log_nats_error, nats_servers, tls_context
from mesh_kit.state import bind
from meshctl.errors import MeshctlError

if TYPE_CHECKING:
    from meshctl.identity import Identities

BUCKET = "approvals"


class ApprovalError(MeshctlError):
    """An approval that cannot be decided (unknown id, already decided); one line for the operator."""


class Approver:
    def __init__(
        self,
        nats_url: str,
        creds: Path,
        signing_key: Path,
        name: str = "approver",
        tls_ca: Path | None = None,
        tenant: str | None = None,
        trust_bundle: Path | None = None,
    ) -> None:
        self.nats_url, self.creds, self.name, self.tls_ca = nats_url, creds, name, tls_ca
        self.tenant = tenant  # a person approves for one tenant; the console's own identity for the others
        self.trust_bundle = trust_bundle
        """The mesh home's bundle: whom each tenant has named to approve (the console defers to them)."""
        self.signer = Signer.from_file(name, signing_key)
        self.nc: NATS | None = None
        self.kv: Any = None

    async def __aenter__(self) -> Approver:
        self.nc = await nats.connect(
            nats_servers(self.nats_url),
            user_credentials=str(self.creds),
            # the NATS user is the console's own (``approver``) whoever signs: its inbox, its name
            name="approver",
            inbox_prefix=inbox_prefix("approver"),
            connect_timeout=5,
            max_reconnect_attempts=2,
            error_cb=log_nats_error,
            tls=tls_context(self.tls_ca),
        )
        self.kv = bind(self.nc, BUCKET)
        return self

    @classmethod
    def of(cls, ids: Identities, nats_url: str, person: str | None = None) -> Approver:
        """The approver identity a mesh home holds (not yet connected); ``person``: one of the
        people it trusts to approve for a tenant (``approver.<tenant>.<name>``)."""
        from mesh_identity import TrustBundle

        tls_ca = ids.tls_ca if ids.tls_ca.exists() else None
        if not person or person == "approver":
            return cls(nats_url, ids.creds("approver"), ids.signing_key("approver"), tls_ca=tls_ca,
                       trust_bundle=ids.trust_bundle)  # fmt: skip
        p = TrustBundle.from_file(ids.trust_bundle).principals.get(person)
        if p is None or p.role != "approver" or not p.tenant:
            raise ApprovalError(f"{person} is not an approver of this mesh (list them with: meshctl approvers list)")
        if not ids.signing_key(person).exists():
            raise ApprovalError(f"no signing key for {person} in {ids.home} (it is held by that person)")
        return cls(nats_url, ids.creds("approver"), ids.signing_key(person), person, tls_ca, p.tenant)

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def get(self, approval_id: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv.get(approval_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        return _opened(entry.value, approval_id) if entry.value else None

    async def list(self, *, everything: bool = False) -> list[dict[str, Any]]:
        """Waiting approvals, oldest first (``everything``: decided ones too)."""
        assert self.nc is not None
        reader = Reader(self.nc, f"KV_{BUCKET}")
        try:
            current = await reader.current(BUCKET)  # every live record in one request, no consumer
        finally:
            await reader.close()
        records = [_opened(e.data, key) for key, e in current.items() if e.data]
        return sorted(
            (r for r in records if (everything or r["status"] == "pending") and self.tenant in (None, r["tenant"])),
            key=lambda r: r["requested_at"],
        )

    async def review(
        self, tenant: str, task_id: str, draft: str, decision: str, *, steps: tuple[Any, ...] = (), comment: str = ""
    ) -> str:
        """Publish a signed decision on a task's draft plan (``plan.reviewed``): approve, reject or
        edit (``steps``). Returns its message id; the planner applies it or dead-letters it with why."""
        if self.tenant is not None and tenant != self.tenant:
            raise ApprovalError(
                f"task {tenant}/{task_id} is not {self.tenant}'s: {self.name} reviews for {self.tenant} only"
            )
        if self.tenant is None and (named := self.named(tenant)):
            raise ApprovalError(
                f"{tenant} names its own approvers ({', '.join(named)}): review as one of them (--as {named[0]}); "
                f"{self.name} may not"
            )
        msg = PlanReviewed(
            tenant=tenant, task_id=task_id, draft=draft, decision=decision, steps=steps,  # type: ignore[arg-type]
            reviewed_by=self.name, comment=comment,
        )  # fmt: skip
        body = msg.to_bytes()
        msg_id = env.message_id(msg.type, msg.tenant, msg.task_id, uuid.uuid4().hex[:16])
        assert self.nc is not None
        await self.nc.jetstream().publish(
            msg.subject(), body, headers=env.headers_for(self.signer, msg, body, msg_id), timeout=5.0
        )
        return msg_id

    async def decide(
        self, approval_id: str, approved: bool, comment: str = "", *, wait_s: float = 10.0
    ) -> dict[str, Any]:
        """Publish a signed decision and wait until the tool-executor has recorded it; returns
        the record as stored after the decision."""
        rec = await self.get(approval_id)
        if rec is None:
            raise ApprovalError(f"no approval {approval_id!r} (list them with: meshctl approvals)")
        if self.tenant is not None and rec["tenant"] != self.tenant:
            raise ApprovalError(
                f"approval {approval_id} is not {self.tenant}'s: {self.name} decides for {self.tenant} only"
            )
        if self.tenant is None and (named := self.named(rec["tenant"])):
            raise ApprovalError(
                f"approval {approval_id} is {rec['tenant']}'s, and {rec['tenant']} names its own approvers "
                f"({', '.join(named)}): decide as one of them (--as {named[0]}); {self.name} may not"
            )
        if rec["status"] != "pending":
            by = f" by {rec['decided_by']}" if rec.get("decided_by") else ""
            why = f": {rec['void']}, nothing was performed" if rec.get("void") else ""
            raise ApprovalError(f"approval {approval_id} is already {rec['status']}{by}{why}")
        msg = ApprovalDecided(
            tenant=rec["tenant"],
            task_id=rec["task_id"],
            approval_id=approval_id,
            approved=approved,
            decided_by=self.name,
            comment=comment,
        )
        body = msg.to_bytes()
        headers = env.headers_for(
            self.signer, msg, body, env.message_id(msg.type, msg.tenant, msg.task_id, uuid.uuid4().hex[:16])
        )
        assert self.nc is not None
        await self.nc.jetstream().publish(msg.subject(), body, headers=headers, timeout=5.0)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            now = await self.get(approval_id)
            if now is not None and now["status"] == "void":
                raise ApprovalError(
                    f"approval {approval_id} is void: {now.get('void') or 'its task ended'}; the decision is recorded "
                    "and nothing was performed"
                )
            if now is not None and now["status"] != "pending":
                return now
            await asyncio.sleep(0.1)
        raise ApprovalError(f"the tool-executor did not record the decision on {approval_id} within {wait_s:g}s")

    def named(self, tenant: str) -> builtins.list[str]:  # 'list' is a method of this class
        """The people ``tenant`` has named to approve its calls, from the mesh home's trust bundle
        (empty without one: then only the tool-executor's check stands)."""
        if self.trust_bundle is None or not self.trust_bundle.exists():
            return []
        from mesh_identity import TrustBundle

        return [p.name for p in TrustBundle.from_file(self.trust_bundle).approvers(tenant)]


def _opened(data: bytes, key: str) -> dict[str, Any]:
    """An approval record with the call and comment it seals opened (they are the tenant's
    content: the person deciding sees them with the data keys ``meshctl`` holds)."""
    value: dict[str, Any] = open_stored(data, key, APPROVAL_RECORD)
    return value
