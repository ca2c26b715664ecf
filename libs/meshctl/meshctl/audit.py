"""Where a tenant's tool effects went (the ``tool.audited`` records that name a destination),
and its tamper-evident audit chain: listed, and verified whole or broken at the first bad link.

The records keep each destination's domain or host in clear, a keyed hash, and the whole value
sealed to the tenant's auditor key (``secrets/keys/auditor.<tenant>.key``, minted by ``meshctl
init``): only whoever holds that key reads where an email really went. Read as the admin
identity (the TOOL stream is the audit trail).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox
from nats.aio.client import Client as NATS

from mesh_contracts import topology as topo
from mesh_durable import sealing
from mesh_durable.chain import Anchor, Verdict, chain_filter, parse
from mesh_durable.tail import DirectGetError, Reader, Stored

READ_TIMEOUT_S = 0.5


async def audited(nc: NATS, tenant: str, task_id: str = "") -> list[dict[str, Any]]:
    """Every ``tool.audited`` record of ``tenant`` (of one task when given), oldest first."""
    subject = f"tool.*.{tenant}.{task_id or '*'}.audited"
    sub = await nc.jetstream().subscribe(subject, stream="TOOL", ordered_consumer=True)
    out: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            except TimeoutError:
                return out
            out.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()


def opener(key_file: Path) -> SealedBox[PrivateKey] | None:
    """The tenant auditor's key, if this operator holds it (None otherwise: values stay sealed)."""
    try:
        return SealedBox(PrivateKey(base64.b64decode(key_file.read_text().strip())))
    except (OSError, ValueError, binascii.Error):
        return None


RESTORED = "stream.restored"
RESTORED_KEY = "restored.AUDIT"
"""Where ``meshctl restore`` leaves its signed statement that it re-created the AUDIT stream (the
``trust`` bucket: operators write it, only they sign such statements)."""


async def restored_statement(nc: NATS) -> str | None:
    try:
        entry = await (await nc.jetstream().key_value(topo.TRUST_BUCKET)).get(RESTORED_KEY)
    except Exception:  # noqa: BLE001 - none stored (the usual case), or no bucket: no statement
        return None
    return entry.value.decode() if entry.value else None


def created_vouched(created: float | None, statement: str | None, verifier: Any) -> tuple[float | None, str]:
    """When the AUDIT stream's records may begin: the stream's creation, or, when an operator's
    signed restore statement names this very creation (``meshctl restore``), the creation of the
    stream it was restored from; and a note saying so. A stream re-created and refilled by anyone
    else still shows as records older than their stream."""
    if created is None or not statement:
        return created, ""
    try:
        who, claims = verifier.statement(statement, kind=RESTORED, roles=("admin",),
                                         require=["created", "was_created", "backup_at"])  # fmt: skip
    except Exception:  # noqa: BLE001 - not a valid statement: judged as no statement
        return created, ""
    if abs(float(claims["created"]) - created) > 2.0:
        return created, ""  # about an earlier creation: the stream was re-created since
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(created))
    of = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(claims["backup_at"])))
    return float(
        claims["was_created"]
    ), f"the AUDIT stream was restored at {when} UTC from a backup of {of} UTC ({who.name}'s signed statement)"


def chain_opener(key_file: Path) -> SealedBox[PrivateKey] | None:
    """What opens the sealed fields of a tenant's chain (``mesh_durable.sealing``): its auditor key."""
    return opener(key_file)


def opened(record: dict[str, Any], box: SealedBox[PrivateKey] | None) -> dict[str, Any]:
    """A chain link as stored, its sealed detail fields opened where ``box`` can (else why not)."""
    return {**record, "detail": sealing.open_detail(record.get("detail") or {}, box)}


async def chain_opened(nc: NATS, tenant: str, key_file: Path) -> list[dict[str, Any]]:
    """A tenant's chain as stored, oldest first, its sealed fields opened with ``key_file``."""
    box = chain_opener(key_file)
    return [opened(json.loads(s.data), box) for s in await chain(nc, tenant)]


def reveal(box: SealedBox[PrivateKey] | None, sealed: str) -> str:
    if not sealed:
        return "(not sealed: the tenant had no auditor key)"
    if box is None:
        return "(sealed)"
    try:
        return box.decrypt(base64.b64decode(sealed)).decode()
    except (CryptoError, ValueError, binascii.Error):
        return "(sealed to another key)"


def effects(records: list[dict[str, Any]], box: SealedBox[PrivateKey] | None, to: str = "") -> list[dict[str, Any]]:
    """One row per destination of every record that names one: the decision, the tool, where it
    went (opened when the auditor key is at hand), and whether the goal offered it."""
    rows = []
    for r in records:
        for d in r.get("destinations") or ():
            value = reveal(box, d.get("sealed", ""))
            if to and value.casefold() != to.casefold():
                continue
            rows.append(
                {
                    "task_id": r["task_id"],
                    "call_id": r["call_id"],
                    "tool": r["tool"],
                    "decision": r["decision"],
                    "decided_by": r.get("decided_by", ""),
                    "arg": d["arg"],
                    "where": d.get("where", ""),
                    "value": value,
                    "offered_by_goal": d.get("offered", False),
                    "digest": d.get("digest", ""),
                }
            )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no audited effect names a destination"
    lines = [f"{'TASK':18} {'DECISION':18} {'TOOL':12} {'ARG':5} {'GOAL':4} WHERE -> VALUE"]
    for r in rows:
        goal = "yes" if r["offered_by_goal"] else "no"
        lines.append(
            f"{r['task_id'][:18]:18} {r['decision'][:18]:18} {r['tool'][:12]:12} {r['arg'][:5]:5} {goal:4} "
            f"{r['where']} -> {r['value']}"
        )
    return "\n".join(lines)


# --- the tamper-evident chain (``mesh_contracts.v1.audit``, ``mesh_durable.chain``) -------------------


async def chain(nc: NATS, tenant: str) -> list[Stored]:
    """Every retained record of ``tenant``'s audit chain, in stored order (direct gets)."""
    return await stored(nc, topo.STREAMS["audit"], chain_filter(tenant))


async def anchors(nc: NATS, tenant: str) -> list[Anchor]:
    """Every retained anchor of ``tenant``'s chain (KV ``anchors`` keeps a key's last 64)."""
    return [
        Anchor(s.data.decode(), s.time)
        for s in await stored(nc, "KV_anchors", f"$KV.anchors.{tenant}")
        if s.data and s.operation is None
    ]


async def stored(nc: NATS, stream: str, subject: str) -> list[Stored]:
    """Every message of ``stream`` matching ``subject`` (none if the stream does not exist yet)."""
    reader = Reader(nc, stream)
    try:
        return await reader.matching(subject)
    except DirectGetError as exc:
        if "no responders" in str(exc):
            return []  # a stream this mesh has not provisioned (yet): nothing recorded
        raise
    finally:
        await reader.close()


def render_chain(records: list[Stored], task: str = "") -> str:
    lines = [f"{'N':>6} {'WHEN (UTC)':19} {'TASK':18} {'KIND':28} ACTOR"]
    for s in records:
        r = parse(s.data)
        if task and r.task_id != task:
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.time))
        lines.append(f"{r.n:>6} {when:19} {r.task_id[:18]:18} {r.kind[:28]:28} {r.actor}")
    return "\n".join(lines) if len(lines) > 1 else "no audit record"


def render_verdict(v: Verdict, protected: bool | None) -> str:
    if v.ok:
        head = f"record {v.head.n}, sha256 {v.head.hash}" if v.head else "empty"
        lines = [
            f"audit chain of {v.tenant}: whole. {v.records} records (from record {v.first or '-'}), head {head}",
            f"anchors held against it: {v.anchors}",
        ]
    else:
        lines = [f"audit chain of {v.tenant}: BROKEN at record {v.broken_at}: {v.reason}",
                 f"(records checked before the break: {v.records})"]  # fmt: skip
    if v.kinds:
        lines.append("kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(v.kinds.items())))
    lines += [f"note: {n}" for n in v.notes]
    if protected is False:
        lines.append("WARNING: the AUDIT stream allows deletes or purges (was it re-created outside provisioning?)")
    return "\n".join(lines)
