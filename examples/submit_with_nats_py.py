"""Submit a task to AgentMesh with nothing but nats-py, PyJWT and PyNaCl, and wait for the outcome.

This is how your own application integrates: it holds its tenant's client identity
(a NATS .creds file and an Ed25519 signing key, both minted by `meshctl init`) and
its tenant's data key (the mesh keeps the tenant's content sealed at rest with it), and
hands a `task.submitted` message in at its door. Run:

    python examples/submit_with_nats_py.py --tenant demo --home .mesh "What is 6 * 7?"
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import ssl
import sys
import time
import uuid
from pathlib import Path

import jwt  # PyJWT, with the cryptography extra for EdDSA
import nats
import nats.js.errors
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt, crypto_aead_xchacha20poly1305_ietf_encrypt

# The tenant's content (its goal, the answer, step outputs, tool arguments...) travels and rests
# sealed with the tenant's data key: a field's JSON, encrypted with XChaCha20-Poly1305, as
# {"$sealed": "dk1.<key id>.<base64url(24-byte nonce + ciphertext)>"}, bound by its associated
# data "<type>/v1|<tenant>|<task>|<field>" to its place. The README's data section lists the fields.


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def seal(key: bytes, place: str, value) -> dict:
    nonce = os.urandom(24)  # any nonce used once (the mesh derives its own from the content)
    plain = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    kid = hashlib.sha256(key).hexdigest()[:16]
    return {
        "$sealed": f"dk1.{kid}.{b64url(nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(plain, place.encode(), nonce, key))}"
    }


def opened(key: bytes, body: dict) -> dict:
    """``body`` with each sealed field opened (a field that does not open raises)."""
    out = dict(body)
    for field, value in body.items():
        if isinstance(value, dict) and set(value) == {"$sealed"}:
            raw = base64.urlsafe_b64decode(value["$sealed"].split(".", 2)[2] + "==")
            place = f"{body['type']}/v1|{body['tenant']}|{body['task_id']}|{field}".encode()
            out[field] = json.loads(crypto_aead_xchacha20poly1305_ietf_decrypt(raw[24:], place, raw[:24], key))
    return out


async def main(goal: str, tenant: str, home: Path, nats_url: str) -> int:
    principal = f"client.{tenant}"
    creds = home / "secrets" / "creds" / f"{principal}.creds"
    signing_key = (home / "secrets" / "keys" / f"{principal}.pem").read_bytes()
    data_key = bytes.fromhex((home / "secrets" / "keys" / f"data.{tenant}.key").read_text())
    task_id = f"t-{uuid.uuid4().hex[:12]}"

    # 1. Connect as the tenant's client, over TLS verified against the mesh's CA. Its reply
    #    inbox prefix is the only inbox it may read.
    tls = ssl.create_default_context(cafile=str(home / "tls" / "ca.pem"))
    nc = await nats.connect(nats_url, user_credentials=str(creds), inbox_prefix=f"_INBOX_client_{tenant}", tls=tls)

    # 2. Follow the task before submitting: progress events and the outcome, for this task only.
    outcome = asyncio.get_running_loop().create_future()

    async def on_message(msg):
        body = opened(data_key, json.loads(msg.data))
        if body["type"] == "event.progress":
            print(f"  [{body['source']:>13}] {body['stage']}: {body['message']}")
        elif body["type"] in ("task.completed", "task.failed", "task.rejected") and not outcome.done():
            outcome.set_result(body)

    await nc.subscribe(f"event.v1.{tenant}.{task_id}.>", cb=on_message)
    await nc.subscribe(f"task.v1.{tenant}.{task_id}.>", cb=on_message)

    # 3. The message body, and a signed identity token over its exact bytes.
    sealed_goal = seal(data_key, f"task.submitted/v1|{tenant}|{task_id}|goal", goal)
    body = json.dumps({"type": "task.submitted", "tenant": tenant, "task_id": task_id, "goal": sealed_goal}).encode()
    # as meshctl and the TypeScript client name it: a resubmission is stored once, whoever sends it
    msg_id = f"task.submitted:{tenant}:{task_id}:1"
    # What the budget may know of the task (it follows every task from the messages' headers and
    # may read no body): the limits and labels exactly as the body gives them (none here), covered
    # by the token (fct). Without it the budget applies the default limits.
    facts = json.dumps({"labels": {}, "limits": {}}, separators=(",", ":"), sort_keys=True)
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": principal,
            "ten": tenant,
            "typ": "task.submitted",
            "dig": hashlib.sha256(body).hexdigest(),
            "mid": msg_id,  # the token is valid for this message id only (no replay under another)
            "fct": hashlib.sha256(facts.encode()).hexdigest(),
            "iat": now,
            "exp": now + 300,  # at most 540 s: a token outliving the 10-minute dedup window is refused
        },
        signing_key,
        algorithm="EdDSA",
        headers={"kid": principal},
    )
    headers = {
        "Nats-Msg-Id": msg_id,
        "Mesh-Schema": "task.submitted/v1",
        "Mesh-Identity": token,
        "Mesh-Facts": facts,
    }

    # 4. Hand it in at its door: a tenant writes to no stream itself. The planner checks it, charges
    # it to the tenant's quota, stores it on task.v1.<tenant>.<task>.submitted and answers as
    # JetStream would, so the JetStream publish call works unchanged: it returns once the task is
    # durably accepted, or raises APIError with the refusal (quota_exceeded: ..., invalid: ...).
    try:
        ack = await nc.jetstream().publish(f"door.task.v1.{tenant}.{task_id}.submitted", body, headers=headers)
    except nats.js.errors.APIError as exc:
        print(f"refused: {exc.description}", file=sys.stderr)
        await nc.close()
        return 4
    print(f"submitted {task_id} (stream {ack.stream}, seq {ack.seq})")

    result = await asyncio.wait_for(outcome, timeout=60)
    await nc.close()
    if result["type"] == "task.completed":
        print(f"\n{result['answer']}\n\nusage: {result['usage']}")
        return 0
    print(f"{result['type']}: {result['reason']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("goal")
    parser.add_argument("--tenant", default="demo")
    parser.add_argument("--home", type=Path, default=Path(".mesh"), help="mesh home holding the identities")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    a = parser.parse_args()
    sys.exit(asyncio.run(main(a.goal, a.tenant, a.home, a.nats_url)))
