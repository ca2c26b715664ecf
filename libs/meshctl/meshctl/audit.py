"""Where a tenant's tool effects went: the ``tool.audited`` records that name a destination.

The records keep each destination's domain or host in clear, a keyed hash, and the whole value
sealed to the tenant's auditor key (``secrets/keys/auditor.<tenant>.key``, minted by ``meshctl
init``): only whoever holds that key reads where an email really went. Read as the admin
identity (the TOOL stream is the audit trail).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import nats
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

READ_TIMEOUT_S = 0.5


async def audited(nc: nats.NATS, tenant: str, task_id: str = "") -> list[dict[str, Any]]:
    """Every ``tool.audited`` record of ``tenant`` (of one task when given), oldest first."""
    subject = f"tool.*.{tenant}.{task_id or '*'}.audited"
    sub = await nc.jetstream().subscribe(subject, stream="TOOL", ordered_consumer=True)
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            except TimeoutError:
                return out
            out.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()


def opener(key_file: Path) -> SealedBox | None:
    """The tenant auditor's key, if this operator holds it (None otherwise: values stay sealed)."""
    try:
        return SealedBox(PrivateKey(base64.b64decode(key_file.read_text().strip())))
    except (OSError, ValueError, binascii.Error):
        return None


def reveal(box: SealedBox | None, sealed: str) -> str:
    if not sealed:
        return "(not sealed: the tenant had no auditor key)"
    if box is None:
        return "(sealed)"
    try:
        return box.decrypt(base64.b64decode(sealed)).decode()
    except (CryptoError, ValueError, binascii.Error):
        return "(sealed to another key)"


def effects(records: list[dict[str, Any]], box: SealedBox | None, to: str = "") -> list[dict[str, Any]]:
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
