"""Rotate and revoke identities while the mesh runs.

**Rotation** of a principal (``meshctl rotate worker``, ``--all`` for the six services):

1. a new NATS user (new nkey, the same permissions) replaces its ``.creds`` file, and a new
   Ed25519 signing key is minted;
2. a new trust bundle trusting **both** signing keys is published, signed by the operator: to the
   ``trust`` bucket, which every service follows, and to ``trust-bundle.json``;
3. the new signing key replaces the key file: each service switches to it within a second (it
   polls its key file and signs with a new key once the published bundle trusts it);
4. after the grace period the old signing key is **retired** (it still verifies messages stored
   before that instant: a backlog, a dead letter re-driven later; never anything newer), and the
   old NATS user is **revoked** in the account JWT. The server drops its connections at once and
   the clients reconnect with the new ``.creds`` file they re-read on every connect.

**Revocation** (``meshctl revoke worker``) removes every signing key of the principal from the
bundle (messages it signed are refused from then on, in flight or not) and revokes its NATS user.

NATS learns of a revocation through the account JWT in the server's resolver: here the memory
resolver in each node's config, rewritten and reloaded (SIGHUP). In Kubernetes the same account JWT
goes to the NATS chart's resolver (see infra/README.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import nats
import nkeys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.js.errors import KeyNotFoundError

from mesh_contracts import topology as topo
from mesh_identity import Key, Principal, Signer, TrustBundle, new_signing_key, private_pem, signed_bundle
from mesh_kit.settings import log_nats_error
from meshctl.errors import MeshctlError
from meshctl.identity import ACCOUNT, Identities, _write_secret, creds_text, new_keypair, user_jwt
from meshctl.policy import policy

RETIRED_KEPT_S = 30 * 24 * 3600.0
"""How long a retired signing key stays in the bundle (to verify old messages, re-drives)."""


class RotationError(MeshctlError):
    """A principal that cannot be rotated or revoked; the message says why."""


@dataclass
class Report:
    principals: list[str]
    revision_overlap: int = 0
    revision_final: int = 0
    revoked_users: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _replace_secret(path: Path, data: str | bytes) -> None:
    """Write a secret file atomically (a reader sees the old file or the new one, never half)."""
    tmp = path.with_name(path.name + ".new")
    _write_secret(tmp, data)
    os.replace(tmp, path)


PRELOAD = re.compile(r"resolver_preload: \{\n.*?\n\}", re.S)


def rewrite_server_configs(ids: Identities) -> list[Path]:
    """Put the current account JWTs into every node's config under the mesh home (the memory
    resolver reads them on reload)."""
    preload = json.loads((ids.secrets / "preload.json").read_text())
    block = "resolver_preload: {\n" + "\n".join(f"  {k}: {v}" for k, v in preload.items()) + "\n}"
    out = []
    for conf in sorted((ids.home / "nats").rglob("server.conf")):
        text = conf.read_text()
        if PRELOAD.search(text):
            conf.write_text(PRELOAD.sub(lambda _: block, text))
            out.append(conf)
    return out


async def publish_bundle(
    ids: Identities, bundle: TrustBundle, nats_url: str | list[str], *, only_if_newer: bool = False
) -> None:
    """Write the bundle to ``trust-bundle.json`` and publish it, signed by the operator, to the
    ``trust`` bucket every service follows (``only_if_newer``: unless the bucket holds this
    revision or a later one already, as after a rotation the home's file may lag behind)."""
    operator = Signer.from_file("admin", ids.signing_key("admin"))
    nc = await nats.connect(nats_url, name="meshctl-trust", error_cb=log_nats_error, **ids.connect_options("admin"))
    try:
        kv = await nc.jetstream().key_value(topo.TRUST_BUCKET)
        if only_if_newer:
            try:
                current = json.loads((await kv.get(topo.TRUST_KEY)).value or b"{}")
                if TrustBundle.from_json(current["bundle"]).revision >= bundle.revision:
                    return
            except (KeyNotFoundError, KeyError, ValueError):
                pass
        await kv.put(topo.TRUST_KEY, signed_bundle(bundle, operator))
    finally:
        await nc.close()
    tmp = ids.trust_bundle.with_name(ids.trust_bundle.name + ".new")
    tmp.write_text(bundle.dump())
    os.replace(tmp, ids.trust_bundle)


def _with(bundle: TrustBundle, principals: dict[str, Principal]) -> TrustBundle:
    return bundle.changed({**bundle.principals, **principals})


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _keys(p: Principal) -> tuple[Key, ...]:
    return p.keys or (Key(p.public_key),)


def overlap_bundle(bundle: TrustBundle, new_keys: dict[str, Ed25519PublicKey]) -> TrustBundle:
    """The next revision of ``bundle`` in which each principal of ``new_keys`` trusts its keys so
    far and its new public key, which it now names as current (a rotation's overlap)."""
    return _with(bundle, {
        name: replace(bundle.principals[name], public_key=public, keys=(*_keys(bundle.principals[name]), Key(public)))
        for name, public in new_keys.items()
    })  # fmt: skip


async def rotate(
    ids: Identities,
    principals: Sequence[str],
    nats_url: str | list[str],
    *,
    grace_s: float,
    reload: Callable[[], object],
    say: Callable[[str], None] = print,
) -> Report:
    """Rotate ``principals`` (NATS user and signing key) with ``grace_s`` of overlap; ``reload``
    makes the NATS servers re-read their configs (SIGHUP)."""
    started = time.monotonic()
    perms = policy(ids.tenants(), ids.pools())
    bundle = TrustBundle.from_file(ids.trust_bundle)
    unknown = [p for p in principals if p not in perms or p not in bundle.principals]
    if unknown:
        raise RotationError(f"unknown principal(s): {', '.join(unknown)} (see meshctl policy)")
    if "admin" in principals:
        raise RotationError("the admin identity signs the bundles: rotate it with meshctl init on a fresh home")
    acc = nkeys.from_seed(bytearray((ids.secrets / f"account-{ACCOUNT}.nk").read_bytes().strip()))
    signing = nkeys.from_seed(bytearray((ids.secrets / f"account-{ACCOUNT}-signing.nk").read_bytes().strip()))
    old_users, new_keys = {}, {}
    for name in principals:
        old_users[name] = ids.user_of(name).public_key.decode()
        user = new_keypair(nkeys.PREFIX_BYTE_USER)
        _replace_secret(ids.creds(name), creds_text(user_jwt(acc, signing, user, perms[name]), user))
        new_keys[name] = new_signing_key()
    bundle = overlap_bundle(bundle, {name: key.public_key() for name, key in new_keys.items()})
    await publish_bundle(ids, bundle, nats_url)
    for name in principals:
        _replace_secret(ids.signing_key(name), private_pem(new_keys[name]))
    say(f"rotated {len(principals)} principal(s): new NATS users and signing keys in place, bundle revision "
        f"{bundle.revision} trusts old and new; old ones retire in {grace_s:g}s")  # fmt: skip
    report = Report(list(principals), revision_overlap=bundle.revision)
    await asyncio.sleep(grace_s)

    now = time.time()
    retired = {}
    for name in principals:
        p = bundle.principals[name]
        new_pub = p.public_key
        keys = tuple(
            k if _raw(k.public_key) == _raw(new_pub) or k.retired_at is not None else Key(k.public_key, now)
            for k in _keys(p)
        )
        retired[name] = replace(
            p, keys=tuple(k for k in keys if k.retired_at is None or k.retired_at > now - RETIRED_KEPT_S)
        )
    bundle = _with(bundle, retired)
    await publish_bundle(ids, bundle, nats_url)
    ids.revoke_users({u: int(now) for u in old_users.values()})
    rewrite_server_configs(ids)
    reload()
    report.revision_final, report.revoked_users = bundle.revision, list(old_users.values())
    report.seconds = round(time.monotonic() - started, 2)
    say(f"retired the old signing keys (bundle revision {bundle.revision}) and revoked {len(old_users)} old NATS "
        "user(s)")  # fmt: skip
    return report


async def revoke(
    ids: Identities, principal: str, nats_url: str | list[str], *, reload: Callable[[], object]
) -> TrustBundle:
    """Take ``principal`` out of the mesh now: its keys leave the bundle (nothing it signed is
    believed any more, in flight or not) and its NATS user is revoked (connections dropped)."""
    bundle = TrustBundle.from_file(ids.trust_bundle)
    if principal not in bundle.principals:
        raise RotationError(f"unknown principal {principal!r} (see meshctl policy)")
    if principal == "admin":
        raise RotationError("the admin identity signs the bundles and cannot revoke itself")
    user = ids.user_of(principal).public_key.decode()
    remaining = {k: v for k, v in bundle.principals.items() if k != principal}
    bundle = bundle.changed(remaining)
    await publish_bundle(ids, bundle, nats_url)
    for path in (ids.creds(principal), ids.signing_key(principal)):  # never trusted again, even by meshctl init
        if path.exists():
            os.replace(path, path.with_name(path.name + ".revoked"))
    ids.revoke_users({user: int(time.time())})
    rewrite_server_configs(ids)
    reload()
    return bundle
