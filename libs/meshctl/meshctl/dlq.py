"""Re-drive dead letters after a fix: `meshctl dlq retry SEQ`.

A dead letter is either an in-app copy (original body and headers, reason, original
subject) or the server's MAX_DELIVERIES advisory for a consumer that crashed on every
attempt (then the original is fetched from its stream). Re-driving publishes the original
body and headers to the original subject under a fresh, deterministic message id
(`redrive:<dlq seq>`, so re-running the command is harmless) with the operator's signed
re-drive statement, and removes the entry.

The statement (``Mesh-Redrive``, signed with the admin identity's key) names the subject, the
body's digest, the new message id, the original's id and the time the original was first
stored. The consumer verifies it like any token and then judges the original identity token at
that time and against the original's id, so a re-drive days later still verifies. Re-drive
headers without a valid operator statement are dead-lettered: whoever may publish on a subject
(a tenant's client, a service) cannot stretch a captured token's lifetime. Consumers'
idempotency (ledger, records) makes a re-drive of work that partly happened safe.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import jwt
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

from mesh_identity import Signer
from mesh_kit import envelope as env
from meshctl.errors import MeshctlError

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES."


class DeadLetterError(MeshctlError):
    """The entry is missing or cannot be re-driven; the message says why."""


async def entry(js: JetStreamContext, seq: int) -> RawStreamMsg:
    try:
        return await js.get_msg("DLQ", seq)
    except nats.js.errors.NotFoundError:
        raise DeadLetterError(f"no dead letter with sequence {seq}") from None


async def entries(js: JetStreamContext, *, newest: int | None = None) -> AsyncIterator[tuple[int, RawStreamMsg]]:
    """Dead letters in order (the ``newest`` few, if given). Re-driven entries are deleted, so
    sequences have gaps; an empty stream yields nothing."""
    info = await js.stream_info("DLQ")
    first, last = max(info.state.first_seq, 1), info.state.last_seq
    if newest is not None:
        first = max(first, last - newest + 1)
    for seq in range(first, last + 1):
        try:
            yield seq, await js.get_msg("DLQ", seq)
        except nats.js.errors.NotFoundError:
            continue


async def redrive(nc: NATS, seq: int, operator: Signer) -> str:
    js = nc.jetstream()
    letter = await entry(js, seq)
    h = dict(letter.headers or {})
    if env.DLQ_SUBJECT in h:
        subject, body = h[env.DLQ_SUBJECT], letter.data or b""
        headers = {k[len(env.ORIG_PREFIX) :]: v for k, v in h.items() if k.startswith(env.ORIG_PREFIX)}
        first_stored = h.get(env.DLQ_STORED_AT, "")
    elif (letter.subject or "").startswith(ADVISORY):
        advisory = json.loads(letter.data or b"{}")
        try:
            original = await js.get_msg(advisory["stream"], advisory["stream_seq"])
        except nats.js.errors.NotFoundError:
            raise DeadLetterError(f"the original of #{seq} is gone from {advisory.get('stream')}") from None
        subject, body, headers = original.subject or "", original.data or b"", dict(original.headers or {})
        first_stored = f"{original.time.timestamp():.6f}" if original.time else ""
    else:
        raise DeadLetterError(f"#{seq} on {letter.subject} is not a dead letter this tool knows")
    times = [float(t) for t in (headers.get(env.ORIGINAL_STORED_AT), first_stored) if t]
    original_id = _token_message_id(headers.get(env.IDENTITY, "")) or headers.get(env.MSG_ID, "")
    for k in (env.MSG_ID, "Nats-Expected-Stream", env.REDRIVE, env.REDRIVE_OF, env.ORIGINAL_STORED_AT):
        headers.pop(k, None)
    at = min(times) if times else time.time()
    headers[env.MSG_ID] = msg_id = f"redrive:{seq}"
    headers[env.REDRIVE_OF] = str(seq)
    headers[env.ORIGINAL_STORED_AT] = f"{at:.6f}"
    headers[env.REDRIVE] = operator.redrive(
        subject=subject, body=body, dlq_seq=seq, original_stored_at=at, original_msg_id=original_id, msg_id=msg_id
    )
    ack = await js.publish(subject, body, headers=headers, timeout=10.0)
    await js.delete_msg("DLQ", seq)
    return f"re-drove dead letter #{seq} to {subject} (stream {ack.stream}, seq {ack.seq})"


def _token_message_id(token: str) -> str:
    """The message id the original's identity token was issued for (the consumer checks the
    signature; the statement only has to name the same id)."""
    try:
        return str(jwt.decode(token, options={"verify_signature": False}).get("mid", ""))
    except jwt.PyJWTError:
        return ""
