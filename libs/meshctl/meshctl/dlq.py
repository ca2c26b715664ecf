"""Re-drive dead letters after a fix: `meshctl dlq retry SEQ`.

A dead letter is either an in-app copy (original body and headers, reason, original
subject) or the server's MAX_DELIVERIES advisory for a consumer that crashed on every
attempt (then the original is fetched from its stream). Re-driving publishes the original
body and headers to the original subject under a fresh, deterministic message id
(`redrive:<dlq seq>`, so re-running the command is harmless), marks it with
`Mesh-Redrive-Of` and the time the original was first stored, and removes the entry.

The consumer judges the identity token at that original time, so a re-drive days later
still verifies. That grants no new power: only the contract's declared producers, who can
sign fresh tokens anyway, or the admin identity may publish on the subject. Consumers'
idempotency (ledger, records) makes a re-drive of work that partly happened safe.
"""

from __future__ import annotations

import json

import nats

from mesh_kit import envelope as env

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES."


class RedriveError(Exception):
    """The entry cannot be re-driven; the message says why."""


async def redrive(nc: nats.NATS, seq: int) -> str:
    js = nc.jetstream()
    try:
        letter = await js.get_msg("DLQ", seq)
    except nats.js.errors.NotFoundError:
        raise RedriveError(f"no dead letter with sequence {seq}") from None
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
            raise RedriveError(f"the original of #{seq} is gone from {advisory.get('stream')}") from None
        subject, body, headers = original.subject or "", original.data or b"", dict(original.headers or {})
        first_stored = f"{original.time.timestamp():.6f}" if original.time else ""
    else:
        raise RedriveError(f"#{seq} on {letter.subject} is not a dead letter this tool knows")
    times = [float(t) for t in (headers.get(env.ORIGINAL_STORED_AT), first_stored) if t]
    for k in (env.MSG_ID, "Nats-Expected-Stream", env.REDRIVE_OF, env.ORIGINAL_STORED_AT):
        headers.pop(k, None)
    headers[env.REDRIVE_OF] = str(seq)
    headers[env.MSG_ID] = f"redrive:{seq}"
    if times:
        headers[env.ORIGINAL_STORED_AT] = f"{min(times):.6f}"
    ack = await js.publish(subject, body, headers=headers, timeout=10.0)
    await js.delete_msg("DLQ", seq)
    return f"re-drove dead letter #{seq} to {subject} (stream {ack.stream}, seq {ack.seq})"
